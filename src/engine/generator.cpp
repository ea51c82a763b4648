#include "engine/generator.h"

#include <algorithm>

#include "core/error.h"

namespace dsv4::engine {

namespace {

struct Sequence {
  const GenerateRequest* request = nullptr;
  std::vector<int32_t> tokens;  // prompt then generated
  int32_t prefilled = 0;        // prompt tokens already in the caches
  int32_t slot = -1;
  std::vector<int32_t> pages;
  std::vector<int32_t> generated;
};

}  // namespace

std::vector<std::vector<int32_t>> generate(ModelRunner& runner, IndexPool& slots, IndexPool& pages,
                                           const std::vector<GenerateRequest>& requests,
                                           const GenerateOptions& options, const LogitsObserver& observer) {
  const auto& config = runner.model().config();
  const RunnerOptions& ro = runner.options();
  const int64_t V = config.vocab_size;
  std::vector<Sequence> seqs(requests.size());
  struct Release {
    std::vector<Sequence>& seqs;
    IndexPool& slots;
    IndexPool& pages;
    ~Release() {
      for (auto& s : seqs) {
        if (s.slot >= 0) slots.release(s.slot);
        pages.release(s.pages);
      }
    }
  } release{seqs, slots, pages};

  for (size_t i = 0; i < requests.size(); ++i) {
    const GenerateRequest& r = requests[i];
    if (r.prompt.empty()) core::fail("prompt {} is empty", i);
    if (r.max_new_tokens < 1) core::fail("prompt {}: max_new_tokens must be at least 1", i);
    for (int32_t t : r.prompt)
      if (t < 0 || t >= V) core::fail("prompt {}: token id {} is outside the vocabulary [0, {})", i, t, V);
    const int64_t total = int64_t(r.prompt.size()) + r.max_new_tokens - 1;  // the last token is never fed back
    if (total > config.max_position_embeddings)
      core::fail("prompt {}: {} prompt + {} new tokens exceed max_position_embeddings = {}", i, r.prompt.size(),
                 r.max_new_tokens, config.max_position_embeddings);
    if (pages_for_positions(total) > ro.max_blocks_per_seq)
      core::fail("prompt {}: {} positions need {} pages, the runner allows {} per sequence", i, total,
                 pages_for_positions(total), ro.max_blocks_per_seq);
    Sequence& s = seqs[i];
    s.request = &r;
    s.tokens = r.prompt;
    s.slot = slots.allocate();
    if (s.slot < 0 || !pages.allocate(pages_for_positions(total), &s.pages))
      core::fail("not enough cache for {} sequences of up to {} tokens (state slots {}, pages {})", requests.size(),
                 total, slots.capacity(), pages.capacity());
  }

  // A step, its tokens chosen on the backend as serving chooses them (ModelRunner::step_tokens:
  // only ids cross to the host, and the logits rows only for an observer), each given to its
  // sequence. The new token's position (the draw's counter) is the sequence's length.
  std::vector<ops::TokenChoice> choices;
  std::vector<int32_t> tokens, rows;
  const auto run_step = [&](const std::vector<SequenceSlice>& slices, const std::vector<size_t>& owners) {
    choices.clear();
    rows.clear();
    for (size_t k = 0; k < slices.size(); ++k)
      if (slices[k].want_logits) {
        const Sequence& s = seqs[owners[k]];
        rows.push_back(int32_t(choices.size()));
        choices.push_back(token_choice(s.request->sampling, int64_t(s.tokens.size())));
      }
    const float* logits =
        runner.step_tokens(build_step_metadata(slices), choices, &tokens, observer ? rows : std::vector<int32_t>{});
    size_t row = 0;
    for (size_t k = 0; k < slices.size(); ++k) {
      if (!slices[k].want_logits) continue;
      Sequence& s = seqs[owners[k]];
      const int32_t token = tokens[row];
      if (observer) observer(int(owners[k]), int(s.generated.size()), logits + row * size_t(V), token);
      s.generated.push_back(token);
      s.tokens.push_back(token);
      ++row;
    }
  };

  // Prefill: pack prompt chunks into steps.
  for (;;) {
    std::vector<SequenceSlice> slices;
    std::vector<size_t> owners;
    int32_t budget = ro.max_tokens_per_step;
    for (size_t i = 0; i < seqs.size() && budget > 0 && int32_t(slices.size()) < ro.max_seqs_per_step; ++i) {
      Sequence& s = seqs[i];
      const int32_t left = int32_t(s.request->prompt.size()) - s.prefilled;
      if (left == 0) continue;
      const int32_t n = std::min({left, options.prefill_chunk, budget});
      SequenceSlice slice;
      slice.state_slot = s.slot;
      slice.start_pos = s.prefilled;
      slice.tokens = s.tokens.data() + s.prefilled;
      slice.num_tokens = n;
      slice.block_table = &s.pages;
      slice.want_logits = n == left;
      slices.push_back(slice);
      owners.push_back(i);
      budget -= n;
    }
    if (slices.empty()) break;
    run_step(slices, owners);
    for (size_t k = 0; k < slices.size(); ++k) seqs[owners[k]].prefilled += slices[k].num_tokens;
  }
  // Decode: every unfinished sequence feeds its last token.
  for (;;) {
    std::vector<SequenceSlice> slices;
    std::vector<size_t> owners;
    for (size_t i = 0; i < seqs.size() && int32_t(slices.size()) < std::min(ro.max_seqs_per_step, ro.max_tokens_per_step); ++i) {
      Sequence& s = seqs[i];
      if (int32_t(s.generated.size()) >= s.request->max_new_tokens) continue;
      SequenceSlice slice;
      slice.state_slot = s.slot;
      slice.start_pos = int32_t(s.tokens.size()) - 1;
      slice.tokens = &s.tokens.back();
      slice.num_tokens = 1;
      slice.block_table = &s.pages;
      slice.want_logits = true;
      slices.push_back(slice);
      owners.push_back(i);
    }
    if (slices.empty()) break;
    run_step(slices, owners);
  }
  std::vector<std::vector<int32_t>> out;
  for (auto& s : seqs) out.push_back(s.generated);
  return out;
}

}  // namespace dsv4::engine
