// A step's tokens from its logits rows on the GPU, so that only ids cross to the host.
// argmax_rows: memory-bound, R*V*4 bytes (256 rows of a 129,280-token vocabulary: 132 MB,
// ~33 µs at the copy rate, against ~5-13 ms to copy them to the host); one CTA a row.
// choose_tokens: the law of ops/token_choice.h, CTAs of 1024 threads (4 loads in flight a thread),
// one a row or, where rows are few, a cluster of up to 8 a row (RowCtas). A greedy row is
// argmax_rows' scan. A sampled row reads its logits a few times (from L2 where it fits):
//   the max; for top_k, a radix selection of the k-th order key (8-bit digits from the top,
//   a 256-bin shared histogram a pass, the first binned beside the max; it stops where the bin
//   holds exactly what is still needed, so a row without ties takes ~2-3 more passes, not 8);
//   for top_p, a selection of the
//   shortest prefix by weight (the same passes with weights in the bins, the first digit 4 bits
//   wide; the first pass's bins also give the kept weight top_p's need is taken of);
//   then the draw: each thread sums a contiguous chunk of ids, a block scan of the sums, and
//   a warp walks the chunk that holds the target (~128 ids, 128 a round). Every sum is of
//   integers, so the order of the GPU's additions cannot change a token: it equals the CPU
//   reference's bit for bit.
// token_logprobs: a row's log-probability record (its max, Z1, the most likely tokens by the
// same selection), for the rows whose choice asks.
#include <atomic>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "ops/cuda/cluster.cuh"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/cuda_test_hooks.h"
#include "ops/cuda/grid_dependency.cuh"
#include "ops/token_choice.h"

namespace dsv4::ops {

namespace {

using namespace token_law;

// ---- the argmax ------------------------------------------------------------------------------

// A candidate of the argmax: the larger value wins, the lower index among equal values;
// NaNs never compare larger, and "none yet" is (-inf, INT32_MAX), which any non-NaN takes.
struct ArgmaxCandidate {
  float value;
  int32_t index;
};

__device__ __forceinline__ void take_if_better(ArgmaxCandidate& a, float v, int32_t i) {
  if (v > a.value || (v == a.value && i < a.index)) a = ArgmaxCandidate{v, i};
}

__device__ __forceinline__ void take_best_of_warp(ArgmaxCandidate& best) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best.value, off);
    const int32_t i = __shfl_xor_sync(0xffffffffu, best.index, off);
    take_if_better(best, v, i);
  }
}

// f(i, logit) for the columns of `row` that thread `first` of the `stride` threads reading it
// takes, coalesced, in no order (every use takes a max, sums integers or adds to bins): 16 bytes a
// load where the row is of float4s (vec4), with kAhead loads in flight before the first is used (a
// CTA's pass over a row runs at its loads' latency: one 16-byte load a thread at a time moves 16 KB a
// round trip at 1024 threads), else a float a load.
template <int kAhead, typename F>
__device__ __forceinline__ void for_each_column(const float* __restrict__ row, int64_t V, bool vec4, int first,
                                                int stride, F&& f) {
  if (vec4) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const int n4 = int(V / 4);  // (V < 2^31: ids are i32)
    for (int c0 = first; c0 < n4; c0 += kAhead * stride) {
      float4 v[kAhead];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        const int c = c0 + u * stride;
        if (c < n4) v[u] = row4[c];
      }
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        const int c = c0 + u * stride;
        if (c >= n4) break;
        const int32_t i = 4 * c;
        f(i, v[u].x);
        f(i + 1, v[u].y);
        f(i + 2, v[u].z);
        f(i + 3, v[u].w);
      }
    }
  } else {
    for (int i = first; i < int(V); i += stride) f(i, row[i]);
  }
}

// CTAs a row of choose_tokens (RowCtas): at most a portable cluster's 8, by powers of two.
constexpr int kMaxRowCtas = 8;

// The CTAs that read one row: a cluster of `ctas` (this one its `rank`), or a CTA alone (ctas 1,
// launched without clusters). Every reduction over the row (the max, the radix bins, the draw's
// prefix) is then the CTAs' own reductions combined through distributed shared memory between
// cluster barriers; they are sums of integers and maxima, so any split of the columns gives the
// same result, and every CTA of the row takes the same decisions.
struct RowCtas {
  int rank = 0, ctas = 1;
  // Every thread of the row's CTAs arrives and waits (shared memory written before it is read after it).
  __device__ __forceinline__ void sync() const {
    if (ctas > 1) cluster_sync_all();
  }
  // The sum over the row's CTAs of the u32 / u64 at shared address `at` (the same variable in each),
  // the loads issued before the first is added; sum_u64 also leaves in *below (where given) the sum
  // over the CTAs ranked below `below_rank`.
  __device__ __forceinline__ uint32_t sum_u32(uint32_t at) const {
    uint32_t x[kMaxRowCtas], s = 0;
#pragma unroll
    for (int k = 0; k < kMaxRowCtas; ++k) x[k] = k < ctas ? ld_cluster_u32(cluster_map(at, unsigned(k))) : 0u;
#pragma unroll
    for (int k = 0; k < kMaxRowCtas; ++k) s += x[k];
    return s;
  }
  __device__ __forceinline__ uint64_t sum_u64(uint32_t at, int below_rank = 0, uint64_t* below = nullptr) const {
    uint64_t x[kMaxRowCtas], s = 0, b = 0;
#pragma unroll
    for (int k = 0; k < kMaxRowCtas; ++k) x[k] = k < ctas ? ld_cluster_u64(cluster_map(at, unsigned(k))) : 0u;
#pragma unroll
    for (int k = 0; k < kMaxRowCtas; ++k) s += x[k], b += k < below_rank ? x[k] : 0u;
    if (below != nullptr) *below = b;
    return s;
  }
};

