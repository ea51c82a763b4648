#include "engine/model_loader.h"

#include <unordered_map>

#include "core/error.h"
#include "core/random.h"
#include "model/weight_spec.h"
#if DSV4_HAVE_CUDA
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_synthetic.h"
#endif

namespace dsv4::engine {

std::shared_ptr<LoadedModel> load_model(const ModelSource& source, ops::Backend& backend, int64_t eb, int64_t ee) {
  auto m = std::make_shared<LoadedModel>();
  model::TensorLookup host_lookup;
  if (!source.checkpoint_dir.empty()) {
    m->checkpoint = std::make_shared<model::Checkpoint>(source.checkpoint_dir);
    m->config = m->checkpoint->config();
    m->checkpoint->validate(model::checkpoint_tensor_specs(m->config));
    auto ckpt = m->checkpoint;
    host_lookup = [ckpt](const std::string& name) { return ckpt->get(name); };
  } else {
    if (source.preset.empty()) core::fail("no model given: pass a checkpoint directory or a preset");
    m->config = model::preset_config(source.preset);
    if (ee < 0) ee = m->config.n_routed_experts;
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
    m->synthetic = std::make_shared<model::SyntheticWeightStore>(m->config, source.seed, eb, ee);
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
    lookup = [&, m, host_lookup, roles](const std::string& name) {
      core::Tensor h = host_lookup(name);
      core::Tensor d = backend.empty(h.dtype(), {h.numel()});
      core::Tensor view(d.data(), h.dtype(), h.shape(), h.ndim(), d.device(), d.owner());
      const auto role = roles->find(name);
      backend.upload(view, h.data(), h.nbytes(), role == roles->end() ? ops::TensorRole::kPlain : role->second);
      m->device_copies.push_back(view);
      return view;
    };
  }
  m->weights = model::bind_weights(m->config, lookup, eb, ee);
  return m;
}

}  // namespace dsv4::engine
