// Token choice from a logits row, as a request asks for it. The law is the ops layer's
// (ops/token_choice.h: greedy is the argmax with ties to the lowest id; a sampled row draws
// from its weights in integers, keyed by (request seed, position), so a token never depends
// on the batch, the rank or the backend that chose it). Serving and offline generation choose
// on the backend (Backend::choose_tokens, through ModelRunner::step_tokens); sample_token is
// the host reference, for a row already on the host (tests, bench sampling). Thread-safe.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "ops/cpu/primitives.h"
#include "ops/token_choice.h"

namespace dsv4::engine {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;
  int32_t top_k = 0;         // 0: no limit
  float min_p = 0.0f;        // [0, 1]: no token less likely than min_p times the most likely is drawn; 0: no limit
  uint64_t seed = 0;
  // Applied to the logits before the choice (ops::token_law::penalized): OpenAI's presence and
  // frequency penalties over the generated tokens, the repetition penalty over the prompt's and
  // the generated tokens. Neutral: 0, 0, 1.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  // OpenAI's logit_bias: (token, bias) pairs, tokens distinct, added to the logits first.
  std::vector<std::pair<int32_t, float>> logit_bias;
  bool penalized() const {
    return presence_penalty != 0.0f || frequency_penalty != 0.0f || repetition_penalty != 1.0f ||
           !logit_bias.empty();
  }
};

using ops::ref::argmax_lowest;  // greedy: the reference scan (ops/cpu/primitives.h)

// The choice of the token at `position` (its index in the sequence: the draw's counter).
ops::TokenChoice token_choice(const SamplingParams& params, int64_t position);
int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& params, int64_t position);

}  // namespace dsv4::engine