// Loads a thread of row_argmax has in flight (its row is read once).
constexpr int kArgmaxLoadsAhead = 8;

// The reference scan's result for `row`, in every thread of the row's CTAs (kThreads a CTA).
template <int kThreads>
__device__ int32_t row_argmax(const float* __restrict__ row, int64_t V, bool vec4, RowCtas rc = {}) {
  ArgmaxCandidate best{-INFINITY, INT32_MAX};
  for_each_column<kArgmaxLoadsAhead>(row, V, vec4, rc.rank * kThreads + int(threadIdx.x), rc.ctas * kThreads,
                                     [&](int32_t i, float v) { take_if_better(best, v, i); });
  take_best_of_warp(best);
  __shared__ ArgmaxCandidate warp_best[kThreads / 32];
  __shared__ ArgmaxCandidate cta_best;
  __shared__ int32_t result;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (warp == 0) {
    best = lane < kThreads / 32 ? warp_best[lane] : ArgmaxCandidate{-INFINITY, INT32_MAX};
    take_best_of_warp(best);
    if (lane == 0) cta_best = best;
  }
  if (rc.ctas > 1) {
    rc.sync();  // every CTA's best in place
    if (warp == 0) {
      best = ArgmaxCandidate{-INFINITY, INT32_MAX};
      if (lane < rc.ctas) {
        const uint32_t at = cluster_map(shared_address(&cta_best), unsigned(lane));
        best = ArgmaxCandidate{__uint_as_float(ld_cluster_u32(at)), int32_t(ld_cluster_u32(at + 4))};
      }
      take_best_of_warp(best);
    }
  }
  // The reference scan starts at column 0: a NaN there is never left; a row of NaNs gives 0.
  if (warp == 0 && lane == 0) result = isnan(row[0]) || best.index == INT32_MAX ? 0 : best.index;
  __syncthreads();
  return result;
}

constexpr int kArgmaxThreads = 512;

__global__ void __launch_bounds__(kArgmaxThreads) argmax_rows_kernel(const float* __restrict__ logits, int64_t V,
                                                                      bool vec4, int32_t* __restrict__ ids) {
  wait_then_release_dependents();
  const int32_t id = row_argmax<kArgmaxThreads>(logits + int64_t(blockIdx.x) * V, V, vec4);  // (a CTA a row)
  if (threadIdx.x == 0) ids[blockIdx.x] = id;
}

// ---- the sampled rows --------------------------------------------------------------------------

constexpr int kChooseThreads = 1024;
constexpr int kChooseWarps = kChooseThreads / 32;

// Loads a thread has in flight in a pass over a row (for_each_column). Measured on an H100
// (docs/BENCHMARKS.md, seventy-sixth session), one row: 4 with 1024 threads took temperature-1
// rows 0.056-0.064 ms a call against 0.065-0.072 with one; 8 with 512 threads (no spills, where
// 1024 x 4 spills a few bytes) 0.068-0.076, and top_p 0.95 0.75 ms against 0.48: the weighed
// passes are bound by their arithmetic's latency, which fewer warps hide worse.
constexpr int kLoadsAhead = 4;

// f(i, logit) for this CTA's columns of a row (for_each_column; by choose_tokens' and token_logprobs' CTAs).
template <typename F>
__device__ __forceinline__ void for_each_logit(const float* __restrict__ row, int64_t V, bool vec4, RowCtas rc,
                                               F&& f) {
  for_each_column<kLoadsAhead>(row, V, vec4, rc.rank * kChooseThreads + int(threadIdx.x), rc.ctas * kChooseThreads, f);
}

// The largest non-NaN value (-inf if none) of the row's CTAs' `v`, in every thread.
__device__ float row_max(float v, float* scratch, RowCtas rc) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kChooseWarps ? scratch[lane] : -INFINITY;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();
  if (rc.ctas > 1) {
    __shared__ float cta_max;
    if (threadIdx.x == 0) cta_max = v;
    rc.sync();
    const uint32_t at = shared_address(&cta_max);
    float x[kMaxRowCtas];
#pragma unroll
    for (int k = 0; k < kMaxRowCtas; ++k) x[k] = k < rc.ctas ? ld_cluster_f32(at, unsigned(k)) : -INFINITY;
#pragma unroll
    for (int k = 0; k < kMaxRowCtas; ++k) v = fmaxf(v, x[k]);
  }
  return v;
}

struct SelectShared {
  unsigned int count[256];
  unsigned long long mass[256];
  unsigned int row_count[256];  // with several CTAs a row: the row's bins (every CTA's summed)
  unsigned long long row_mass[256];
  unsigned long long remaining;
  unsigned int bin, bin_count;
};

