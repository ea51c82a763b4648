#include "model/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace dsv4::model {

namespace fs = std::filesystem;
using core::fail;
using nlohmann::json;

namespace {

json read_json(const fs::path& path) {
  std::ifstream in(path);
  if (!in) fail("cannot open {}", path.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", path.string(), e.what());
  }
}

}  // namespace

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
  const fs::path root(dir);
  if (!fs::is_directory(root)) fail("checkpoint {}: not a directory", dir);
  const fs::path config_path = root / "config.json";
  if (!fs::exists(config_path)) fail("checkpoint {}: config.json is missing", dir);
  json config_json = read_json(config_path);
  config_ = parse_config(config_json, config_path.string());

  auto open_file = [&](const std::string& rel) -> size_t {
    for (size_t i = 0; i < files_.size(); ++i)
      if (fs::path(files_[i]->path()).filename() == rel) return i;
    fs::path p = root / rel;
    if (!fs::exists(p)) fail("checkpoint {}: shard {} is missing", dir, rel);
    files_.push_back(std::make_unique<SafetensorsFile>(p.string()));
    return files_.size() - 1;
  };

  const fs::path index_path = root / "model.safetensors.index.json";
  if (fs::exists(index_path)) {
    json index = read_json(index_path);
    auto map = index.find("weight_map");
    if (map == index.end() || !map->is_object())
      fail("{}: missing or malformed \"weight_map\"", index_path.string());
    for (auto it = map->begin(); it != map->end(); ++it) {
      if (!it->is_string()) fail("{}: weight_map entry for {} is not a file name", index_path.string(), it.key());
      size_t f = open_file(it->get<std::string>());
      const SafetensorsEntry* e = files_[f]->find(it.key());
      if (e == nullptr)
        fail("checkpoint {}: the index places tensor {} in {}, but that file does not contain it", dir, it.key(),
             it->get<std::string>());
      tensors_[it.key()] = Located{f, files_[f]->tensor(*e)};
    }
  } else {
    std::vector<std::string> names;
    if (fs::exists(root / "model.safetensors")) {
      names.push_back("model.safetensors");
    } else {
      for (const auto& entry : fs::directory_iterator(root))
        if (entry.path().extension() == ".safetensors") names.push_back(entry.path().filename().string());
      std::sort(names.begin(), names.end());
    }
    if (names.empty()) fail("checkpoint {}: no model.safetensors.index.json and no .safetensors files", dir);
    for (const auto& n : names) {
      size_t f = open_file(n);
      for (const auto& e : files_[f]->entries()) {
        if (tensors_.count(e.name))
          fail("checkpoint {}: tensor {} appears in both {} and {}", dir, e.name, file_of(e.name), n);
        tensors_[e.name] = Located{f, files_[f]->tensor(e)};
      }
    }
  }

  // The Pro config omits expert_dtype; the experts' on-disk dtype decides (spec §1.1).
  if (!config_json.contains("expert_dtype")) {
    const core::Tensor* w1 = find("layers.0.ffn.experts.0.w1.weight");
    if (w1 != nullptr) config_.expert_dtype = w1->dtype() == core::DType::kF8E4M3 ? "fp8" : "fp4";
  }
}

const core::Tensor* Checkpoint::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second.tensor;
}

const core::Tensor& Checkpoint::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail("checkpoint {}: tensor {} is missing", dir_, name);
  return it->second.tensor;
}

std::string Checkpoint::file_of(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return "(no file)";
  return fs::path(files_[it->second.file]->path()).filename().string();
}

void Checkpoint::validate(const std::vector<TensorSpec>& specs) const {
  for (const auto& s : specs) {
    const core::Tensor* t = find(s.name);
    if (t == nullptr)
      fail("checkpoint {}: tensor {} is missing (config: {})", dir_, s.name, s.derivation);
    const std::string where = fs::path(dir_).filename().string() + "/" + file_of(s.name);
    if (t->dtype() != s.dtype)
      fail("checkpoint {}: tensor {} has dtype {}, expected {} (config: {})", where, s.name,
           core::dtype_name(t->dtype()), core::dtype_name(s.dtype), s.derivation);
    bool same = t->ndim() == int(s.shape.size());
    for (int i = 0; same && i < t->ndim(); ++i) same = t->size(i) == s.shape[size_t(i)];
    if (!same)
      fail("checkpoint {}: tensor {} has shape {}, expected {} (config: {})", where, s.name, t->shape_string(),
           core::shape_string(s.shape.data(), int(s.shape.size())), s.derivation);
  }
}

}  // namespace dsv4::model
