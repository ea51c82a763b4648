// The fixed-order fp32 block reduction of the row kernels (block_sum), and the
// compressors' RMSNorm sum of squares from values in memory (block_sum_squares).
// rms_norm_row and hc_pre_norm form their sums in the same order from bf16 rows:
// every RMSNorm on the GPU equals ref::sum_squares_as_cuda_rows bit for bit.
#pragma once

namespace dsv4::ops {

// Deterministic block sum (fixed tree: lanes by xor, then warps in order from
// zero). Every thread of the block calls it and gets the total.
__device__ inline float block_sum(float v, float* red /* [32] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += red[w];
  return total;
}

// sum v[i]^2 over [0, n) of fp32 values in shared or global memory, in
// ref::sum_squares_as_cuda_rows's order: thread t chains fused multiply-adds over
// chunks t, t + 256, ... of 8 values (of 1 where n % 8 != 0), then block_sum.
// A block of exactly 256 threads calls it.
__device__ inline float block_sum_squares(const float* v, int n, float* red /* [32] */) {
  const int vec = n % 8 == 0 ? 8 : 1;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < n / vec; c += blockDim.x)
    for (int i = 0; i < vec; ++i) ss = fmaf(v[c * vec + i], v[c * vec + i], ss);
  return block_sum(ss, red);
}

}  // namespace dsv4::ops