// How a radix pass adds its keys to the shared bins (DSV4_CUDA_CHOOSE_AGGREGATE). Atomic: a
// shared atomic a key. Aggregated: a thread sums its keys of the first kBinSlots bins it meets in
// registers and adds each sum once, when the pass ends (BinAdder::flush); keys of other bins go
// to the shared bins at once. The first digits put most keys of a row in a few bins (a logit's
// sign and exponent), and atomics on one address serialize, so a weighed pass's 64-bit atomics
// cost top_p 3x; the later digits spread the keys, and there the atomics are cheap. Measured:
// see bin_updates(). The same bins in every form (sums of integers).
enum class BinUpdates : int { kAtomic = 0, kAggregated = 1, kAggregatedWeighed = 2 };

constexpr int kBinSlots = 4;

// One thread's updates of the bins `sh` in one pass: add() a key, flush() before the barrier
// that ends the pass. kSum: the aggregated form (else an atomic a key); by_mass: the weights
// are summed too.
template <bool kSum>
struct BinAdder {
  SelectShared& sh;
  const bool by_mass;
  unsigned bin[kBinSlots];
  unsigned long long mass[kBinSlots];
  unsigned count[kBinSlots];

  __device__ __forceinline__ BinAdder(SelectShared& shared, bool weighed) : sh(shared), by_mass(weighed) {
#pragma unroll
    for (int j = 0; j < kBinSlots; ++j) bin[j] = ~0u, mass[j] = 0, count[j] = 0;
  }
  __device__ __forceinline__ void add_now(unsigned b, unsigned long long w) {
    if (by_mass) atomicAdd(&sh.mass[b], w);
    atomicAdd(&sh.count[b], 1u);
  }
  __device__ __forceinline__ void add(unsigned b, uint64_t w) {
    if constexpr (kSum) {
      bool held = false;
#pragma unroll
      for (int j = 0; j < kBinSlots; ++j)
        if (!held && (bin[j] == b || bin[j] == ~0u)) {  // (slots fill in order: a free one ends the held ones)
          bin[j] = b, mass[j] += w, count[j] += 1, held = true;
        }
      if (!held) add_now(b, w);
    } else {
      add_now(b, w);
    }
  }
  __device__ __forceinline__ void flush() {
    if constexpr (kSum) {
#pragma unroll
      for (int j = 0; j < kBinSlots; ++j)
        if (count[j] > 0) {
          if (by_mass) atomicAdd(&sh.mass[bin[j]], mass[j]);
          atomicAdd(&sh.count[bin[j]], count[j]);
        }
    }
  }
};

// Whether form kUpdates sums a thread's keys of a bin (the weighed passes, or every pass).
template <BinUpdates kUpdates>
__device__ __forceinline__ bool sums_bins(bool by_mass) {
  return kUpdates == BinUpdates::kAggregated || (kUpdates == BinUpdates::kAggregatedWeighed && by_mass);
}

// The first digit of a weighed selection (top_p): a key's top 4 bits (the sign and the exponent's
// top 3: a row's keys in ~4 bins, |logit| above or below 2 by sign), so that a thread's keys of the
// first pass, which weighs every key, fall in the 4 bins BinAdder sums in registers. With 8 bits
// (sign and 7 exponent bits) ~8 bins held a row, and the keys of the 4 a thread's slots did not hold
// (~14% at N(0, 3) logits) took shared atomics on a few addresses: 2 slots instead of 4 doubled top_p's time.
// Not after top_k (a floor above 0): its few kept keys share one 4-bit bin, and the pass that
// splits it is one more read of the row (k 40 p 0.9 was 8-12% slower at 16-256 rows on an H100).
constexpr int kWeighedFirstDigitBits = 4;

__device__ __forceinline__ void clear_bins(SelectShared& sh) {
  for (int b = threadIdx.x; b < 256; b += kChooseThreads) sh.count[b] = 0, sh.mass[b] = 0;
}

