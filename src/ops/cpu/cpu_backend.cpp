// CPU reference: memory, element-wise ops, norms, mHC and linears.
#include "ops/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/cpu/primitives.h"
#include "ops/gemm_order.h"

namespace dsv4::ops {

using core::bf16_to_float;
using core::DType;
using core::float_to_bf16;
using core::Tensor;
using cpu::dot_f32;
using cpu::dot_f32_bf16;

CpuBackend::CpuBackend(int num_threads, QuantDotModel quant_dot) : pool_(num_threads), quant_dot_(quant_dot) {}

std::unique_ptr<Backend> make_cpu_backend(int num_threads, QuantDotModel quant_dot) {
  return std::make_unique<CpuBackend>(num_threads, quant_dot);
}

Tensor CpuBackend::empty(DType dtype, std::initializer_list<int64_t> shape) { return Tensor::empty_cpu(dtype, shape); }

void CpuBackend::upload(const Tensor& dst, const void* host, size_t bytes, TensorRole) {  // (checkpoint order)
  DSV4_CHECK(bytes <= dst.nbytes(), "upload of {} bytes into a tensor of {}", bytes, dst.nbytes());
  if (bytes) std::memcpy(dst.data(), host, bytes);
}

void CpuBackend::download(void* host, const Tensor& src, size_t bytes, TensorRole) {
  DSV4_CHECK(bytes <= src.nbytes(), "download of {} bytes from a tensor of {}", bytes, src.nbytes());
  if (bytes) std::memcpy(host, src.data(), bytes);
}

void CpuBackend::fill_zero(const Tensor& t) {
  if (t.nbytes()) std::memset(t.data(), 0, t.nbytes());
}

LayerCache CpuBackend::allocate_cache(const CacheGeometry& g, int64_t ratio) {
  LayerCache c;
  c.ratio = ratio;
  c.window = Tensor::zeros_cpu(DType::kBF16, {g.num_slots, g.window, g.head_dim});
  if (ratio > 0) {
    const int64_t coff = ratio == 4 ? 2 : 1;
    c.rows = Tensor::zeros_cpu(DType::kBF16, {g.num_pages, kPageTokens / ratio, g.head_dim});
    c.kv_state = Tensor::zeros_cpu(DType::kF32, {g.num_slots, coff * ratio, coff * g.head_dim});
    c.score_state = Tensor::zeros_cpu(DType::kF32, {g.num_slots, coff * ratio, coff * g.head_dim});
  }
  if (ratio == 4) {
    c.index_rows = Tensor::zeros_cpu(DType::kBF16, {g.num_pages, kPageTokens / 4, g.index_head_dim});
    c.index_kv_state = Tensor::zeros_cpu(DType::kF32, {g.num_slots, 8, 2 * g.index_head_dim});
    c.index_score_state = Tensor::zeros_cpu(DType::kF32, {g.num_slots, 8, 2 * g.index_head_dim});
  }
  return c;
}

Backend::CacheCost CpuBackend::cache_cost(const CacheGeometry& g, int64_t ratio) const {
  return bf16_cache_cost(g, ratio);
}

void CpuBackend::do_embed(const Tensor& table, const BatchView& batch, const Tensor& X) {
  const int64_t T = X.size(0), hc = X.size(1), D = X.size(2), V = table.size(0);
  for (int64_t t = 0; t < T; ++t) {
    const int32_t id = batch.token_ids[t];
    DSV4_CHECK(id >= 0 && id < V, "embed: token id {} outside the vocabulary of {}", id, V);
    for (int64_t i = 0; i < hc; ++i)
      std::memcpy(X.as<uint16_t>() + (t * hc + i) * D, table.as<uint16_t>() + int64_t(id) * D, size_t(D) * 2);
  }
}

void CpuBackend::do_rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& y) {
  const int64_t T = x.size(0), N = x.size(1);
  pool_.parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      ref::rms_norm_bf16(x.as<uint16_t>() + t * N, weight.as<uint16_t>(), N, eps, y.as<uint16_t>() + t * N);
  });
}

