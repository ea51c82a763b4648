#include "engine/model_loader.h"

#include "core/error.h"
#include "model/weight_spec.h"

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
    m->synthetic = std::make_shared<model::SyntheticWeightStore>(m->config, source.seed, eb, ee);
    auto store = m->synthetic;
    host_lookup = [store](const std::string& name) { return store->get(name); };
  }
  if (ee < 0) ee = m->config.n_routed_experts;
  model::TensorLookup lookup = host_lookup;
  if (backend.device() != core::Device::kCpu) {
    // Copy each bound tensor to the device once.
    lookup = [&, m, host_lookup](const std::string& name) {
      core::Tensor h = host_lookup(name);
      core::Tensor d = backend.empty(h.dtype(), {h.numel()});
      backend.upload(d, h.data(), h.nbytes());
      core::Tensor view(d.data(), h.dtype(), h.shape(), h.ndim(), d.device(), d.owner());
      m->device_copies.push_back(view);
      return view;
    };
  }
  m->weights = model::bind_weights(m->config, lookup, eb, ee);
  return m;
}

}  // namespace dsv4::engine
