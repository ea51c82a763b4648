// How a logits row becomes a token: the contract of Backend::choose_tokens, which the CPU
// reference (ops/cpu/token_choice.cpp) and the CUDA kernel (ops/cuda/cuda_token_choice.cu)
// both follow to the bit, and the host sampler calls (engine/sampler.h). The law and why it
// is in integers: docs/design/token-choice.md, "Sampling on the device".
//
// Greedy (temperature <= 0, or below ~3e-39): the argmax scan (ops::ref::argmax_lowest). Sampled:
//   m      the largest logit that is not NaN (a row of NaNs and -infs is taken greedily);
//   w_i    exp((logit_i - m) * (1 / temperature)) in float (the reciprocal rounded once), from
//          IEEE operations only (token_weight), as an integer W_i = floor(w_i * 2^40): sums of
//          integers are exact in any order, so a GPU's parallel sums equal the host's loops.
//          A token whose weight is below 2^-40 of the largest (its logit ~27.7 temperatures
//          below it) has W = 0 and is never drawn; NaN and -inf logits have W = 0. Where m is
//          +inf, the +inf logits weigh 1 each and every other logit 0;
//   min_p  (> 0) keeps the tokens whose W_i >= ceil(min_p * 2^40) (min_p of the largest's W, which
//          is 2^40: vLLM's min_p on the probabilities at the temperature); from here on the others
//          weigh 0, so top_p's total, the draw and every sum below take the kept W_i only;
//   order  the larger logit first, the lower id among equal logits (+0 == -0, NaN last);
//   top_k  (0 < k < V) keeps the k first in that order;
//   top_p  (< 1) keeps the shortest prefix, in that order, of what top_k kept whose weight
//          reaches need = max(1, ceil(top_p * Z)), Z the weight top_k kept (in double);
//   draw   t = the high 64 bits of r * Z' (r the 64 random bits of (seed, position), Z' the
//          kept weight), uniform on [0, Z'); the token is the first kept id, in ascending id
//          order, whose running weight passes t.
// The kept set is a threshold on the order key below (all keys at or above one), which a
// kernel finds by radix selection without sorting; the draw's id order makes it one scan.
//
// Log-probabilities (the API's logprobs) are those of the model's distribution: the softmax
// at temperature 1, before top_k and top_p, whatever the row was sampled at (as vLLM's
// default). Backend::token_logprobs reduces a row to a TokenLogprobRecord: m, Z1 = the sum of
// the W_i at temperature 1 (an integer, so a kernel's parallel sum is the host's), the chosen
// token's logit, and the ids and logits of the n most likely tokens (the first n in the law's
// order). The host turns a record into floats (logprobs_from): log p_i = (logit_i - m) -
// ln(Z1 / 2^40) in double, rounded to float; where m is +inf, -ln(Z1 / 2^40) (each +inf logit
// weighs 1) for a +inf logit and -inf for the rest; NaN for a NaN logit and in a row without a
// logit above -inf.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/dtype.h"
#include "core/random.h"
#include "core/scalar_math.h"