// The largest order key K >= floor such that the keys in [K, inf) that are >= floor number at
// least `target` (by_mass false), or one such K where they weigh at least `target` and the
// keys above K less (by_mass true, the weights as min_p's `least` leaves them: keys of weight 0
// may fall either side), in every thread;
// target >= 1 and at most what the keys >= floor hold. Where top_p < 1 (by_mass), the target
// is top_p's need of the keys' total weight, which the first pass's bins sum (so the total
// costs no pass of its own). Digits from the top (8 bits; a weighed selection's first one
// kWeighedFirstDigitBits where no floor applies): a pass histograms the keys that share the digits fixed so far, and
// warp 0 finds the bin the target falls in, counting from the top. first_bins_ready: the first
// pass's bins are already in `sh` (a count selection from floor 0, binned beside the row's max).
// The kept set, keys >= the result, is the same whatever the digits: a pass stops where its bin
// holds only kept keys, and the bits below are then zero. With several CTAs a row, each bins its
// columns and warp 0 of each sums the CTAs' bins (every CTA finds the same bin).
template <BinUpdates kUpdates>
__device__ uint64_t select_threshold(const float* __restrict__ row, int64_t V, bool vec4, float m, float inv,
                                     uint64_t least, bool by_mass, uint64_t target, float top_p, uint64_t floor,
                                     bool first_bins_ready, RowCtas rc, SelectShared& sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint64_t prefix = 0, remaining = target;
  int width = by_mass && floor == 0 ? kWeighedFirstDigitBits : 8, shift = 64 - width;
  for (bool first = true;; first = false) {
    const uint64_t fixed_mask = first ? 0 : ~0ull << (shift + width);
    const unsigned digit_mask = (1u << width) - 1u;
    if (!first || !first_bins_ready) {
      clear_bins(sh);
      __syncthreads();
      const auto pass = [&](auto adder) {
        for_each_logit(row, V, vec4, rc, [&](int32_t i, float v) {
          const uint64_t key = order_key(v, i);
          if (key < floor || (key & fixed_mask) != prefix) return;
          // A key of weight 0 is left out of a weighed selection: the draw never lands on it,
          // whether kept or not.
          const uint64_t w = by_mass ? kept_weight(v, m, inv, least) : 0;
          if (by_mass && w == 0) return;
          adder.add(unsigned(key >> shift) & digit_mask, w);
        });
        adder.flush();
      };
      if (sums_bins<kUpdates>(by_mass)) pass(BinAdder<true>(sh, by_mass));
      else pass(BinAdder<false>(sh, by_mass));
      __syncthreads();
    }
    if (rc.ctas > 1) {  // the row's bins: the CTAs' bins summed, a thread a bin
      rc.sync();        // every CTA's bins complete
      for (int b = threadIdx.x; b < 256; b += kChooseThreads) {
        sh.row_count[b] = rc.sum_u32(shared_address(&sh.count[b]));
        if (by_mass) sh.row_mass[b] = rc.sum_u64(shared_address(&sh.mass[b]));
      }
      __syncthreads();
    }
    const unsigned int* bin_count = rc.ctas > 1 ? sh.row_count : sh.count;
    const unsigned long long* bin_mass = rc.ctas > 1 ? sh.row_mass : sh.mass;
    if (warp == 0) {
      // Lane l holds bins 8l .. 8l+7; the bins above lane l's are the lanes above it.
      uint64_t value[8], lane_total = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        value[j] = by_mass ? uint64_t(bin_mass[8 * lane + j]) : uint64_t(bin_count[8 * lane + j]);
        lane_total += value[j];
      }
      uint64_t suffix = lane_total;  // this lane's bins and every bin above them
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const uint64_t o = __shfl_down_sync(0xffffffffu, suffix, off);
        if (lane + off < 32) suffix += o;
      }
      if (first && by_mass && top_p < 1.0f) remaining = top_p_need(top_p, __shfl_sync(0xffffffffu, suffix, 0));
      uint64_t above = suffix - lane_total;
      if (above < remaining && remaining <= suffix) {  // one lane: the target is in its bins
        for (int j = 7; j >= 0; --j) {
          if (above + value[j] >= remaining) {
            sh.bin = unsigned(8 * lane + j);
            sh.bin_count = bin_count[8 * lane + j];
            sh.remaining = remaining - above;
            break;
          }
          above += value[j];
        }
      }
    }
    __syncthreads();
    prefix |= uint64_t(sh.bin) << shift;
    remaining = sh.remaining;
    const bool whole_bin = by_mass ? sh.bin_count == 1 : remaining == sh.bin_count;
    __syncthreads();  // sh is cleared next pass
    rc.sync();        // (several CTAs a row) and no CTA reads another's bins any more
    if (whole_bin || shift == 0) break;  // whole_bin: every key of the bin is in, the digits below need not be fixed
    width = shift < 8 ? shift : 8;
    shift -= width;
  }
  return prefix > floor ? prefix : floor;
}