void CpuBackend::do_q_norm_rope(const Tensor& q, const BatchView& batch, const RopeTable& rope, float eps) {
  const int64_t T = q.size(0), H = q.size(1), Dh = q.size(2), rd = rope.rope_dim;
  const float* inv_freq = rope.inv_freq.as<float>();
  pool_.parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int32_t pos = batch.positions[t];
      for (int64_t h = 0; h < H; ++h) {
        uint16_t* v = q.as<uint16_t>() + (t * H + h) * Dh;
        // The reference normalises the bf16 tensor in bf16 arithmetic: every
        // intermediate (square, mean, +eps, rsqrt, product) is rounded to bf16.
        const float sum = ref::sum_bf16_squares_lanes32(v, Dh);
        const float mean = core::round_bf16(sum / float(Dh));
        const float r = core::round_bf16(1.0f / std::sqrt(core::round_bf16(mean + eps)));
        for (int64_t i = 0; i < Dh; ++i) v[i] = float_to_bf16(bf16_to_float(v[i]) * r);
        if (pos >= 0) ref::rope_bf16(v + Dh - rd, rd / 2, inv_freq, pos, false);
      }
    }
  });
}

void CpuBackend::do_kv_rope_quant(const Tensor& kv, const BatchView& batch, const RopeTable& rope) {
  const int64_t T = kv.size(0), Dh = kv.size(1), rd = rope.rope_dim;
  for (int64_t t = 0; t < T; ++t) {
    uint16_t* v = kv.as<uint16_t>() + t * Dh;
    if (batch.positions[t] >= 0) ref::rope_bf16(v + Dh - rd, rd / 2, rope.inv_freq.as<float>(), batch.positions[t], false);
    ref::fp8_sim_bf16(v, Dh - rd, 64);
  }
}

namespace {
// mixes[j] = rsqrt(mean(x^2) + eps) * (fn[j] . x) over the flattened streams. The
// dot products take the CUDA kernels' order (128-wide slices of fused multiply-adds,
// cpu::dots_in_slices_of_128; the spec fixes the math, not the order), and the rest
// is the same sequence of IEEE operations as hc_finish_kernel, so the two backends'
// mixes, post, comb and x are meant to agree bit for bit (the CUDA tests report it).
void hc_mixes(const float* xf, int64_t n, const float* fn, int64_t mix, float norm_eps, float* mixes) {
  cpu::dots_in_slices_of_128(fn, xf, n, mix, mixes);  // mixes[mix]: x . x (the buffer holds mix + 1)
  const float r = 1.0f / std::sqrt(mixes[mix] / float(n) + norm_eps);
  for (int64_t j = 0; j < mix; ++j) mixes[j] = mixes[j] * r;
}
}  // namespace

void CpuBackend::do_hc_pre(const Tensor& X, const HcWeights& w, const HcConfig& c, const Tensor& x,
                           const Tensor& post, const Tensor& comb) {
  const int64_t T = X.size(0), hc = X.size(1), D = X.size(2), mix = (2 + hc) * hc;
  const float* scale = w.scale.as<float>();
  const float* base = w.base.as<float>();
  pool_.parallel_for(T, [&](int64_t b, int64_t e) {
    std::vector<float> xf(static_cast<size_t>(hc * D)), mixes(static_cast<size_t>(mix + 1)), pre(static_cast<size_t>(hc));
    for (int64_t t = b; t < e; ++t) {
      cpu::bf16_row_to_float(X.as<uint16_t>() + t * hc * D, hc * D, xf.data());
      hc_mixes(xf.data(), hc * D, w.fn.as<float>(), mix, c.norm_eps, mixes.data());
      for (int64_t i = 0; i < hc; ++i) {
        pre[size_t(i)] = ref::sigmoid(mixes[size_t(i)] * scale[0] + base[i]) + c.hc_eps;
        post.as<float>()[t * hc + i] = 2.0f * ref::sigmoid(mixes[size_t(hc + i)] * scale[1] + base[hc + i]);
      }
      float* cm = comb.as<float>() + t * hc * hc;
      for (int64_t i = 0; i < hc * hc; ++i) cm[i] = mixes[size_t(2 * hc + i)] * scale[2] + base[2 * hc + i];
      if (!c.sinkhorn_later) ref::sinkhorn(cm, hc, c.sinkhorn_iters, c.hc_eps);
      // x = sum_i pre_i * R_i over the un-normalised streams (spec §4.1).
      for (int64_t d = 0; d < D; ++d) {
        float s = 0.0f;
        for (int64_t i = 0; i < hc; ++i) s += pre[size_t(i)] * xf[size_t(i * D + d)];
        x.as<uint16_t>()[t * D + d] = float_to_bf16(s);
      }
    }
  });
}

