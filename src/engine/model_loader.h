// Loading a model for a backend: from a checkpoint directory (validated before
// any compute) or from synthetic weights of a preset, bound on the backend's device.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/weights.h"
#include "ops/backend.h"

namespace dsv4::engine {

struct ModelSource {
  std::string checkpoint_dir;  // either this ...
  std::string preset;          // ... or a preset with synthetic weights
  uint64_t seed = 0;
};

// Keeps whatever backs the bound weights alive (memory maps, host or device copies).
class LoadedModel {
 public:
  model::ModelConfig config;
  model::ModelWeights weights;
  std::shared_ptr<model::Checkpoint> checkpoint;
  std::shared_ptr<model::SyntheticWeightStore> synthetic;
  std::vector<core::Tensor> device_copies;
};

// Binds routed experts [expert_begin, expert_end) (-1: all).
std::shared_ptr<LoadedModel> load_model(const ModelSource& source, ops::Backend& backend, int64_t expert_begin = 0,
                                        int64_t expert_end = -1);

}  // namespace dsv4::engine
