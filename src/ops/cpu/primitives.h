// Scalar reference primitives of spec §2 (quantization, RoPE, Hadamard,
// Sinkhorn). Plain code in the reference's arithmetic; the CPU backend is built
// from these and the primitive tests check them against closed forms.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "core/scalar_math.h"
#include "ops/token_choice.h"

namespace dsv4::ops::ref {

// ---- activation quantization (spec §2.4, §2.5) ---------------------------------
// UE8M0 exponent of a block: ceil(log2(max(amax, floor) * (1 / format_max))).
int fp8_block_exponent(const float* x, int64_t n);  // format max 448, floor 1e-4
int fp4_block_exponent(const float* x, int64_t n);  // format max 6, floor 6 * 2^-126

// Quantizes n = blocks * block values: q receives e4m3 codes, exponents one UE8M0
// exponent per block.
void act_quant_fp8(const float* x, int64_t n, int64_t block, uint8_t* q, int* exponents);

// ---- Hopper's FP8 tensor-core dot product --------------------------------------
// sum_{k<32} a_k * b_k of e4m3 codes as one Hopper wgmma k32 (.f32 result) computes
// it, bit for bit per the MMA-Sim model (Xie et al., arXiv:2511.10909): exact
// products, all aligned to the largest product exponent and truncated toward zero
// to 13 fractional bits below it, summed exactly, the sum truncated to 14
// significant bits. The CUDA backend's FP8 and FP4 GEMMs run on this instruction; the
// CPU backend can model it (make_cpu_backend, QuantDotModel::kHopperWgmma).
float hopper_e4m3_dot32(const uint8_t* a, const uint8_t* b);
// c + sum_{k<32} a_k * b_k as one such k32 step onto an fp32 accumulator c (wgmma
// with scale-d 1), bit for bit: c joins the alignment (the largest exponent is taken
// over c's and the products'), c truncated toward zero like the products to 13
// fractional bits below it, the sum exact, then truncated to 14 significant bits.
// Measured on an H200 against 9 x 32768 outputs of one and of four chained steps
// (CudaMma.E4m3StepsWithAnAccumulator): codes of every exponent, accumulators from
// 2^-30 to 2^30 times the products, cancelling ones. hopper_e4m3_step(0, a, b) is
// hopper_e4m3_dot32(a, b). The FP8 GEMMs chain a 128-wide stage's four steps from
// zero in the tensor core (linear_kernels.cuh). Finite inputs only.
float hopper_e4m3_step(float c, const uint8_t* a, const uint8_t* b);

// ---- Hopper's bf16 tensor-core step -----------------------------------------------
// c + sum_{k<16} a_k * b_k of bf16 values as one Hopper k16 step (wgmma m64nNk16 or
// mma.sync m16n8k16, .f32 accumulator) computes it, per MMA-Sim (Xie et al.,
// arXiv:2511.10909, T-FDPA with F = 25, RZ to fp32; the same parameters in Khattak &
// Mikaitis, arXiv:2512.07004): exact products with exponents e_a + e_b (significands
// in [1, 4)), the accumulator c joining the alignment, every term truncated toward
// zero 25 fractional bits below the largest exponent (zero terms count as 2^-126),
// the sum exact, then truncated toward zero to fp32. A longer K chains steps with
// the result as the next c. Non-finite inputs give the IEEE sum's class (NaN as
// 0x7fffffff); an exact zero sum gives +0.
float hopper_bf16_mma16(float c, const uint16_t* a, const uint16_t* b);
// c chained through hopper_bf16_mma16 over k values (k a multiple of 16).
float hopper_bf16_dot(float c, const uint16_t* a, const uint16_t* b, int64_t k);

// The e4m3 code of 2^-6 x an e2m1 value (exact: the nibble's bits placed in the
// e4m3 exponent and mantissa), the form the CUDA FP4 GEMM feeds the tensor core.
inline uint8_t e2m1_to_e4m3_div64(uint8_t nibble) {
  return uint8_t(((nibble & 8) << 4) | ((nibble & 7) << 2));
}

// In-place QAT simulation on bf16 values: x <- bf16(float(e4m3(clamp(x/s))) * s),
// block by block (spec §2.4, "in-place variant").
void fp8_sim_bf16(uint16_t* x, int64_t n, int64_t block);
// Same with e2m1 and blocks of 32 (spec §2.5).
void fp4_sim_bf16(uint16_t* x, int64_t n, int64_t block);

// ---- RMSNorm (spec §2.1) -------------------------------------------------------
// y = bf16(w * (x * rsqrt(mean(x^2) + eps))) in fp32. The sum of squares runs in the
// CUDA row norm's order (sum_squares_as_cuda_rows), the rest is the same IEEE sequence.
void rms_norm_bf16(const uint16_t* x, const uint16_t* w, int64_t n, float eps, uint16_t* y);
// sum of v[i]^2 in the order of the CUDA row norm (rms_norm_row, 256 threads): thread c
// chains fused multiply-adds over its chunks c, c + 256, ... of 8 values (of 1 value
// when n % 8 != 0), each warp adds its 32 partials by an xor butterfly (offsets 16, 8,
// 4, 2, 1; lane 0's sum), and the 8 warp sums are added in order from zero.
float sum_squares_as_cuda_rows(const float* v, int64_t n);

// The per-head Q norm's sum (spec §5.1, weight-less, in bf16 arithmetic): the
// bf16-rounded squares summed in fp32 in a fixed parallel order, element i into
// partial i mod 32 (each partial in index order), then the partials pairwise,
// p[l] + p[l + 16], then + 8, 4, 2, 1. One warp's xor-shuffle butterfly gives
// exactly this, so the GPU matches it bit for bit without a 512-long chain.
float sum_bf16_squares_lanes32(const uint16_t* x, int64_t n);

// ---- RoPE (spec §2.3) --------------------------------------------------------
// Rotates the interleaved pairs (2i, 2i+1) of a bf16 slice of length 2*half by
// angle(pos, i) = fp32(pos * inv_freq[i]); inverse rotates by the conjugate.
void rope_bf16(uint16_t* slice, int64_t half, const float* inv_freq, int64_t pos, bool inverse);

// ---- Hadamard (spec §2.6) ----------------------------------------------------
// x <- bf16(H_n x * n^-1/2) on a bf16 vector, n a power of two.
void hadamard_bf16(uint16_t* x, int64_t n);

// ---- Sinkhorn (spec §4.1) ----------------------------------------------------
// comb [hc*hc] row-major logits -> doubly (approximately) stochastic matrix:
// row softmax + eps, column normalisation, then iters-1 (row, column) passes.
void sinkhorn(float* comb, int64_t hc, int64_t iters, float eps);

// The CUDA kernels call the same definitions (core/scalar_math.h).
inline float sigmoid(float x) { return core::sigmoid_f32(x); }
inline float silu(float x) { return core::silu_f32(x); }
// torch.nn.functional.softplus with its default threshold of 20.
inline float softplus(float x) { return core::softplus_f32(x); }

// ---- token choice --------------------------------------------------------------
// The greedy token of a logits row: a scan from column 0 that moves only to a strictly
// larger value (the lowest id among equal maxima; NaNs never win, one in column 0 gives 0).
// Backend::argmax_rows's contract; the sampler's greedy draw.
int32_t argmax_lowest(const float* logits, int64_t n);
// Backend::penalize_logits's contract: logits [R, V], entries in order (skipping those outside
// the rows and columns).
void penalize_logits(float* logits, int64_t R, int64_t V, const LogitPenalty* entries, int64_t E);
// The token the law of ops/token_choice.h chooses from a row of n logits (n <= 2^23):
// Backend::choose_tokens's contract, a row at a time. Thread-safe.
int32_t choose_token(const float* logits, int64_t n, const TokenChoice& choice);
// A row's log-probability record by the law of ops/token_choice.h, with the `alternatives`
// most likely tokens (capped at kMaxTokenLogprobs and n): Backend::token_logprobs's contract,
// a row at a time. Thread-safe.
TokenLogprobRecord token_logprob_record(const float* logits, int64_t n, int32_t token, int32_t alternatives);
// The same as floats (token_law::logprobs_from): returns token's (NaN for an id outside [0, n))
// and fills top[0, min(top_n, kMaxTokenLogprobs, n)) with the most likely tokens and theirs.
float token_logprobs(const float* logits, int64_t n, int32_t token, TokenLogprob* top, int32_t top_n);

}  // namespace dsv4::ops::ref