void CpuBackend::do_hc_sinkhorn(const Tensor& comb, const HcConfig& c) {
  const int64_t T = comb.size(0), hc = comb.size(1);
  pool_.parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) ref::sinkhorn(comb.as<float>() + t * hc * hc, hc, c.sinkhorn_iters, c.hc_eps);
  });
}

void CpuBackend::do_hc_post(const Tensor& f, const Tensor& R, const Tensor& post, const Tensor& comb, const Tensor& Y) {
  const int64_t T = R.size(0), hc = R.size(1), D = R.size(2);
  pool_.parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* p = post.as<float>() + t * hc;
      const float* cm = comb.as<float>() + t * hc * hc;
      const uint16_t* r = R.as<uint16_t>() + t * hc * D;
      for (int64_t j = 0; j < hc; ++j)
        for (int64_t d = 0; d < D; ++d) {
          // Output stream j sums over the FIRST index of comb (spec §4.2).
          float mixed = 0.0f;
          for (int64_t i = 0; i < hc; ++i) mixed += cm[i * hc + j] * bf16_to_float(r[i * D + d]);
          const float a = p[j] * bf16_to_float(f.as<uint16_t>()[t * D + d]);
          Y.as<uint16_t>()[(t * hc + j) * D + d] = float_to_bf16(a + mixed);
        }
    }
  });
}

void CpuBackend::do_hc_head(const Tensor& X, const HcWeights& w, const HcConfig& c, const Tensor& y) {
  const int64_t T = X.size(0), hc = X.size(1), D = X.size(2);
  std::vector<float> xf(static_cast<size_t>(hc * D)), mixes(static_cast<size_t>(hc + 1)), pre(static_cast<size_t>(hc));
  for (int64_t t = 0; t < T; ++t) {
    cpu::bf16_row_to_float(X.as<uint16_t>() + t * hc * D, hc * D, xf.data());
    hc_mixes(xf.data(), hc * D, w.fn.as<float>(), hc, c.norm_eps, mixes.data());
    for (int64_t i = 0; i < hc; ++i)
      pre[size_t(i)] = ref::sigmoid(mixes[size_t(i)] * w.scale.as<float>()[0] + w.base.as<float>()[i]) + c.hc_eps;
    for (int64_t d = 0; d < D; ++d) {
      float s = 0.0f;
      for (int64_t i = 0; i < hc; ++i) s += pre[size_t(i)] * xf[size_t(i * D + d)];
      y.as<uint16_t>()[t * D + d] = float_to_bf16(s);
    }
  }
}

namespace {
// Shape, format, addresses and sampled bytes of a quantized weight.
uint64_t fingerprint(const QuantLinear& w) {
  uint64_t h = uint64_t(w.n) * 1000003u + uint64_t(w.k) * 31u + uint64_t(w.format);
  h ^= uint64_t(reinterpret_cast<uintptr_t>(w.scale.data())) * 0x9e3779b97f4a7c15ull;
  const auto sample = [&](const core::Tensor& t) {
    const size_t n = t.nbytes();
    const uint8_t* p = t.as<uint8_t>();
    for (size_t i = 0; i < 64 && n > 0; ++i) h = (h ^ p[(i * 2654435761u) % n]) * 0x100000001b3ull;
  };
  sample(w.weight);
  sample(w.scale);
  return h;
}
}  // namespace

