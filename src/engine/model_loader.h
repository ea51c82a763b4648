// Loading a model for a backend: from a checkpoint directory (validated before
// any compute) or from synthetic weights of a preset, bound on the backend's device.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
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
  // Called about once a second while weights are drawn in host memory or copied to the
  // device, and at the end of that (bytes done, bytes in all); unset: quiet.
  std::function<void(uint64_t done, uint64_t total)> progress;
};

// The source's configuration without its weights (a checkpoint's config.json, or the
// preset's): for sizing and checks before the long work.
model::ModelConfig source_config(const ModelSource& source);

// Keeps whatever backs the bound weights alive (memory maps, host or device copies).
class LoadedModel {
 public:
  model::ModelConfig config;
  model::ModelWeights weights;
  std::shared_ptr<model::Checkpoint> checkpoint;
  std::shared_ptr<model::SyntheticWeightStore> synthetic;
  std::vector<core::Tensor> device_copies;
};

// `whole` (host weights with every routed expert bound) bound again for routed experts
// [expert_begin, expert_end) only, sharing its tensors: in-process CPU ranks of an
// expert-parallel group hold one copy of the model between them.
std::shared_ptr<LoadedModel> bind_expert_slice(const std::shared_ptr<LoadedModel>& whole, int64_t expert_begin,
                                               int64_t expert_end);

// Fails, naming the model, the bytes and the memory, where `needed` bytes of weights
// exceed `available` in `where` ("host", "GPU"); where nothing is known, passes.
void check_weights_fit(const std::string& model, uint64_t needed, std::optional<uint64_t> available,
                       const std::string& where, const std::string& hint);

// Binds routed experts [expert_begin, expert_end) (-1: all). Before drawing or copying
// any weight, checks that they fit the memory they go to (check_weights_fit).
std::shared_ptr<LoadedModel> load_model(const ModelSource& source, ops::Backend& backend, int64_t expert_begin = 0,
                                        int64_t expert_end = -1);

}  // namespace dsv4::engine