// The draw among the keys >= floor, in ascending id order: each thread sums its chunk of ids,
// a block scan of the sums (and, with several CTAs a row, the sums of the CTAs before) finds the
// chunk that holds the target, and warp 0 of its CTA walks that chunk 128 ids a round (4 a lane, a
// warp scan of their weights), so the walk costs a load a lane a round instead of one thread's ~128
// loads one after another. The token in that CTA's threads, -1 in the row's other CTAs.
__device__ int32_t draw_token(const float* __restrict__ row, int64_t V, bool vec4, float m, float inv,
                              uint64_t least, uint64_t floor, uint64_t seed, int64_t position, RowCtas rc,
                              unsigned long long* scratch) {
  const int64_t threads = int64_t(rc.ctas) * kChooseThreads;
  const int64_t chunk = ((V + threads - 1) / threads + 3) / 4 * 4;
  const int64_t begin = (int64_t(rc.rank) * kChooseThreads + threadIdx.x) * chunk;
  const int64_t end = begin + chunk < V ? begin + chunk : V;
  const auto weight = [&](int32_t i, float v) -> uint64_t {
    return order_key(v, i) >= floor ? kept_weight(v, m, inv, least) : 0;
  };
  uint64_t mine = 0;
  if (vec4) {  // begin and end are multiples of 4
#pragma unroll 4
    for (int64_t i = begin; i < end; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(row + i);
      mine += weight(int32_t(i), v.x) + weight(int32_t(i + 1), v.y) + weight(int32_t(i + 2), v.z) +
              weight(int32_t(i + 3), v.w);
    }
  } else {
    for (int64_t i = begin; i < end; ++i) mine += weight(int32_t(i), row[i]);
  }
  __shared__ int32_t chosen;
  __shared__ bool owner_here;
  __shared__ unsigned long long owner_before, cta_total;
  __shared__ int64_t owner_begin, owner_end;
  if (threadIdx.x == 0) owner_here = false;
  // The exclusive prefix of the threads' sums: within the warp, then over the warps.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint64_t inclusive = mine;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint64_t o = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += o;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    uint64_t w = lane < kChooseWarps ? uint64_t(scratch[lane]) : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const uint64_t o = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += o;
    }
    if (lane < kChooseWarps) scratch[lane] = w;  // the warps' inclusive prefixes
  }
  __syncthreads();
  uint64_t before = (warp > 0 ? uint64_t(scratch[warp - 1]) : 0) + inclusive - mine;
  uint64_t total = scratch[kChooseWarps - 1];
  if (rc.ctas > 1) {  // the CTAs before this one, and the row's total
    if (threadIdx.x == 0) cta_total = total;
    rc.sync();
    uint64_t below = 0;
    total = rc.sum_u64(shared_address(&cta_total), rc.rank, &below);
    before += below;
  }
  const uint64_t t = draw_target(seed, position, total);
  // One thread's range holds t: the kept set holds the max, whose weight is 2^40, so total > t.
  if (before <= t && t < before + mine)
    owner_before = before, owner_begin = begin, owner_end = end, owner_here = true;
  __syncthreads();
  if (!owner_here) return -1;  // (the whole CTA)
  if (warp == 0) {
    const int64_t ob = owner_begin, oe = owner_end;
    uint64_t run = owner_before;
    int32_t id = int32_t(oe - 1);
    for (int64_t s = ob; s < oe; s += 128) {  // a round: ids s + 4 lane .. + 3
      const int64_t i0 = s + 4 * lane;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (vec4 && i0 < oe) {  // (oe is a multiple of 4 too)
        const float4 q = *reinterpret_cast<const float4*>(row + i0);
        v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (i0 + j < oe) v[j] = row[i0 + j];
      }
      uint64_t w[4], lane_sum = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        w[j] = i0 + j < oe ? weight(int32_t(i0 + j), v[j]) : 0;
        lane_sum += w[j];
      }
      uint64_t incl = lane_sum;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const uint64_t o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
      }
      const uint64_t round_total = __shfl_sync(0xffffffffu, incl, 31);
      if (t < run + round_total) {  // (uniform) this round holds the target: the first lane past it walks its 4
        const unsigned past = __ballot_sync(0xffffffffu, t < run + incl);
        const int hit = __ffs(past) - 1;
        if (lane == hit) {
          uint64_t r = run + incl - lane_sum;
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (t < (r += w[j])) {
              id = int32_t(i0 + j);
              break;
            }
        }
        id = __shfl_sync(0xffffffffu, id, hit);
        break;
      }
      run += round_total;
    }
    if (lane == 0) chosen = id;
  }
  __syncthreads();
  return chosen;
}

// `ctas` CTAs a row (a cluster of them where more than one; RowCtas).
template <BinUpdates kUpdates>
__global__ void __launch_bounds__(kChooseThreads)
    choose_tokens_kernel(const float* __restrict__ logits, int64_t V, bool vec4,
                         const TokenChoice* __restrict__ choices, int32_t* __restrict__ ids, int ctas) {
  wait_then_release_dependents();
  const RowCtas rc{int(blockIdx.x % unsigned(ctas)), ctas};
  const int64_t r = blockIdx.x / unsigned(ctas);
  const float* row = logits + r * V;
  const TokenChoice c = choices[r];
  if (c.given_token >= 0) {  // a scored row: its token is given (the row's CTAs return: no barrier waits)
    if (threadIdx.x == 0 && rc.rank == 0) ids[r] = c.given_token;
    return;
  }
  __shared__ unsigned long long scratch[kChooseWarps];
  __shared__ float max_scratch[kChooseWarps];
  __shared__ SelectShared select;
  int32_t id = 0;
  float m = -INFINITY;
  const bool limit_k = c.top_k > 0 && c.top_k < V;
  if (samples(c.temperature)) {
    // The max; with top_k, its selection's first bins in the same pass (they need no weights).
    if (limit_k) clear_bins(select);
    __syncthreads();
    float mine = -INFINITY;
    BinAdder<kUpdates == BinUpdates::kAggregated> bins(select, false);
    for_each_logit(row, V, vec4, rc, [&](int32_t, float v) {
      mine = v > mine ? v : mine;
      if (limit_k) bins.add(logit_key(v) >> 24, 0);
    });
    bins.flush();
    m = row_max(mine, max_scratch, rc);  // (its barriers also complete the bins)
  }
  if (m == -INFINITY) {  // greedy, or a row of NaNs and -infs
    id = row_argmax<kChooseThreads>(row, V, vec4, rc);
    if (rc.rank != 0) id = -1;  // (rank 0 writes it)
  } else {
    const float inv = div_rn(1.0f, c.temperature);
    const uint64_t least = min_p_least(c.min_p);  // (a weight below it counts 0 in top_p's sums and the draw)
    uint64_t floor = 0;
    if (limit_k)
      floor =
          select_threshold<kUpdates>(row, V, vec4, m, inv, least, false, uint64_t(c.top_k), 1.0f, 0, true, rc, select);
    if (c.top_p < 1.0f)
      floor = select_threshold<kUpdates>(row, V, vec4, m, inv, least, true, 0, c.top_p, floor, false, rc, select);
    id = draw_token(row, V, vec4, m, inv, least, floor, c.seed, c.position, rc, scratch);
  }
  rc.sync();  // no CTA of the row leaves while another may still read its shared memory
  if (threadIdx.x == 0 && id >= 0) ids[r] = id;
}