const float* CpuBackend::dequantized(const QuantLinear& w) {
  const uint64_t fp = fingerprint(w);
  std::lock_guard<std::mutex> lock(cache_mutex_);
  auto it = dequant_cache_.find(w.weight.data());
  if (it != dequant_cache_.end() && it->second->fingerprint == fp) return it->second->values.data();
  auto entry = std::make_unique<Dequantized>();
  entry->weight_owner = w.weight.owner();
  entry->scale_owner = w.scale.owner();
  entry->fingerprint = fp;
  entry->values.resize(size_t(w.n * w.k));
  float* W = entry->values.data();
  const uint8_t* q = w.weight.as<uint8_t>();
  const uint8_t* s = w.scale.as<uint8_t>();
  if (w.format == QuantLinear::Format::kFp8Block128) {
    const int64_t kb = (w.k + 127) / 128;
    for (int64_t n = 0; n < w.n; ++n)
      for (int64_t k = 0; k < w.k; ++k)
        W[n * w.k + k] = core::e4m3_to_float(q[n * w.k + k]) * core::e8m0_to_float(s[(n / 128) * kb + k / 128]);
  } else {
    for (int64_t n = 0; n < w.n; ++n)
      for (int64_t k = 0; k < w.k; ++k) {
        const uint8_t byte = q[n * (w.k / 2) + k / 2];
        const uint8_t nibble = (k % 2 == 0) ? (byte & 0xf) : (byte >> 4);  // low nibble = even k (spec §2.8)
        W[n * w.k + k] = core::e2m1_to_float(nibble) * core::e8m0_to_float(s[n * (w.k / 32) + k / 32]);
      }
  }
  const float* p = W;
  dequant_cache_[w.weight.data()] = std::move(entry);
  return p;
}

// quant_linear_rows under QuantDotModel::kHopperWgmma: Hopper's FP8 tensor-core steps
// of the weight and activation codes, scaled and added in the CUDA GEMM's order
// (linear_kernels.cuh): each of the S K slices (ops/gemm_order.h) from zero, then
// out = bf16(((0 + p_0) + p_1) + ...).
//   FP8: per 128-wide stage, d = the tensor core's chain of its 4 k32 steps from zero
//        (ref::hopper_e4m3_step), then p = fmaf(d, 2^(w block scale) * 2^(act. exp.), p).
//   FP4: per 128-wide stage, q = the 4 chunk sums (ref::hopper_e4m3_dot32, each from
//        zero) of the 2^-6-scaled e4m3 weight codes folded with fmaf(d, 2^(weight
//        scale), q), then p = fmaf(q, 2^(act. exp.) * 64, p).
void CpuBackend::quant_linear_rows_hopper(const uint16_t* x, int64_t rows, const QuantLinear& w, uint16_t* y,
                                          int slices) {
  const int64_t K = w.k, N = w.n, kb = K / 128, per_slice = kb / slices;
  DSV4_CHECK(slices > 0 && kb % slices == 0, "quant_linear_rows_hopper: {} stages in {} slices", kb, slices);
  const bool fp4 = w.format == QuantLinear::Format::kFp4Group32;
  std::vector<uint8_t> fp4_codes;  // FP4: e4m3 codes of 2^-6 x the weights
  if (fp4) {
    fp4_codes.resize(static_cast<size_t>(N * K));
    const uint8_t* q = w.weight.as<uint8_t>();
    for (int64_t i = 0; i < N * K; ++i) {
      const uint8_t byte = q[i / 2];
      fp4_codes[size_t(i)] = ref::e2m1_to_e4m3_div64((i % 2 == 0) ? (byte & 0xf) : (byte >> 4));
    }
  }
  const uint8_t* wc = fp4 ? fp4_codes.data() : w.weight.as<uint8_t>();
  const uint8_t* s = w.scale.as<uint8_t>();
  pool_.parallel_for(rows, [&](int64_t b, int64_t e) {
    std::vector<float> xf(static_cast<size_t>(K));
    std::vector<uint8_t> codes(static_cast<size_t>(K));
    std::vector<int> exps(static_cast<size_t>(kb));
    for (int64_t r = b; r < e; ++r) {
      cpu::bf16_row_to_float(x + r * K, K, xf.data());
      ref::act_quant_fp8(xf.data(), K, 128, codes.data(), exps.data());
      for (int64_t n = 0; n < N; ++n) {
        float total = 0.0f;
        for (int64_t sl = 0; sl < slices; ++sl) {
          float p = 0.0f;
          for (int64_t st = sl * per_slice; st < (sl + 1) * per_slice; ++st) {
            const float xs = core::pow2_float(exps[size_t(st)]);
            if (fp4) {
              float qs = 0.0f;
              for (int64_t c = 0; c < 4; ++c) {
                const int64_t k0 = st * 128 + c * 32;
                const float d = ref::hopper_e4m3_dot32(wc + n * K + k0, codes.data() + k0);
                const float ws = core::e8m0_to_float(s[n * (K / 32) + k0 / 32]);
                qs = c == 0 ? d * ws : std::fma(d, ws, qs);
              }
              p = std::fma(qs, xs * 64.0f, p);
            } else {
              const float scale = core::e8m0_to_float(s[(n / 128) * kb + st]) * xs;
              float d = 0.0f;  // the tensor core's chain of the stage's 4 k32 steps from zero
              for (int64_t k0 = st * 128; k0 < st * 128 + 128; k0 += 32)
                d = ref::hopper_e4m3_step(d, wc + n * K + k0, codes.data() + k0);
              p = std::fma(d, scale, p);
            }
          }
          total += p;
        }
        y[r * N + n] = float_to_bf16(total);
      }
    }
  });
}

