// A Hugging Face checkpoint directory: config.json plus safetensors shards
// (model.safetensors.index.json, or a single model.safetensors). Tensors are
// views into the memory maps; nothing is copied at load.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/weight_spec.h"

namespace dsv4::model {

class Checkpoint {
 public:
  // Reads config.json and maps every shard. Errors name the file and what is wrong.
  explicit Checkpoint(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }

  const core::Tensor* find(const std::string& name) const;
  // The tensor, or an error naming it and the checkpoint.
  const core::Tensor& get(const std::string& name) const;
  // The shard file holding `name` (path relative to dir), for messages.
  std::string file_of(const std::string& name) const;
  size_t num_tensors() const { return tensors_.size(); }
  size_t num_files() const { return files_.size(); }

  // Checks that every tensor the config implies is present with the right shape
  // and dtype, before any compute.
  void validate(const std::vector<TensorSpec>& specs) const;

 private:
  struct Located {
    size_t file;
    core::Tensor tensor;
  };
  std::string dir_;
  ModelConfig config_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::unordered_map<std::string, Located> tensors_;
};

}  // namespace dsv4::model
