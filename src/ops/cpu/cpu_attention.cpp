// CPU reference: compressors, lightning indexer, sparse attention with sink,
// window ring (spec §5.2–§5.8).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "core/error.h"
#include "ops/attention_order.h"
#include "ops/cpu/cpu_backend.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/cpu/primitives.h"

namespace dsv4::ops {

using core::bf16_to_float;
using core::float_to_bf16;
using core::Tensor;

namespace {

// Compressed row j (ratio m) of sequence s lives in page block_table[s][j*m / 256].
template <typename T>
T* paged_row(const Tensor& rows, const BatchView& b, int32_t s, int64_t j, int64_t ratio) {
  const int64_t per_page = kPageTokens / ratio;
  const int64_t block = j / per_page;
  DSV4_CHECK(block < b.max_blocks, "compressed row {} (ratio {}) beyond the {} pages of the block table", j, ratio,
             b.max_blocks);
  const int32_t page = b.block_table[int64_t(s) * b.max_blocks + block];
  DSV4_CHECK(page >= 0 && page < rows.size(0), "page {} of sequence {} outside the pool of {}", page, s, rows.size(0));
  const int64_t width = rows.size(2);
  return rows.as<T>() + (int64_t(page) * per_page + j % per_page) * width;
}

// The window ring row for position `pos` of the sequence in `slot`.
const uint16_t* ring_row(const Tensor& window, int32_t slot, int64_t pos) {
  const int64_t W = window.size(1), Dh = window.size(2);
  return window.as<uint16_t>() + (int64_t(slot) * W + pos % W) * Dh;
}

// One head of sparse attention as the CUDA backend's tensor-core kernel computes it
// (attention_mma_kernel, docs/design/cuda-attention.md), for QuantDotModel::kHopperWgmma.
// Keys go in chunks of 32, kAttentionSegmentChunks chunks a segment (ops/attention_order.h).
// Per key, the logit is the four quarter dot products (each chained bf16 tensor-core
// steps from zero) added in quarter order, times the scale. Per chunk: the running
// max, alpha = exp(m_old - m_new), P = exp(s - m_new), the chunk's P sum in the
// kernel's lane order, l = fma(l, alpha, sum), o = o * alpha then two tensor-core
// steps of bf16(P) with the values. Per segment end: (O, L, M) folded with fma(o, e^(m - M'), O e^(M - M')).
// Then bf16(O / (L + exp(sink - M))); the caller de-rotates. exp is
// core::exp_f32_portable on both sides (fp32 operations only: the kernel evaluates
// one per score). keys: the bf16 rows (values = keys, MQA); out: Dh bf16.
void attention_head_hopper(const uint16_t* q, const std::vector<const uint16_t*>& keys, int64_t Dh, float scale,
                           float sink, uint16_t* out) {
  constexpr int64_t kChunk = kAttentionChunkKeys, kSegmentChunks = kAttentionSegmentChunks;
  const int64_t n = int64_t(keys.size()), quarter = Dh / 4;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> O(static_cast<size_t>(Dh), 0.0f), o(static_cast<size_t>(Dh), 0.0f);
  float M = -inf, L = 0.0f, m_run = -inf, l_run = 0.0f;
  float sv[kChunk];
  uint16_t pb[kChunk];
  std::vector<uint16_t> vcol(kChunk);
  for (int64_t c = 0; c < chunks; ++c) {
    float cmax = -inf;
    for (int64_t j = 0; j < kChunk; ++j) {
      const int64_t u = c * kChunk + j;
      if (u >= n) {
        sv[j] = -inf;
        continue;
      }
      float x = 0.0f;
      for (int64_t r = 0; r < 4; ++r) x += ref::hopper_bf16_dot(0.0f, q + r * quarter, keys[size_t(u)] + r * quarter, quarter);
      sv[j] = x * scale;
      cmax = std::max(cmax, sv[j]);
    }
    const float m_new = std::max(m_run, cmax);
    const float m_ref = m_new == -inf ? 0.0f : m_new;
    const float alpha = core::exp_f32_portable(m_run - m_ref);
    m_run = m_new;
    for (int64_t j = 0; j < kChunk; ++j) sv[j] = core::exp_f32_portable(sv[j] - m_ref);
    // Lane t of a quad sums keys 8nt + 2t, 8nt + 2t + 1 for nt = 0..3; the quad adds (t0 + t1) + (t2 + t3).
    float part[4];
    for (int64_t t = 0; t < 4; ++t) {
      part[t] = 0.0f;
      for (int64_t nt = 0; nt < 4; ++nt) {
        part[t] += sv[nt * 8 + 2 * t];
        part[t] += sv[nt * 8 + 2 * t + 1];
      }
    }
    l_run = std::fma(l_run, alpha, (part[0] + part[1]) + (part[2] + part[3]));
    for (int64_t j = 0; j < kChunk; ++j) pb[j] = float_to_bf16(sv[j]);
    for (int64_t d = 0; d < Dh; ++d) {
      float acc = o[size_t(d)] * alpha;
      for (int64_t ks = 0; ks < 2; ++ks) {
        for (int64_t j = 0; j < 16; ++j) {
          const int64_t u = c * kChunk + ks * 16 + j;
          vcol[size_t(j)] = u < n ? keys[size_t(u)][d] : uint16_t(0);
        }
        acc = ref::hopper_bf16_mma16(acc, pb + ks * 16, vcol.data());
      }
      o[size_t(d)] = acc;
    }
    if (c % kSegmentChunks == kSegmentChunks - 1 || c + 1 == chunks) {  // fold the segment
      const float m = std::max(M, m_run);
      const float ref_m = m == -inf ? 0.0f : m;
      const float wa = core::exp_f32_portable(M - ref_m), wb = core::exp_f32_portable(m_run - ref_m);
      for (int64_t d = 0; d < Dh; ++d) O[size_t(d)] = std::fma(o[size_t(d)], wb, O[size_t(d)] * wa);
      L = std::fma(l_run, wb, L * wa);
      M = m;
      std::fill(o.begin(), o.end(), 0.0f);
      m_run = -inf;
      l_run = 0.0f;
    }
  }
  const float den = L + core::exp_f32_portable(sink - M);
  for (int64_t d = 0; d < Dh; ++d) out[d] = float_to_bf16(O[size_t(d)] / den);
}

}  // namespace

void CpuBackend::do_compress(const Tensor& a, const Tensor& g, const CompressorWeights& w, const BatchView& batch,
                             const RopeTable& rope, float norm_eps, LayerCache& cache) {
  const int64_t m = w.ratio, d = w.head_dim, width = w.width(), rd = rope.rope_dim;
  const bool overlap = m == 4;
  Tensor& kv_state = w.rotate ? cache.index_kv_state : cache.kv_state;
  Tensor& score_state = w.rotate ? cache.index_score_state : cache.score_state;
  const Tensor& rows = w.rotate ? cache.index_rows : cache.rows;
  const int64_t state_rows = kv_state.size(1);
  const float* ape = w.ape.as<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();

  pool_.parallel_for(batch.num_seqs, [&](int64_t sb, int64_t se) {
    std::vector<float> pooled(static_cast<size_t>(d));
    std::vector<uint16_t> row(static_cast<size_t>(d));
    for (int64_t s = sb; s < se; ++s) {
      const int32_t slot = batch.seq_slot[s];
      float* kvs = kv_state.as<float>() + int64_t(slot) * state_rows * width;
      float* scs = score_state.as<float>() + int64_t(slot) * state_rows * width;
      // Tokens go through the decode state machine one by one (spec §5.3): the
      // same code serves decode, one-shot prefill and chunked prefill.
      for (int32_t i = 0; i < batch.seq_len[s]; ++i) {
        const int64_t t = batch.seq_begin[s] + i, p = batch.positions[t];
        const int64_t slot_row = overlap ? m + p % m : p % m;
        for (int64_t f = 0; f < width; ++f) {
          kvs[slot_row * width + f] = a.as<float>()[t * width + f];
          scs[slot_row * width + f] = g.as<float>()[t * width + f] + ape[(p % m) * width + f];
        }
        if ((p + 1) % m != 0) continue;
        const int64_t j = p / m;  // the row this token completes
        // Pool each feature with its own softmax over the candidates: for ratio 4
        // the previous window's first half (absent for row 0) then the current
        // window's second half; for ratio 128 the 128 current slots.
        for (int64_t f = 0; f < d; ++f) {
          float cand_kv[256], cand_score[256];
          int n = 0;
          if (overlap) {
            for (int64_t r = 0; r < m; ++r) {
              cand_kv[n] = j > 0 ? kvs[r * width + f] : 0.0f;
              cand_score[n++] = j > 0 ? scs[r * width + f] : neg_inf;
            }
            for (int64_t r = m; r < 2 * m; ++r) {
              cand_kv[n] = kvs[r * width + d + f];
              cand_score[n++] = scs[r * width + d + f];
            }
          } else {
            for (int64_t r = 0; r < m; ++r) {
              cand_kv[n] = kvs[r * width + f];
              cand_score[n++] = scs[r * width + f];
            }
          }
          float mx = cand_score[0];
          for (int c = 1; c < n; ++c) mx = std::max(mx, cand_score[c]);
          float z = 0.0f;
          for (int c = 0; c < n; ++c) z += core::exp_f32_via_f64(cand_score[c] - mx);
          float acc = 0.0f;
          for (int c = 0; c < n; ++c) acc += cand_kv[c] * (core::exp_f32_via_f64(cand_score[c] - mx) / z);
          pooled[size_t(f)] = acc;
        }
        if (overlap) {  // the current window becomes the previous one
          std::memcpy(kvs, kvs + m * width, size_t(m * width) * 4);
          std::memcpy(scs, scs + m * width, size_t(m * width) * 4);
        }
        // e = RMSNorm(bf16(pooled)); RoPE at j*m, the window's first token (spec §5.3).
        for (int64_t f = 0; f < d; ++f) row[size_t(f)] = float_to_bf16(pooled[size_t(f)]);
        ref::rms_norm_bf16(row.data(), w.norm.as<uint16_t>(), d, norm_eps, row.data());
        ref::rope_bf16(row.data() + d - rd, rd / 2, rope.inv_freq.as<float>(), j * m, false);
        if (w.rotate) {
          ref::hadamard_bf16(row.data(), d);
          ref::fp4_sim_bf16(row.data(), d, 32);
        } else {
          ref::fp8_sim_bf16(row.data(), d - rd, 64);
        }
        std::memcpy(paged_row<uint16_t>(rows, batch, int32_t(s), j, m), row.data(), size_t(d) * 2);
      }
    }
  });
}

void CpuBackend::do_indexer_q(const Tensor& q, const BatchView& batch, const RopeTable& rope) {
  const int64_t T = q.size(0), Hi = q.size(1), Di = q.size(2), rd = rope.rope_dim;
  pool_.parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t h = 0; h < Hi; ++h) {
        uint16_t* v = q.as<uint16_t>() + (t * Hi + h) * Di;
        if (batch.positions[t] >= 0)
          ref::rope_bf16(v + Di - rd, rd / 2, rope.inv_freq.as<float>(), batch.positions[t], false);
        ref::hadamard_bf16(v, Di);
        ref::fp4_sim_bf16(v, Di, 32);
      }
  });
}