void CpuBackend::quant_linear_rows(const uint16_t* x, int64_t rows, const QuantLinear& w, uint16_t* y,
                                   int64_t launch_rows, int tile_mult) {
  if (quant_dot_ == QuantDotModel::kHopperWgmma && w.k % 128 == 0 && w.k > 0) {
    const int slices =
        gemm_slices(gemm_weight_tiles(launch_rows > 0 ? launch_rows : w.n), w.k / 128, tile_mult, true);
    return quant_linear_rows_hopper(x, rows, w, y, slices);
  }
  const float* W = dequantized(w);
  const int64_t K = w.k, N = w.n;
  pool_.parallel_for(rows, [&](int64_t b, int64_t e) {
    std::vector<float> xf(static_cast<size_t>(K)), xq(static_cast<size_t>(K));
    std::vector<uint8_t> codes(static_cast<size_t>(K));
    std::vector<int> exps(static_cast<size_t>(K / 128));
    for (int64_t r = b; r < e; ++r) {
      // Activation quantization per 128 (spec §2.4); q * 2^e is exact in fp32.
      cpu::bf16_row_to_float(x + r * K, K, xf.data());
      ref::act_quant_fp8(xf.data(), K, 128, codes.data(), exps.data());
      for (int64_t k = 0; k < K; ++k)
        xq[size_t(k)] = core::e4m3_to_float(codes[size_t(k)]) * core::pow2_float(exps[size_t(k / 128)]);
      for (int64_t n = 0; n < N; ++n) y[r * N + n] = float_to_bf16(dot_f32(xq.data(), W + n * K, K));
    }
  });
}

void CpuBackend::do_linear(const Tensor& x, const QuantLinear& w, const Tensor& y) {
  quant_linear_rows(x.as<uint16_t>(), x.size(0), w, y.as<uint16_t>());
}

void CpuBackend::do_linear_pair(const Tensor& x, const QuantLinear& wa, const Tensor& ya, const QuantLinear& wb,
                                const Tensor& yb) {
  // The CUDA backend stacks two FP8 weights into one launch (gemm_pair_stacks).
  const bool stacked = wa.format == QuantLinear::Format::kFp8Block128 && wb.format == wa.format &&
                       gemm_pair_stacks(wa.n, wb.n);
  const int64_t launch_rows = stacked ? wa.n + wb.n : 0;
  quant_linear_rows(x.as<uint16_t>(), x.size(0), wa, ya.as<uint16_t>(), launch_rows);
  quant_linear_rows(x.as<uint16_t>(), x.size(0), wb, yb.as<uint16_t>(), launch_rows);
}

// linear_bf16 under kHopperWgmma: each of the S K slices (64-wide stages) summed by
// the chained bf16 tensor-core steps from zero (ref::hopper_bf16_dot), the slice sums
// added in order from zero (linear_kernels.cuh).
bool CpuBackend::linear_bf16_hopper(const Tensor& x, const Tensor& w, const Tensor& y, int64_t launch_rows) {
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  if (quant_dot_ != QuantDotModel::kHopperWgmma || x.dtype() != DType::kBF16 || K % 64 != 0 || K == 0) return false;
  const int slices = gemm_slices(gemm_weight_tiles(launch_rows > 0 ? launch_rows : N), K / 64, 1, false);
  const int64_t per_slice = K / slices;
  const bool y_f32 = y.dtype() == DType::kF32;
  pool_.parallel_for(N, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint16_t* wr = w.as<uint16_t>() + n * K;
      for (int64_t t = 0; t < T; ++t) {
        const uint16_t* xr = x.as<uint16_t>() + t * K;
        float total = 0.0f;
        for (int64_t sl = 0; sl < slices; ++sl)
          total += ref::hopper_bf16_dot(0.0f, wr + sl * per_slice, xr + sl * per_slice, per_slice);
        if (y_f32) y.as<float>()[t * N + n] = total;
        else y.as<uint16_t>()[t * N + n] = float_to_bf16(total);
      }
    }
  }, 256);
  return true;
}