// ---- log-probability records -------------------------------------------------------------------

// The block's sum (exact: integers), in every thread.
__device__ uint64_t block_sum(uint64_t v, unsigned long long* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kChooseWarps ? scratch[lane] : 0;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();
  return v;
}

// A row's TokenLogprobRecord (ops/token_choice.h) where its choice asks, `ctas` CTAs a row as
// choose_tokens: the max (with the first radix bins of the most likely tokens), Z1 (a sum of
// integers, so any order gives the host's), the `count` most likely tokens by choose_tokens'
// top_k selection (the keys at or above the threshold are exactly `count`: keys are unique),
// gathered (with several CTAs, rank 0 takes the others' after its own) and sorted by one thread
// (count <= 20), which writes the record. 2 passes over the row, 3 + ~3 with alternatives.
template <BinUpdates kUpdates>
__global__ void __launch_bounds__(kChooseThreads)
    token_logprobs_kernel(const float* __restrict__ logits, int64_t V, bool vec4,
                          const TokenChoice* __restrict__ choices, const int32_t* __restrict__ ids,
                          TokenLogprobRecord* __restrict__ records, int ctas) {
  wait_then_release_dependents();
  const RowCtas rc{int(blockIdx.x % unsigned(ctas)), ctas};
  const int64_t r = blockIdx.x / unsigned(ctas);
  const int32_t asked = choices[r].logprobs;
  if (asked < 0) return;  // the row's CTAs: no barrier is left waiting
  const float* row = logits + r * V;
  const int32_t count = int32_t(min(int64_t(min(asked, kMaxTokenLogprobs)), V));
  __shared__ unsigned long long scratch[kChooseWarps];
  __shared__ float max_scratch[kChooseWarps];
  __shared__ SelectShared select;
  __shared__ unsigned long long top_keys[kMaxTokenLogprobs];
  __shared__ unsigned top_found;
  __shared__ unsigned long long cta_z1;
  if (count > 0) clear_bins(select);
  if (threadIdx.x == 0) top_found = 0;
  __syncthreads();
  float mine = -INFINITY;
  BinAdder<kUpdates == BinUpdates::kAggregated> bins(select, false);
  for_each_logit(row, V, vec4, rc, [&](int32_t, float v) {
    mine = v > mine ? v : mine;
    if (count > 0) bins.add(logit_key(v) >> 24, 0);
  });
  bins.flush();
  const float m = row_max(mine, max_scratch, rc);  // (its barriers also complete the bins)
  uint64_t z = 0;
  if (m != -INFINITY) for_each_logit(row, V, vec4, rc, [&](int32_t, float v) { z += fixed_weight(v, m, 1.0f); });
  uint64_t z1 = block_sum(z, scratch);
  if (rc.ctas > 1) {  // the row's Z1: every CTA's
    if (threadIdx.x == 0) cta_z1 = z1;
    rc.sync();
    z1 = rc.sum_u64(shared_address(&cta_z1));
  }
  if (count > 0) {
    const uint64_t floor =
        select_threshold<kUpdates>(row, V, vec4, m, 1.0f, 0, false, uint64_t(count), 1.0f, 0, true, rc, select);
    for_each_logit(row, V, vec4, rc, [&](int32_t i, float v) {
      const uint64_t key = order_key(v, i);
      if (key < floor) return;
      const unsigned slot = atomicAdd(&top_found, 1u);
      if (slot < unsigned(kMaxTokenLogprobs)) top_keys[slot] = key;
    });
    __syncthreads();
    if (rc.ctas > 1) {  // rank 0 takes the other CTAs' keys after its own (count of them in all)
      rc.sync();
      if (rc.rank == 0 && threadIdx.x == 0) {
        unsigned n = min(top_found, unsigned(kMaxTokenLogprobs));
        for (int k = 1; k < rc.ctas; ++k) {
          const unsigned theirs = ld_cluster_u32(cluster_map(shared_address(&top_found), unsigned(k)));
          for (unsigned j = 0; j < theirs && n < unsigned(kMaxTokenLogprobs); ++j)
            top_keys[n++] = ld_cluster_u64(cluster_map(shared_address(&top_keys[j]), unsigned(k)));
        }
      }
    }
  }
  rc.sync();  // no CTA of the row leaves while another may still read its shared memory
  if (threadIdx.x != 0 || rc.rank != 0) return;
  TokenLogprobRecord& out = records[r];
  out.max_logit = m == 0.0f ? 0.0f : m;  // +0 for a max of zeros, as the reference
  out.count = count;
  out.z1 = m == -INFINITY ? 0 : z1;
  out.token = ids[r];
  out.token_logit = out.token >= 0 && out.token < V ? row[out.token] : NAN;
  for (int32_t j = 1; j < count; ++j) {  // descending keys: the law's order
    const unsigned long long key = top_keys[j];
    int32_t k = j;
    for (; k > 0 && top_keys[k - 1] < key; --k) top_keys[k] = top_keys[k - 1];
    top_keys[k] = key;
  }
  for (int32_t j = 0; j < count; ++j) {
    const int32_t id = key_id(top_keys[j]);
    out.ids[j] = id;
    out.logits[j] = row[id];
  }
}

