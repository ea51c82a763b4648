// CPU reference: router, SwiGLU experts and the MoE combine (spec §6).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "core/error.h"
#include "ops/cpu/cpu_backend.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/cpu/primitives.h"
#include "ops/gemm_order.h"

namespace dsv4::ops {

using core::bf16_to_float;
using core::float_to_bf16;
using core::Tensor;

void CpuBackend::do_router(const Tensor& x, const Tensor& gate, const Tensor& bias, const Tensor& tid2eid,
                           const BatchView& batch, const RouterConfig& config, const Tensor& weights,
                           const Tensor& ids) {
  const int64_t T = x.size(0), E = gate.size(0), D = gate.size(1), k = config.topk;
  const bool hash = tid2eid.ndim() > 0;
  // kHopperWgmma: the logits as the CUDA backend's tensor-core GEMM computes them (D a multiple of its 64-wide stage).
  const bool hopper_logits = quant_dot_ == QuantDotModel::kHopperWgmma && D % 64 == 0 && D > 0;
  const int logit_slices = hopper_logits ? gemm_slices(gemm_weight_tiles(E), D / 64, 1, false) : 1;
  pool_.parallel_for(T, [&](int64_t b, int64_t e) {
    std::vector<float> xf(static_cast<size_t>(D)), scores(static_cast<size_t>(E)), biased(static_cast<size_t>(E));
    std::vector<int32_t> order(static_cast<size_t>(E));
    for (int64_t t = b; t < e; ++t) {
      float* wt = weights.as<float>() + t * k;
      int32_t* it = ids.as<int32_t>() + t * k;
      if (batch.positions[t] < 0) {  // pad rows are routed nowhere
        std::fill(wt, wt + k, 0.0f);
        std::fill(it, it + k, -1);
        continue;
      }
      cpu::bf16_row_to_float(x.as<uint16_t>() + t * D, D, xf.data());
      if (hopper_logits) {  // the CUDA router's logits: its bf16 tensor-core GEMM, K slices included
        const int64_t per_slice = D / logit_slices;
        for (int64_t i = 0; i < E; ++i) {
          float v = 0.0f;
          for (int64_t sl = 0; sl < logit_slices; ++sl)
            v += ref::hopper_bf16_dot(0.0f, gate.as<uint16_t>() + i * D + sl * per_slice,
                                      x.as<uint16_t>() + t * D + sl * per_slice, per_slice);
          scores[size_t(i)] = v;
        }
      } else {
        for (int64_t i = 0; i < E; ++i) scores[size_t(i)] = cpu::dot_f32_bf16(xf.data(), gate.as<uint16_t>() + i * D, D);
      }
      switch (config.scoring) {
        case ScoringFunc::kSqrtSoftplus:
          for (auto& s : scores) s = std::sqrt(ref::softplus(s));  // sqrt(softplus), not softplus(sqrt) (spec §12.12)
          break;
        case ScoringFunc::kSigmoid:
          for (auto& s : scores) s = ref::sigmoid(s);
          break;
        case ScoringFunc::kSoftmax: {
          const float mx = *std::max_element(scores.begin(), scores.end());
          float z = 0.0f;
          for (auto& s : scores) z += (s = core::exp_f32_via_f64(s - mx));  // as the CUDA router
          for (auto& s : scores) s /= z;
          break;
        }
      }
      if (hash) {
        // tid2eid is int64; ids never pass through a float type (spec §12.13).
        const int64_t* row = tid2eid.as<int64_t>() + int64_t(batch.token_ids[t]) * k;
        for (int64_t i = 0; i < k; ++i) {
          DSV4_CHECK(row[i] >= 0 && row[i] < E, "router: tid2eid[{}] holds expert {} of {}", batch.token_ids[t],
                     row[i], E);
          it[i] = int32_t(row[i]);
        }
      } else {
        // The bias only selects (spec §6.1); ties go to the lower expert id. A NaN biased
        // score sorts after every number (a total order) and is never selected: its slot
        // routes nowhere (id -1, weight 0), as the CUDA router's.
        for (int64_t i = 0; i < E; ++i) biased[size_t(i)] = scores[size_t(i)] + bias.as<float>()[i];
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t c) {
          const float va = biased[size_t(a)], vc = biased[size_t(c)];
          if (std::isnan(va) || std::isnan(vc)) return std::isnan(va) == std::isnan(vc) ? a < c : std::isnan(vc);
          return va != vc ? va > vc : a < c;
        });
        for (int64_t i = 0; i < k; ++i) it[i] = std::isnan(biased[size_t(order[size_t(i)])]) ? -1 : order[size_t(i)];
      }
      float sum = 0.0f;
      for (int64_t i = 0; i < k; ++i) sum += (wt[i] = it[i] >= 0 ? scores[size_t(it[i])] : 0.0f);
      for (int64_t i = 0; i < k; ++i) {
        if (config.normalize && it[i] >= 0) wt[i] /= sum;
        wt[i] *= config.route_scale;
      }
    }
  });
}

