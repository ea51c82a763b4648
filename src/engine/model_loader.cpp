#include "engine/model_loader.h"

#include <chrono>
#include <filesystem>
#include <unordered_map>

#include <fmt/format.h>

#include "core/error.h"
#include "core/random.h"
#include "model/transformer.h"
#include "model/weight_spec.h"
#if DSV4_HAVE_CUDA
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_synthetic.h"
#endif

namespace dsv4::engine {

void check_weights_fit(const std::string& model, uint64_t needed, std::optional<uint64_t> available,
                       const std::string& where, const std::string& hint) {
  if (!available || needed <= *available) return;
  core::fail("{}: its weights take {:.2f} GB of {} memory and {:.2f} GB are free there; {}", model,
             double(needed) / 1e9, where, double(*available) / 1e9, hint);
}

namespace {

// Where a device backend's weights go must hold them; host weights of a checkpoint
// are memory-mapped (paged in as read), so only drawn ones are checked.
void check_memory_for(const ModelSource& source, const model::ModelConfig& config, const ops::Backend& backend,
                      int64_t eb, int64_t ee) {
  const bool device = backend.device() != core::Device::kCpu;
  if (!device && !source.checkpoint_dir.empty()) return;
  const std::string model = source.checkpoint_dir.empty() ? fmt::format("preset {}", source.preset)
                                                          : fmt::format("checkpoint {}", source.checkpoint_dir);
  const std::string smaller = source.checkpoint_dir.empty() ? " or take a smaller preset (tiny)" : "";
  check_weights_fit(model, model::needed_weight_bytes(config, eb, ee), backend.memory_available(),
                    device ? "GPU" : "host",
                    device ? "spread the routed experts over more GPUs (--dp with expert parallelism)" + smaller
                           : "draw them on a GPU (--backend cuda)" + smaller);
}

// A progress callback called at most once a second, then once at the end (finish()).
class ThrottledProgress {
 public:
  ThrottledProgress(std::function<void(uint64_t, uint64_t)> report, uint64_t total)
      : report_(std::move(report)), total_(total) {}
  void add(uint64_t bytes) {
    done_ += bytes;
    if (!report_) return;
    const auto now = std::chrono::steady_clock::now();
    if (now - last_ < std::chrono::seconds(1)) return;
    last_ = now;
    report_(done_, total_);
  }
  void finish() {
    if (report_) report_(done_, total_);
  }