// One thread an entry (Backend::penalize_logits; entries name distinct (row, token)s, so no two
// threads write one logit).
__global__ void penalize_logits_kernel(float* __restrict__ logits, int64_t R, int64_t V,
                                       const LogitPenalty* __restrict__ entries, int64_t E) {
  wait_then_release_dependents();
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const LogitPenalty p = entries[e];
  if (p.row < 0 || p.row >= R || p.token < 0 || p.token >= V) return;
  float* l = logits + int64_t(p.row) * V + p.token;
  *l = token_law::penalized(*l, p);
}

std::atomic<int> g_force_bin_updates{-1};
std::atomic<int64_t> g_bin_updates_launches[3] = {0, 0, 0};

BinUpdates bin_updates() {
  // Measured on an H100 (docs/BENCHMARKS.md, seventy-fourth to seventy-sixth sessions), 64 rows,
  // a whole bench sampling call: with a warp's keys of a bin matched and added at once, top_p 0.95
  // 1.68 ms with an atomic a key, 0.53 aggregated, 0.49-0.53 weighed passes only; top_k 50 0.14
  // aggregated, 0.11 with the counting passes atomic. With a thread's keys summed in registers
  // (4 slots; 2 slots: 0.92 ms) in the weighed passes: top_p 0.95 0.43-0.44 (1.13-1.14 at 256
  // rows against 0.88), top_k 50 0.10.
  static const BinUpdates from_env = env_is("DSV4_CUDA_CHOOSE_AGGREGATE", "0")   ? BinUpdates::kAtomic
                                     : env_is("DSV4_CUDA_CHOOSE_AGGREGATE", "1") ? BinUpdates::kAggregated
                                                                                 : BinUpdates::kAggregatedWeighed;
  const int forced = g_force_bin_updates.load(std::memory_order_relaxed);
  const BinUpdates u = forced >= 0 ? BinUpdates(forced) : from_env;
  g_bin_updates_launches[int(u)].fetch_add(1, std::memory_order_relaxed);
  return u;
}

// Calls launch(std::integral_constant<BinUpdates, form>{}) with the form bin_updates() picks:
// a kernel instance a form.
template <class Launch>
void with_bin_updates(const Launch& launch) {
  switch (bin_updates()) {
    case BinUpdates::kAtomic: launch(std::integral_constant<BinUpdates, BinUpdates::kAtomic>{}); break;
    case BinUpdates::kAggregated: launch(std::integral_constant<BinUpdates, BinUpdates::kAggregated>{}); break;
    case BinUpdates::kAggregatedWeighed:
      launch(std::integral_constant<BinUpdates, BinUpdates::kAggregatedWeighed>{});
      break;
  }
}

std::atomic<int> g_force_row_ctas{-1};
std::atomic<int64_t> g_row_ctas_launches[4] = {0, 0, 0, 0};  // by log2 of the CTAs a row

int log2_of(int ctas) { return ctas >= 8 ? 3 : ctas >= 4 ? 2 : ctas >= 2 ? 1 : 0; }

cudaLaunchConfig_t row_cluster_config(int64_t rows, int ctas, cudaStream_t stream, cudaLaunchAttribute& cluster) {
  return cluster_launch_config(dim3(unsigned(rows * ctas)), dim3(unsigned(ctas)), kChooseThreads, 0, stream, cluster);
}

// How many clusters of `ctas` CTAs of `kernel` (choose_tokens' or token_logprobs') the device can
// hold at once (cudaOccupancyMaxActiveClusters; 0 where none fits, e.g. a MIG slice without 8 SMs
// in a GPC), asked once per device, kernel and size.
int resident_row_clusters(CudaBackend& be, const void* kernel, int ctas) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int>, int> known;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(be.device_index(), kernel, ctas);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  cudaLaunchAttribute cluster;
  const cudaLaunchConfig_t cfg = row_cluster_config(1, ctas, nullptr, cluster);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // (the query's error is not the stream's)
    n = 0;
  }
  known[key] = n;
  return n;
}

// The CTAs a row of `kernel` for R rows (DSV4_CUDA_CHOOSE_CTAS: the most; default 8): the most whose
// clusters for every row are resident at once, so few rows spread each row's passes over more SMs
// and many rows (one wave of CTAs already) keep a CTA a row. Counted in g_row_ctas_launches.
int row_ctas(CudaBackend& be, int64_t R, const void* kernel) {
  static const int most = env_is("DSV4_CUDA_CHOOSE_CTAS", "1")   ? 1
                          : env_is("DSV4_CUDA_CHOOSE_CTAS", "2") ? 2
                          : env_is("DSV4_CUDA_CHOOSE_CTAS", "4") ? 4
                                                                 : kMaxRowCtas;  // (8, "dsv4 env" warns of others)
  const int forced = g_force_row_ctas.load(std::memory_order_relaxed);
  int ctas = 1;
  if (forced >= 1) {
    DSV4_CHECK(forced == 1 || resident_row_clusters(be, kernel, forced) > 0,
               "token choice: clusters of {} CTAs do not fit this device", forced);
    ctas = forced;
  } else {
    for (int c = most; c > 1 && ctas == 1; c /= 2)
      if (R <= resident_row_clusters(be, kernel, c)) ctas = c;
  }
  g_row_ctas_launches[log2_of(ctas)].fetch_add(1, std::memory_order_relaxed);
  return ctas;
}