void CpuBackend::do_expert_ffn(const Tensor& x, const ExpertWeights& w, const Tensor& row_weight, float limit,
                               const Tensor& y) {
  expert_ffn(x, w, row_weight, limit, y, 1);
}

void CpuBackend::expert_ffn(const Tensor& x, const ExpertWeights& w, const Tensor& row_weight, float limit,
                            const Tensor& y, int tile_mult) {
  const int64_t R = x.size(0), I = w.w1.n;
  std::vector<uint16_t> g(static_cast<size_t>(R * I)), u(static_cast<size_t>(R * I)), h(static_cast<size_t>(R * I));
  // The CUDA backend runs gate and up as one launch over the stacked [w1; w3] (the
  // Hopper model's K slices count both).
  const int64_t gate_up_rows = w.w1.format == w.w3.format ? 2 * I : 0;
  quant_linear_rows(x.as<uint16_t>(), R, w.w1, g.data(), gate_up_rows, tile_mult);
  quant_linear_rows(x.as<uint16_t>(), R, w.w3, u.data(), gate_up_rows, tile_mult);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < I; ++i) {
      float gate = bf16_to_float(g[size_t(r * I + i)]), up = bf16_to_float(u[size_t(r * I + i)]);
      if (limit > 0.0f) {  // up clamped both ways, gate only from above (spec §6.2)
        up = std::clamp(up, -limit, limit);
        gate = std::min(gate, limit);
      }
      float act = ref::silu(gate) * up;
      if (row_weight.ndim() > 0) act = row_weight.as<float>()[r] * act;  // routing weight before w2
      h[size_t(r * I + i)] = float_to_bf16(act);
    }
  quant_linear_rows(h.data(), R, w.w2, y.as<uint16_t>(), 0, tile_mult);
}

void CpuBackend::do_routed_experts(const Tensor& x, const Tensor& ids, const Tensor& weights,
                                   const std::vector<ExpertWeights>& experts, int64_t expert_begin,
                                   int64_t expert_end, float limit, const Tensor& out) {
  const int64_t R = x.size(0), D = x.size(1), k = ids.size(1);
  fill_zero(out);
  std::vector<int64_t> slots;
  for (int64_t e = expert_begin; e < expert_end; ++e) {
    slots.clear();
    for (int64_t i = 0; i < R * k; ++i)
      if (ids.as<int32_t>()[i] == e) slots.push_back(i);
    if (slots.empty()) continue;
    const int64_t n = int64_t(slots.size());
    Tensor xs = Tensor::empty_cpu(core::DType::kBF16, {n, D}), ws = Tensor::empty_cpu(core::DType::kF32, {n});
    Tensor ys = Tensor::empty_cpu(core::DType::kBF16, {n, D});
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(xs.as<uint16_t>() + i * D, x.as<uint16_t>() + (slots[size_t(i)] / k) * D, size_t(D) * 2);
      ws.as<float>()[i] = weights.as<float>()[slots[size_t(i)]];
    }
    expert_ffn(xs, experts[size_t(e)], ws, limit, ys, 4);  // the CUDA expert GEMMs' tile_mult
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(out.as<uint16_t>() + slots[size_t(i)] * D, ys.as<uint16_t>() + i * D, size_t(D) * 2);
  }
}

void CpuBackend::do_moe_reduce(const Tensor& slot_out, const Tensor& ids, const Tensor& routed) {
  const int64_t T = slot_out.size(0), k = slot_out.size(1), D = slot_out.size(2);
  pool_.parallel_for(T, [&](int64_t b, int64_t e) {
    std::vector<int32_t> order(static_cast<size_t>(k));
    for (int64_t t = b; t < e; ++t) {
      // The reference adds expert outputs in ascending expert id (spec §6.2).
      const int32_t* id = ids.as<int32_t>() + t * k;
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t c) { return id[a] < id[c]; });
      float* acc = routed.as<float>() + t * D;
      std::fill(acc, acc + D, 0.0f);
      for (int32_t s : order) {
        if (id[s] < 0) continue;
        const uint16_t* v = slot_out.as<uint16_t>() + (t * k + s) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += bf16_to_float(v[d]);
      }
    }
  });
}

void CpuBackend::do_moe_output(const Tensor& routed, const Tensor& shared, const Tensor& y) {
  const int64_t n = routed.numel();
  for (int64_t i = 0; i < n; ++i)
    y.as<uint16_t>()[i] = float_to_bf16(routed.as<float>()[i] + bf16_to_float(shared.as<uint16_t>()[i]));
}

}  // namespace dsv4::ops
