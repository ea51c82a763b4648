// Offline generation for a fixed set of prompts (the `dsv4 generate` job):
// chunked prefill packed into steps, then batched decode of every sequence.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "engine/kv_pool.h"
#include "engine/model_runner.h"
#include "engine/sampler.h"

namespace dsv4::engine {

struct GenerateRequest {
  std::vector<int32_t> prompt;
  int32_t max_new_tokens = 16;
  SamplingParams sampling;
};

struct GenerateOptions {
  int32_t prefill_chunk = 256;  // tokens of one prompt per step
};

// Called for every generated token with the logits row it was chosen from
// (i = 0 is the row of the last prompt position).
using LogitsObserver = std::function<void(int seq, int i, const float* logits, int32_t token)>;

// Generates exactly max_new_tokens per request (EOS does not stop offline
// generation, so outputs have fixed shapes). Releases every slot and page.
std::vector<std::vector<int32_t>> generate(ModelRunner& runner, IndexPool& slots, IndexPool& pages,
                                           const std::vector<GenerateRequest>& requests,
                                           const GenerateOptions& options, const LogitsObserver& observer = {});

}  // namespace dsv4::engine