// A launch of `kernel` over R rows, `ctas` CTAs a row (a cluster of them where more than one).
template <typename... Params, typename... Args>
void launch_rows(void (*kernel)(Params...), int64_t R, int ctas, cudaStream_t stream, Args... args) {
  if (ctas == 1) {
    kernel<<<unsigned(R), kChooseThreads, 0, stream>>>(args..., 1);
    return;
  }
  cudaLaunchAttribute cluster;
  const cudaLaunchConfig_t cfg = row_cluster_config(R, ctas, stream, cluster);
  DSV4_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args..., ctas));
}

bool rows_of_float4(const core::Tensor& logits) {
  return logits.size(1) % 4 == 0 && reinterpret_cast<uintptr_t>(logits.data()) % 16 == 0;
}

}  // namespace

void CudaBackend::do_argmax_rows(const core::Tensor& logits, const core::Tensor& ids) {
  const int64_t R = logits.size(0), V = logits.size(1);
  if (R == 0) return;
  DSV4_CHECK(V < INT32_MAX, "argmax_rows: {} columns do not fit an i32 index", V);
  argmax_rows_kernel<<<unsigned(R), kArgmaxThreads, 0, stream_>>>(logits.as<float>(), V, rows_of_float4(logits),
                                                                   ids.as<int32_t>());
  check_launch(stream_);
}

void CudaBackend::do_choose_tokens(const core::Tensor& logits, const core::Tensor& choices, const core::Tensor& ids) {
  const int64_t R = logits.size(0), V = logits.size(1);
  if (R == 0) return;
  const auto* c = reinterpret_cast<const TokenChoice*>(choices.data());
  const bool vec4 = rows_of_float4(logits);
  const auto launch = [&](auto updates) {
    const auto kernel = choose_tokens_kernel<decltype(updates)::value>;
    launch_rows(kernel, R, row_ctas(*this, R, reinterpret_cast<const void*>(kernel)), stream_, logits.as<float>(), V,
                vec4, c, ids.as<int32_t>());
  };
  with_bin_updates(launch);
  check_launch(stream_);
}

void CudaBackend::do_penalize_logits(const core::Tensor& logits, const core::Tensor& penalties) {
  const int64_t E = penalties.size(0);
  constexpr int kThreads = 256;
  penalize_logits_kernel<<<unsigned((E + kThreads - 1) / kThreads), kThreads, 0, stream_>>>(
      logits.as<float>(), logits.size(0), logits.size(1), reinterpret_cast<const LogitPenalty*>(penalties.data()), E);
  check_launch(stream_);
}

void CudaBackend::do_token_logprobs(const core::Tensor& logits, const core::Tensor& choices, const core::Tensor& ids,
                                    const core::Tensor& records) {
  const int64_t R = logits.size(0), V = logits.size(1);
  if (R == 0) return;
  const auto* c = reinterpret_cast<const TokenChoice*>(choices.data());
  auto* out = reinterpret_cast<TokenLogprobRecord*>(records.data());
  DSV4_CHECK(reinterpret_cast<uintptr_t>(out) % alignof(TokenLogprobRecord) == 0,
             "token_logprobs: records at an address not {}-byte aligned", alignof(TokenLogprobRecord));
  const auto launch = [&](auto updates) {
    const auto kernel = token_logprobs_kernel<decltype(updates)::value>;
    launch_rows(kernel, R, row_ctas(*this, R, reinterpret_cast<const void*>(kernel)), stream_, logits.as<float>(), V,
                rows_of_float4(logits), c, ids.as<int32_t>(), out);
  };
  with_bin_updates(launch);
  check_launch(stream_);
}

int64_t cuda_choose_launches(int bin_updates) {
  DSV4_CHECK(bin_updates >= 0 && bin_updates <= 2, "cuda_choose_launches: bin updates form {} is not 0..2", bin_updates);
  return g_bin_updates_launches[bin_updates].load(std::memory_order_relaxed);
}
void cuda_choose_force_bin_updates(int form) {
  DSV4_CHECK(form >= -1 && form <= 2, "cuda_choose_force_bin_updates: form {} is not -1..2", form);
  g_force_bin_updates.store(form, std::memory_order_relaxed);
}
int64_t cuda_choose_row_ctas_launches(int ctas) {
  DSV4_CHECK(ctas == 1 || ctas == 2 || ctas == 4 || ctas == 8, "cuda_choose_row_ctas_launches: {} is not 1, 2, 4 or 8",
             ctas);
  return g_row_ctas_launches[log2_of(ctas)].load(std::memory_order_relaxed);
}
void cuda_choose_force_row_ctas(int ctas) {
  DSV4_CHECK(ctas == -1 || ctas == 1 || ctas == 2 || ctas == 4 || ctas == 8,
             "cuda_choose_force_row_ctas: {} is not -1, 1, 2, 4 or 8", ctas);
  g_force_row_ctas.store(ctas, std::memory_order_relaxed);
}

}  // namespace dsv4::ops