void CpuBackend::do_linear_bf16(const Tensor& x, const Tensor& w, const Tensor& y) {
  if (linear_bf16_hopper(x, w, y, 0)) return;
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  const bool x_f32 = x.dtype() == DType::kF32, y_f32 = y.dtype() == DType::kF32;
  // Rows are few and N can be large (the LM head): split over N.
  std::vector<float> xf(static_cast<size_t>(T * K));
  for (int64_t t = 0; t < T; ++t) {
    if (x_f32) std::memcpy(xf.data() + t * K, x.as<float>() + t * K, size_t(K) * 4);
    else cpu::bf16_row_to_float(x.as<uint16_t>() + t * K, K, xf.data() + t * K);
  }
  pool_.parallel_for(N, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint16_t* wr = w.as<uint16_t>() + n * K;
      for (int64_t t = 0; t < T; ++t) {
        const float v = dot_f32_bf16(xf.data() + t * K, wr, K);
        if (y_f32) y.as<float>()[t * N + n] = v;
        else y.as<uint16_t>()[t * N + n] = float_to_bf16(v);
      }
    }
  }, 256);
}

void CpuBackend::do_linear_bf16_pair(const Tensor& x, const Tensor& wa, const Tensor& ya, const Tensor& wb,
                                     const Tensor& yb) {
  // The CUDA backend stacks the two weights into one launch (gemm_pair_stacks) when
  // both outputs have one type.
  const bool stacked = gemm_pair_stacks(wa.size(0), wb.size(0)) && ya.dtype() == yb.dtype();
  const int64_t launch_rows = stacked ? wa.size(0) + wb.size(0) : 0;
  if (!linear_bf16_hopper(x, wa, ya, launch_rows)) do_linear_bf16(x, wa, ya);
  if (!linear_bf16_hopper(x, wb, yb, launch_rows)) do_linear_bf16(x, wb, yb);
}

// grouped_linear under kHopperWgmma (the CUDA backend's FP8-as-bf16 GEMM: C a multiple
// of 64, each 128-row scale block inside one group): per 64-wide stage the e4m3
// weights, exact in bf16, and the bf16 activations summed by the chained tensor-core
// steps from zero, then p = fmaf(d_stage, 2^(weight block scale), p); slices as above.
void CpuBackend::do_grouped_linear(const Tensor& x, const QuantLinear& w, int64_t groups, const Tensor& y) {
  const int64_t T = x.size(0), C = w.k, R = w.n / groups;
  if (quant_dot_ == QuantDotModel::kHopperWgmma && C % 64 == 0 && C > 0 && (groups == 1 || R % 128 == 0)) {
    const int64_t stages = C / 64, cb = (C + 127) / 128;
    const int slices = gemm_slices(gemm_weight_tiles(R, groups), stages, 1, false);
    const int64_t per_slice = stages / slices;
    const uint8_t* codes = w.weight.as<uint8_t>();
    const uint8_t* sc = w.scale.as<uint8_t>();
    pool_.parallel_for(groups * R, [&](int64_t b, int64_t e) {
      std::vector<uint16_t> wr(static_cast<size_t>(C));
      for (int64_t row = b; row < e; ++row) {
        for (int64_t k = 0; k < C; ++k) wr[size_t(k)] = float_to_bf16(core::e4m3_to_float(codes[row * C + k]));
        const int64_t g = row / R;
        for (int64_t t = 0; t < T; ++t) {
          const uint16_t* xr = x.as<uint16_t>() + t * groups * C + g * C;
          float total = 0.0f;
          for (int64_t sl = 0; sl < slices; ++sl) {
            float p = 0.0f;
            for (int64_t st = sl * per_slice; st < (sl + 1) * per_slice; ++st) {
              const float d = ref::hopper_bf16_dot(0.0f, wr.data() + st * 64, xr + st * 64, 64);
              p = std::fma(d, core::e8m0_to_float(sc[(row / 128) * cb + st / 2]), p);
            }
            total += p;
          }
          y.as<uint16_t>()[t * w.n + row] = float_to_bf16(total);
        }
      }
    });
    return;
  }
  const float* W = dequantized(w);
  pool_.parallel_for(T, [&](int64_t b, int64_t e) {
    std::vector<float> xf(static_cast<size_t>(groups * C));
    for (int64_t t = b; t < e; ++t) {
      cpu::bf16_row_to_float(x.as<uint16_t>() + t * groups * C, groups * C, xf.data());
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t r = 0; r < R; ++r)
          y.as<uint16_t>()[t * w.n + g * R + r] = float_to_bf16(dot_f32(xf.data() + g * C, W + (g * R + r) * C, C));
    }
  });
}