namespace dsv4::ops {

// One logits row's choice (40 bytes: a tensor row of kTokenChoiceWords i32 words).
struct TokenChoice {
  float temperature = 0.0f;  // <= 0: greedy
  float top_p = 1.0f;        // (0, 1]; 1: no limit
  int32_t top_k = 0;         // 0 (or >= V): no limit
  int32_t logprobs = -1;     // Backend::token_logprobs: 0 to kMaxTokenLogprobs alternatives; -1: none
  uint64_t seed = 0;
  int64_t position = 0;      // the draw's counter: the token's position in its sequence
  // >= 0: the row's token is this one, as given, not chosen (a prompt token scored against the
  // row before it: prompt log-probabilities); the fields above but `logprobs` are then unused.
  int32_t given_token = -1;
  float min_p = 0.0f;        // [0, 1]: keeps the tokens at least min_p as likely as the most likely; 0: no limit
};
static_assert(sizeof(TokenChoice) == 40, "TokenChoice is a tensor row of 10 i32 words");
constexpr int64_t kTokenChoiceWords = 10;

// A token and its log-probability (ref::token_logprobs).
struct TokenLogprob {
  int32_t id = -1;
  float logprob = 0.0f;
};

// The most likely tokens a row's log-probabilities may list (OpenAI's top_logprobs limit).
constexpr int32_t kMaxTokenLogprobs = 20;

// What Backend::token_logprobs gives of a row whose choice asks (logprobs >= 0): everything its
// log-probabilities need (token_law::logprobs_from), exactly (184 bytes: a tensor row of
// kTokenLogprobWords i32 words).
struct TokenLogprobRecord {
  float max_logit = 0.0f;                // m: the largest logit that is not NaN (-inf if none; +0, not -0)
  int32_t count = 0;                     // alternatives listed: min(logprobs, V)
  uint64_t z1 = 0;                       // the sum of W_i at temperature 1 (0 if m is -inf)
  float token_logit = 0.0f;              // the chosen token's logit
  int32_t token = -1;
  int32_t ids[kMaxTokenLogprobs] = {};   // the `count` most likely tokens, in the law's order
  float logits[kMaxTokenLogprobs] = {};  // and their logits
};
static_assert(sizeof(TokenLogprobRecord) == 184, "TokenLogprobRecord is a tensor row of 46 i32 words");
constexpr int64_t kTokenLogprobWords = 46;

// One (row, token) of Backend::penalize_logits: the token's bias and counts in its row's
// sequence, and the row's penalties (32 bytes: a tensor row of kLogitPenaltyWords i32 words).
// The bias is OpenAI's logit_bias; the penalties are OpenAI's presence and frequency penalties,
// over the tokens generated so far, and the repetition penalty (CTRL's, as HF and vLLM apply
// it), over the prompt's and the generated tokens; a row's other tokens keep their logits.
struct LogitPenalty {
  int32_t row = 0;
  int32_t token = 0;
  int32_t output_count = 0;  // times generated so far
  int32_t in_prompt = 0;     // 1: in the prompt
  float presence = 0.0f;     // subtracted once where generated
  float frequency = 0.0f;    // subtracted a time it was generated
  float repetition = 1.0f;   // > 0; a positive logit divided by it, a negative multiplied, where seen
  float bias = 0.0f;         // added first
};
static_assert(sizeof(LogitPenalty) == 32, "LogitPenalty is a tensor row of 8 i32 words");
constexpr int64_t kLogitPenaltyWords = 8;

namespace token_law {

constexpr int kWeightBits = 40;
constexpr uint64_t kWeightOne = 1ull << kWeightBits;
constexpr uint64_t kDrawStream = 0x5a4d504cull;  // core::random_bits' stream of the draws
constexpr int64_t kMaxVocab = int64_t(1) << 23;   // V * 2^40 < 2^63

// Rounded float operations that no compiler may fuse into an fma (core/scalar_math.h; the host
// sources of the law build with -ffp-contract=off).
using core::add_rn;
using core::div_rn;
using core::mul_rn;
using core::sub_rn;

// The order key's upper half: a larger logit gives a larger key, +0 and -0 the same, NaN 0
// (below -inf's 0x007fffff). Branch-free: the signs of a row's logits are coin flips.
DSV4_HD uint32_t logit_key(float logit) {
  uint32_t u = core::float_bits(logit);
  u = u == 0x80000000u ? 0u : u;
  const uint32_t flip = uint32_t(int32_t(u) >> 31) | 0x80000000u;  // negatives: every bit; else the sign
  return logit != logit ? 0u : u ^ flip;
}
// The whole order key: descending keys are the law's order (ties to the lower id).
DSV4_HD uint64_t order_key(float logit, int32_t id) {
  return (uint64_t(logit_key(logit)) << 32) | uint64_t(~uint32_t(id));
}
DSV4_HD int32_t key_id(uint64_t key) { return int32_t(~uint32_t(key)); }

// exp(x) for x = (logit - max) * inv_temperature <= 0: x = k ln2 + f, |f| <= ln2 / 2, e^f by
// its Taylor series to f^6 (within 2e-7 of e^x), 2^k from the exponent bits; x below -87 (and
// NaN) as -87 (e^-87 ~ 1.6e-38, W = 0). Multiplies and adds only, so a host loop of it
// vectorizes.
DSV4_HD float token_weight(float logit, float max_logit, float inv_temperature) {
  float x = mul_rn(sub_rn(logit, max_logit), inv_temperature);
  x = x >= -87.0f ? x : -87.0f;
  const float t = mul_rn(x, 1.44269504f);
  const float k = sub_rn(add_rn(t, 12582912.0f), 12582912.0f);  // t rounded to an integer (|t| < 2^22)
  const float f = sub_rn(sub_rn(x, mul_rn(k, 0.693145752f)), mul_rn(k, 1.42860677e-6f));  // k * hi is exact
  float e = 1.0f / 720.0f;
  e = add_rn(mul_rn(e, f), 1.0f / 120.0f);
  e = add_rn(mul_rn(e, f), 1.0f / 24.0f);
  e = add_rn(mul_rn(e, f), 1.0f / 6.0f);
  e = add_rn(mul_rn(e, f), 0.5f);
  e = add_rn(mul_rn(e, f), 1.0f);
  e = add_rn(mul_rn(e, f), 1.0f);
  return mul_rn(e, core::bits_float(uint32_t(int32_t(k) + 127) << 23));
}

// Whether a row samples: temperature > 0 and its reciprocal finite (below ~3e-39 every weight
// but the largest's would be 0, so such a row, like temperature <= 0 or NaN, is greedy).
DSV4_HD bool samples(float temperature) { return temperature > 0.0f && div_rn(1.0f, temperature) < INFINITY; }

// A weight in units of 2^-40, truncated. Through int64 (the value is below 2^41): one
// truncating conversion on the host, where a float to uint64 conversion branches.
DSV4_HD uint64_t fixed_point(float weight) { return uint64_t(int64_t(mul_rn(weight, float(kWeightOne)))); }

// W_i. max_logit is the row's m (not NaN, not -inf).
DSV4_HD uint64_t fixed_weight(float logit, float max_logit, float inv_temperature) {
  if (max_logit == INFINITY) return logit == INFINITY ? kWeightOne : 0;
  return fixed_point(token_weight(logit, max_logit, inv_temperature));
}

// min_p's least weight: ceil(min_p * 2^40) in double, at most 2^40 (0 where min_p <= 0 or NaN).
DSV4_HD uint64_t min_p_least(float min_p) {
  if (!(min_p > 0.0f)) return 0;
  const double x = double(min_p) * double(kWeightOne);
  return x >= double(kWeightOne) ? kWeightOne : uint64_t(ceil(x));
}

// W_i as min_p leaves it: 0 below `least` (min_p_least).
DSV4_HD uint64_t kept_weight(float logit, float max_logit, float inv_temperature, uint64_t least) {
  const uint64_t w = fixed_weight(logit, max_logit, inv_temperature);
  return w >= least ? w : 0;
}

// top_p's need: max(1, ceil(top_p * total)), at most total.
DSV4_HD uint64_t top_p_need(float top_p, uint64_t total) {
  const double p = double(top_p) * double(total);
  const uint64_t need = p >= double(total) ? total : uint64_t(ceil(p));
  return need < 1 ? 1 : need;
}

// The draw's target, uniform on [0, total) (total >= 1): the high half of r * total.
DSV4_HD uint64_t draw_target(uint64_t seed, int64_t position, uint64_t total) {
  const uint64_t r = core::random_bits(seed, kDrawStream, uint64_t(position));
#if defined(__CUDA_ARCH__)
  return __umul64hi(r, total);
#else
  return uint64_t((unsigned __int128)r * total >> 64);
#endif
}

// A logit after its bias and penalties, in vLLM's order (the bias, then repetition, frequency
// and presence), each step rounded on its own (never an fma), so every backend gives the same bits.
DSV4_HD float penalized(float logit, const LogitPenalty& p) {
  float l = p.bias != 0.0f ? add_rn(logit, p.bias) : logit;
  if (p.repetition != 1.0f && (p.in_prompt != 0 || p.output_count > 0))
    l = l > 0.0f ? div_rn(l, p.repetition) : mul_rn(l, p.repetition);
  if (p.output_count > 0) l = sub_rn(sub_rn(l, mul_rn(p.frequency, float(p.output_count))), p.presence);
  return l;
}

// A record's floats (host: the logarithm in double): fills top[0, r.count) with the most likely
// tokens and theirs, and returns the chosen token's.
inline float logprobs_from(const TokenLogprobRecord& r, TokenLogprob* top) {
  const double log_z = std::log(double(r.z1)) - double(kWeightBits) * 0.69314718055994530942;
  const auto logprob = [&](float logit) -> float {
    if (r.max_logit == -INFINITY || logit != logit) return NAN;
    if (r.max_logit == INFINITY) return logit == INFINITY ? float(-log_z) : -INFINITY;
    return float((double(logit) - double(r.max_logit)) - log_z);
  };
  for (int32_t j = 0; j < r.count; ++j) top[j] = {r.ids[j], logprob(r.logits[j])};
  return logprob(r.token_logit);
}

}  // namespace token_law
}  // namespace dsv4::ops