void CpuBackend::do_indexer_topk(const Tensor& q, const Tensor& weights, float weight_scale, const LayerCache& cache,
                                 const BatchView& batch, const Tensor& topk) {
  const int64_t T = q.size(0), Hi = q.size(1), Di = q.size(2), K = topk.size(1);
  // The shapes the CUDA backend scores on its tensor cores (index_score_mma_kernel).
  const bool hopper_scores = quant_dot_ == QuantDotModel::kHopperWgmma && Di == 128 && Hi <= 64;
  pool_.parallel_for(T, [&](int64_t b, int64_t e) {
    std::vector<float> qf(static_cast<size_t>(Hi * Di)), kf(static_cast<size_t>(Di)), w(static_cast<size_t>(Hi)), scores;
    std::vector<int32_t> order;
    for (int64_t t = b; t < e; ++t) {
      int32_t* out = topk.as<int32_t>() + t * K;
      std::fill(out, out + K, -1);
      const int32_t s = batch.token_seq[t], p = batch.positions[t];
      if (s < 0 || p < 0) continue;
      const int64_t n_c = (int64_t(p) + 1) / 4;  // rows visible at p, including one emitted at p
      cpu::bf16_row_to_float(q.as<uint16_t>() + t * Hi * Di, Hi * Di, qf.data());
      for (int64_t h = 0; h < Hi; ++h)
        w[size_t(h)] = core::round_bf16(bf16_to_float(weights.as<uint16_t>()[t * Hi + h]) * weight_scale);
      scores.assign(size_t(n_c), 0.0f);
      for (int64_t j = 0; j < n_c; ++j) {
        const uint16_t* row = paged_row<const uint16_t>(cache.index_rows, batch, s, j, 4);
        cpu::bf16_row_to_float(row, Di, kf.data());
        // The reference scores in bf16: per-head logit, ReLU, times weight, sum.
        float sum = 0.0f;
        for (int64_t h = 0; h < Hi; ++h) {
          // kHopperWgmma: the CUDA scoring kernel's logit, chained bf16 tensor-core steps.
          const float dot = hopper_scores ? ref::hopper_bf16_dot(0.0f, q.as<uint16_t>() + (t * Hi + h) * Di, row, Di)
                                          : cpu::dot_f32(qf.data() + h * Di, kf.data(), Di);
          const float logit = core::round_bf16(dot);
          sum += core::round_bf16(std::max(logit, 0.0f) * w[size_t(h)]);
        }
        scores[size_t(j)] = core::round_bf16(sum);
      }
      const int64_t keep = std::min(K, n_c);
      order.resize(size_t(n_c));
      std::iota(order.begin(), order.end(), 0);
      // The keep first rows by (score descending, row ascending), a strict order: the
      // same set however they are arranged; written in row order (backend.h).
      std::nth_element(order.begin(), order.begin() + keep, order.end(), [&](int32_t x, int32_t y) {
        return scores[size_t(x)] != scores[size_t(y)] ? scores[size_t(x)] > scores[size_t(y)] : x < y;
      });
      std::sort(order.begin(), order.begin() + keep);
      std::copy(order.begin(), order.begin() + keep, out);
    }
  });
}

