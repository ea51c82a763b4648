// A generation request as the engine tracks it: tokens, cache state, output
// callback, timestamps. Owned by the engine; the server only submits and cancels.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine/sampler.h"

namespace dsv4::engine {

// The most alternatives a token's log-probabilities may list (OpenAI's top_logprobs limit, and
// vLLM's default max_logprobs).
constexpr int32_t kMaxLogprobs = ops::kMaxTokenLogprobs;

enum class FinishReason { kNone, kLength, kStop, kCancelled, kError };
const char* finish_reason_name(FinishReason reason);  // "length", "stop", ...

struct RequestParams {
  std::vector<int32_t> prompt;
  int32_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<int32_t> stop_token_ids;  // besides EOS
  bool ignore_eos = false;
  // vLLM's min_tokens: EOS (unless ignore_eos) and the stop_token_ids are not chosen before this
  // many tokens (their logits -inf in those rows); the serve layer matches no stop string before it.
  int32_t min_tokens = 0;
  bool return_logits = false;  // token events carry the logits row they were sampled from
  // 0 to kMaxLogprobs: token events carry the token's log-probability and those of the
  // `logprobs` most likely tokens (ops/token_choice.h's law: the model's softmax, before
  // temperature, top_k and top_p); -1: none.
  int32_t logprobs = -1;
  // 0 to kMaxLogprobs: the first token's event carries the same for every prompt token after
  // the first, each scored against the rows before it (what evaluation harnesses send as
  // `echo` with `logprobs`); -1: none. Each scored row is a logits row of its step.
  int32_t prompt_logprobs = -1;
};

// A prompt token's log-probability given the tokens before it, and those of the most likely
// tokens in its place (RequestParams::prompt_logprobs of them).
struct PromptTokenLogprob {
  int32_t token = -1;
  float logprob = 0.0f;
  std::vector<ops::TokenLogprob> top;
};

// One event per generated token; the last event of a request has finished set
// (and may carry no token when the request ends without one: cancel, error).
struct TokenEvent {
  int64_t request_id = 0;
  int32_t token = -1;
  bool finished = false;
  FinishReason reason = FinishReason::kNone;
  std::string error;
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  // With RequestParams::return_logits: the row [vocab] the token was chosen from,
  // valid during the callback only.
  const float* logits = nullptr;
  int64_t vocab = 0;
  // With RequestParams::logprobs >= 0: the token's log-probability, and the most likely
  // tokens' in order (RequestParams::logprobs of them).
  float logprob = 0.0f;
  std::vector<ops::TokenLogprob> top_logprobs;
  // With RequestParams::prompt_logprobs >= 0, on the first token's event only: prompt tokens
  // 1 .. num_prompt - 1's, in order (the first token has none).
  std::vector<PromptTokenLogprob> prompt_logprobs;
};

using TokenCallback = std::function<void(const TokenEvent&)>;
using Clock = std::chrono::steady_clock;

struct Request {
  int64_t id = 0;
  RequestParams params;
  TokenCallback on_token;
  std::vector<int32_t> tokens;  // prompt then generated
  int32_t num_prompt = 0;
  int32_t num_computed = 0;     // leading tokens whose state is in the caches
  int32_t slot = -1;            // state slot while admitted
  std::vector<int32_t> pages;   // pages of compressed rows while admitted
  int32_t num_preemptions = 0;
  // RequestParams::prompt_logprobs: prompt tokens 1 .. num_prompt_scored's, kept until the
  // first token's event takes them (a recomputation after preemption does not score again).
  std::vector<PromptTokenLogprob> prompt_logprobs;
  int32_t num_prompt_scored = 0;
  // SamplingParams::penalized: each token seen so far, once, with the times it was generated
  // and whether the prompt holds it (filled on the first penalized step, then kept up).
  std::unordered_map<int32_t, std::pair<int32_t, bool>> seen_tokens;
  int32_t num_seen = 0;  // tokens of `tokens` counted into seen_tokens
  std::atomic<bool> cancelled{false};
  bool finished = false;
  Clock::time_point arrival, first_token, last_token;

  int32_t num_generated() const { return int32_t(tokens.size()) - num_prompt; }
  // Tokens still to run before the next token can be sampled.
  int32_t num_pending() const { return int32_t(tokens.size()) - num_computed; }
  // The rows a slice of `n` tokens from num_computed must return for prompt log-probabilities:
  // the row at position p scores prompt token p + 1, for p from num_prompt_scored to
  // num_prompt - 2 (a slice that holds one returns all its rows).
  bool slice_scores_prompt(int32_t n) const {
    return params.prompt_logprobs >= 0 && num_prompt_scored < num_prompt - 1 && num_computed < num_prompt - 1 &&
           num_computed + n > num_prompt_scored;
  }
};

}  // namespace dsv4::engine