void CpuBackend::do_add_broadcast(const Tensor& e, const Tensor& h, const Tensor& X) {
  const int64_t T = h.size(0), hc = h.size(1), D = h.size(2);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < hc; ++i)
      for (int64_t d = 0; d < D; ++d)
        X.as<uint16_t>()[(t * hc + i) * D + d] =
            float_to_bf16(bf16_to_float(e.as<uint16_t>()[t * D + d]) + bf16_to_float(h.as<uint16_t>()[(t * hc + i) * D + d]));
}

void CpuBackend::do_gather_rows(const Tensor& src, const Tensor& rows, const Tensor& dst) {
  const size_t row_bytes = src.size(0) == 0 ? 0 : src.nbytes() / size_t(src.size(0));
  for (int64_t i = 0; i < rows.size(0); ++i) {
    const int32_t r = rows.as<int32_t>()[i];
    DSV4_CHECK(r >= 0 && r < src.size(0), "gather_rows: row {} outside [0, {})", r, src.size(0));
    std::memcpy(static_cast<char*>(dst.data()) + size_t(i) * row_bytes,
                static_cast<const char*>(src.data()) + size_t(r) * row_bytes, row_bytes);
  }
}

void CpuBackend::do_gather_slots(const Tensor& src, const Tensor& index, const Tensor& dst) {
  const int64_t T = dst.size(0), k = dst.size(1), D = dst.size(2);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t s = 0; s < k; ++s) {
      const int32_t r = index.as<int32_t>()[t * k + s];
      uint16_t* out = dst.as<uint16_t>() + (t * k + s) * D;
      if (r < 0) {
        std::memset(out, 0, size_t(D) * 2);
        continue;
      }
      DSV4_CHECK(r < src.size(0), "gather_slots: row {} outside [0, {})", r, src.size(0));
      std::memcpy(out, src.as<uint16_t>() + (int64_t(r) * k + s) * D, size_t(D) * 2);
    }
}

void CpuBackend::do_argmax_rows(const Tensor& logits, const Tensor& ids) {
  const int64_t R = logits.size(0), V = logits.size(1);
  for (int64_t r = 0; r < R; ++r) ids.as<int32_t>()[r] = ref::argmax_lowest(logits.as<float>() + r * V, V);
}

void CpuBackend::do_choose_tokens(const Tensor& logits, const Tensor& choices, const Tensor& ids) {
  const int64_t R = logits.size(0), V = logits.size(1);
  const auto* c = reinterpret_cast<const TokenChoice*>(choices.data());
  pool_.parallel_for(R, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) ids.as<int32_t>()[r] = ref::choose_token(logits.as<float>() + r * V, V, c[r]);
  });
}

void CpuBackend::do_penalize_logits(const Tensor& logits, const Tensor& penalties) {
  ref::penalize_logits(logits.as<float>(), logits.size(0), logits.size(1),
                       reinterpret_cast<const LogitPenalty*>(penalties.data()), penalties.size(0));
}

void CpuBackend::do_token_logprobs(const Tensor& logits, const Tensor& choices, const Tensor& ids,
                                   const Tensor& records) {
  const int64_t R = logits.size(0), V = logits.size(1);
  const auto* c = reinterpret_cast<const TokenChoice*>(choices.data());
  auto* out = reinterpret_cast<TokenLogprobRecord*>(records.data());
  pool_.parallel_for(R, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      if (c[r].logprobs >= 0)
        out[r] = ref::token_logprob_record(logits.as<float>() + r * V, V, ids.as<int32_t>()[r], c[r].logprobs);
  });
}

void CpuBackend::do_copy(const Tensor& dst, const Tensor& src) {
  if (src.nbytes()) std::memcpy(dst.data(), src.data(), src.nbytes());
}

}  // namespace dsv4::ops