 private:
  std::function<void(uint64_t, uint64_t)> report_;
  uint64_t total_ = 0, done_ = 0;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

}  // namespace

std::shared_ptr<LoadedModel> load_model(const ModelSource& source, ops::Backend& backend, int64_t eb, int64_t ee) {
  auto m = std::make_shared<LoadedModel>();
  model::TensorLookup host_lookup;
  if (!source.checkpoint_dir.empty()) {
    m->checkpoint = std::make_shared<model::Checkpoint>(source.checkpoint_dir);
    m->config = m->checkpoint->config();
    m->checkpoint->validate(model::checkpoint_tensor_specs(m->config));
    (void)model::model_cache_cost(m->config, backend);  // (a config the backend's caches cannot hold fails here)
    check_memory_for(source, m->config, backend, eb, ee);
    auto ckpt = m->checkpoint;
    host_lookup = [ckpt](const std::string& name) { return ckpt->get(name); };
  } else {
    if (source.preset.empty()) core::fail("no model given: pass a checkpoint directory or a preset");
    m->config = model::preset_config(source.preset);
    if (ee < 0) ee = m->config.n_routed_experts;
    (void)model::model_cache_cost(m->config, backend);
    check_memory_for(source, m->config, backend, eb, ee);
#if DSV4_HAVE_CUDA
    if (backend.device() == core::Device::kCuda) {
      // Large presets (bench-1g is 30 GB) are drawn directly in GPU memory, with
      // the same values as make-checkpoint writes.
      auto& cuda = static_cast<ops::CudaBackend&>(backend);
      std::unordered_map<std::string, core::Tensor> built;
      const auto specs = model::checkpoint_tensor_specs(m->config);
      for (size_t i = 0; i < specs.size(); ++i) {
        const model::TensorSpec& s = specs[i];
        if (!model::is_needed_tensor(s.name, eb, ee)) continue;
        auto alloc = [&](const model::TensorSpec& t) {
          int64_t n = 1;
          for (int64_t x : t.shape) n *= x;
          core::Tensor d = cuda.empty(t.dtype, {n});
          return core::Tensor(d.data(), t.dtype, t.shape.data(), int(t.shape.size()), core::Device::kCuda, d.owner());
        };
        const uint64_t stream = core::stream_id(s.name);
        switch (s.init) {
          case model::WeightInit::kNormal:
            built[s.name] = alloc(s);
            ops::cuda_synthetic::fill_normal(cuda, built[s.name], source.seed, stream, s.mean, s.std);
            break;
          case model::WeightInit::kFp8Weight:
          case model::WeightInit::kFp4Weight: {
            const model::TensorSpec& sc = specs[i + 1];
            built[s.name] = alloc(s);
            built[sc.name] = alloc(sc);
            if (s.init == model::WeightInit::kFp8Weight)
              ops::cuda_synthetic::fill_fp8_weight(
                  cuda, built[s.name], built[sc.name], s.logical_n, s.logical_k, source.seed, stream, s.std,
                  s.grouped_linear ? ops::TensorRole::kGroupedFp8Weight : ops::TensorRole::kPlain);
            else
              ops::cuda_synthetic::fill_fp4_weight(cuda, built[s.name], built[sc.name], s.logical_n, s.logical_k,
                                                   source.seed, stream, s.std);
            break;
          }
          case model::WeightInit::kExpertIds:
            built[s.name] = alloc(s);
            ops::cuda_synthetic::fill_expert_ids(cuda, built[s.name], source.seed, stream, m->config.n_routed_experts);
            break;
          case model::WeightInit::kFp8Scale:
          case model::WeightInit::kFp4Scale:
            break;
        }
      }
      cuda.synchronize();
      for (auto& [name, t] : built) m->device_copies.push_back(t);
      auto table = std::make_shared<std::unordered_map<std::string, core::Tensor>>(std::move(built));
      m->weights = model::bind_weights(m->config, [table](const std::string& name) {
        auto it = table->find(name);
        if (it == table->end()) core::fail("synthetic GPU weights: no tensor {}", name);
        return it->second;
      }, eb, ee);
      return m;
    }
#endif
    m->synthetic = std::make_shared<model::SyntheticWeightStore>(m->config, source.seed, eb, ee,
                                                                 model::SyntheticBuildOptions{0, source.progress});
    auto store = m->synthetic;
    host_lookup = [store](const std::string& name) { return store->get(name); };
  }
  if (ee < 0) ee = m->config.n_routed_experts;
  model::TensorLookup lookup = host_lookup;
  if (backend.device() != core::Device::kCpu) {
    // Copy each bound tensor to the device once, in its shape and role (a backend may
    // store FP4 weights and their scales, and the grouped linear's FP8 weights, in an
    // order that depends on both).
    auto roles = std::make_shared<std::unordered_map<std::string, ops::TensorRole>>();
    for (const model::TensorSpec& s : model::checkpoint_tensor_specs(m->config)) {
      if (s.init == model::WeightInit::kFp4Scale) (*roles)[s.name] = ops::TensorRole::kFp4Scales;
      if (s.grouped_linear) (*roles)[s.name] = ops::TensorRole::kGroupedFp8Weight;
    }
    auto copied = std::make_shared<ThrottledProgress>(source.progress, model::needed_weight_bytes(m->config, eb, ee));
    lookup = [&, m, host_lookup, roles, copied](const std::string& name) {
      core::Tensor h = host_lookup(name);
      core::Tensor d = backend.empty(h.dtype(), {h.numel()});
      core::Tensor view(d.data(), h.dtype(), h.shape(), h.ndim(), d.device(), d.owner());
      const auto role = roles->find(name);
      backend.upload(view, h.data(), h.nbytes(), role == roles->end() ? ops::TensorRole::kPlain : role->second);
      m->device_copies.push_back(view);
      copied->add(h.nbytes());
      return view;
    };
    m->weights = model::bind_weights(m->config, lookup, eb, ee);
    copied->finish();
    return m;
  }
  m->weights = model::bind_weights(m->config, lookup, eb, ee);
  return m;
}

model::ModelConfig source_config(const ModelSource& source) {
  if (source.checkpoint_dir.empty()) return model::preset_config(source.preset);
  const std::filesystem::path config = std::filesystem::path(source.checkpoint_dir) / "config.json";
  if (!std::filesystem::exists(config)) core::fail("checkpoint {}: config.json is missing", source.checkpoint_dir);
  return model::load_config(config.string());
}

std::shared_ptr<LoadedModel> bind_expert_slice(const std::shared_ptr<LoadedModel>& whole, int64_t eb, int64_t ee) {
  DSV4_CHECK(whole->device_copies.empty() && (whole->checkpoint || whole->synthetic),
             "bind_expert_slice: the model's weights are not host tensors");
  DSV4_CHECK(whole->weights.expert_begin == 0 && whole->weights.expert_end == whole->config.n_routed_experts,
             "bind_expert_slice: the model binds experts [{}, {}), not all {}", whole->weights.expert_begin,
             whole->weights.expert_end, whole->config.n_routed_experts);
  auto m = std::make_shared<LoadedModel>(*whole);
  const auto ckpt = whole->checkpoint;
  const auto store = whole->synthetic;
  m->weights = model::bind_weights(
      m->config,
      [ckpt, store](const std::string& name) { return ckpt ? ckpt->get(name) : store->get(name); }, eb,
      ee < 0 ? m->config.n_routed_experts : ee);
  return m;
}

}  // namespace dsv4::engine