void CpuBackend::do_sparse_attention(const Tensor& q, const Tensor& kv, const LayerCache& cache,
                                     const BatchView& batch, const Tensor& topk, const Tensor& sink,
                                     float softmax_scale, const RopeTable& rope, const Tensor& o) {
  const int64_t T = q.size(0), H = q.size(1), Dh = q.size(2), W = cache.window.size(1), rd = rope.rope_dim;
  pool_.parallel_for(T, [&](int64_t b, int64_t e) {
    std::vector<const uint16_t*> keys;
    std::vector<float> kf, logits;
    std::vector<float> qf(static_cast<size_t>(Dh)), acc(static_cast<size_t>(Dh));
    for (int64_t t = b; t < e; ++t) {
      uint16_t* out = o.as<uint16_t>() + t * H * Dh;
      const int32_t s = batch.token_seq[t], p = batch.positions[t];
      if (s < 0 || p < 0) {
        std::memset(out, 0, size_t(H * Dh) * 2);  // pad rows stay zero
        continue;
      }
      const int32_t start = batch.seq_start_pos[s], slot = batch.seq_slot[s];
      keys.clear();
      // Window: positions max(0, p-W+1) .. p; this step's rows come from kv, older
      // ones from the ring (spec §5.8).
      for (int64_t qp = std::max<int64_t>(0, p - W + 1); qp <= p; ++qp)
        keys.push_back(qp >= start ? kv.as<uint16_t>() + (batch.seq_begin[s] + (qp - start)) * Dh
                                   : ring_row(cache.window, slot, qp));
      if (cache.ratio == 4) {
        for (int64_t i = 0; i < topk.size(1); ++i) {
          const int32_t j = topk.as<int32_t>()[t * topk.size(1) + i];
          if (j >= 0) keys.push_back(paged_row<const uint16_t>(cache.rows, batch, s, j, 4));
        }
      } else if (cache.ratio == 128) {
        for (int64_t j = 0; j < (int64_t(p) + 1) / 128; ++j)
          keys.push_back(paged_row<const uint16_t>(cache.rows, batch, s, j, 128));
      }
      if (quant_dot_ == QuantDotModel::kHopperWgmma && (Dh == 512 || Dh == 128)) {  // the CUDA mma kernel's head sizes
        for (int64_t h = 0; h < H; ++h) {
          uint16_t* oh = out + h * Dh;
          attention_head_hopper(q.as<uint16_t>() + (t * H + h) * Dh, keys, Dh, softmax_scale, sink.as<float>()[h], oh);
          ref::rope_bf16(oh + Dh - rd, rd / 2, rope.inv_freq.as<float>(), p, true);  // de-rotate (spec §5.6)
        }
        continue;
      }
      const size_t n = keys.size();
      kf.resize(n * size_t(Dh));
      for (size_t u = 0; u < n; ++u) cpu::bf16_row_to_float(keys[u], Dh, kf.data() + u * size_t(Dh));
      logits.resize(n);
      for (int64_t h = 0; h < H; ++h) {
        cpu::bf16_row_to_float(q.as<uint16_t>() + (t * H + h) * Dh, Dh, qf.data());
        float mx = -std::numeric_limits<float>::infinity();
        for (size_t u = 0; u < n; ++u) {
          logits[u] = cpu::dot_f32(qf.data(), kf.data() + u * size_t(Dh), Dh) * softmax_scale;
          mx = std::max(mx, logits[u]);
        }
        // P = exp(l - M) with M over the keys; bf16(P) weights the values, the
        // fp32 sum of P plus the sink term normalises (spec §5.5).
        std::fill(acc.begin(), acc.end(), 0.0f);
        float denom = 0.0f;
        for (size_t u = 0; u < n; ++u) {
          const float pr = core::exp_f32_via_f64(logits[u] - mx);
          denom += pr;
          const float pb = core::round_bf16(pr);
          const float* v = kf.data() + u * size_t(Dh);
          for (int64_t i = 0; i < Dh; ++i) acc[size_t(i)] += pb * v[i];
        }
        denom += core::exp_f32_via_f64(sink.as<float>()[h] - mx);
        uint16_t* oh = out + h * Dh;
        for (int64_t i = 0; i < Dh; ++i) oh[i] = float_to_bf16(acc[size_t(i)] / denom);
        ref::rope_bf16(oh + Dh - rd, rd / 2, rope.inv_freq.as<float>(), p, true);  // de-rotate (spec §5.6)
      }
    }
  });
}

void CpuBackend::do_window_commit(const Tensor& kv, const BatchView& batch, LayerCache& cache) {
  const int64_t W = cache.window.size(1), Dh = cache.window.size(2);
  for (int32_t s = 0; s < batch.num_seqs; ++s) {
    const int32_t n = batch.seq_len[s];
    for (int32_t i = std::max<int32_t>(0, n - int32_t(W)); i < n; ++i) {
      const int64_t pos = batch.seq_start_pos[s] + i;
      std::memcpy(const_cast<uint16_t*>(ring_row(cache.window, batch.seq_slot[s], pos)),
                  kv.as<uint16_t>() + (batch.seq_begin[s] + i) * Dh, size_t(Dh) * 2);
    }
  }
}

}  // namespace dsv4::ops
