#include <gtest/gtest.h>

#include "core/error.h"
#include "engine/kv_pool.h"
#include "engine/scheduler.h"
#include "engine/step_metadata.h"

namespace dsv4::engine {
namespace {

TEST(StepMetadata, RowsAreContiguousPerSequenceWithPadding) {
  std::vector<int32_t> t0 = {5, 6, 7}, t1 = {9};
  std::vector<int32_t> p0 = {3}, p1 = {1, 2};
  SequenceSlice a{2, 10, t0.data(), 3, &p0, true, false};
  SequenceSlice b{0, 300, t1.data(), 1, &p1, true, false};
  MetadataPadding pad;
  pad.rows = 6;
  StepMetadata m = build_step_metadata({a, b}, pad);
  EXPECT_EQ(m.token_ids, (std::vector<int32_t>{5, 6, 7, 9, 0, 0}));
  EXPECT_EQ(m.positions, (std::vector<int32_t>{10, 11, 12, 300, -1, -1}));
  EXPECT_EQ(m.token_seq, (std::vector<int32_t>{0, 0, 0, 1, -1, -1}));
  EXPECT_EQ(m.seq_begin, (std::vector<int32_t>{0, 3}));
  EXPECT_EQ(m.seq_slot, (std::vector<int32_t>{2, 0}));
  EXPECT_EQ(m.max_blocks, 2);
  EXPECT_EQ(m.block_table, (std::vector<int32_t>{3, -1, 1, 2}));
  EXPECT_EQ(m.logit_rows, (std::vector<int32_t>{2, 3}));
  EXPECT_EQ(m.max_seq_len(), 3);  // the launches' bound on a sequence's tokens
  EXPECT_EQ(m.host_view().max_seq_len, 3);
  EXPECT_EQ(StepMetadata{}.max_seq_len(), 0);
  pad.seqs = 4;
  pad.pad_slot = 9;
  pad.max_blocks = 3;
  StepMetadata g = build_step_metadata({a, b}, pad);
  EXPECT_EQ(g.seq_len, (std::vector<int32_t>{3, 1, 0, 0}));
  EXPECT_EQ(g.seq_slot, (std::vector<int32_t>{2, 0, 9, 9}));
  EXPECT_EQ(g.block_table.size(), 12u);
  EXPECT_EQ(g.block_table[3], 1);
}

TEST(StepMetadata, RejectsSlicesBeyondTheirPages) {
  std::vector<int32_t> t = {1, 2};
  std::vector<int32_t> pages = {0};
  SequenceSlice s{0, 255, t.data(), 2, &pages, false, false};  // reaches position 256: needs 2 pages
  EXPECT_THROW(build_step_metadata({s}), core::Error);
}

TEST(IndexPool, AllocatesAllOrNothingAndTracksUse) {
  IndexPool p(4);
  std::vector<int32_t> got;
  EXPECT_TRUE(p.allocate(3, &got));
  EXPECT_FALSE(p.allocate(2, &got));
  EXPECT_EQ(got.size(), 3u);
  EXPECT_EQ(p.num_free(), 1);
  p.release(got);
  EXPECT_EQ(p.num_used(), 0);
  EXPECT_THROW(p.release(1), core::Error);
  EXPECT_EQ(pages_for_positions(256), 1);
  EXPECT_EQ(pages_for_positions(257), 2);
}

// A prompt being scored (RequestParams::prompt_logprobs) takes the logits rows left after a row
// for every other sequence the step may hold (max_logit_rows less max_num_seqs - 1), every one
// of its rows a logits row, and the step never holds more; a prompt that asks for nothing takes
// one row where it ends, also when it comes after the scoring one.
TEST(Scheduler, ScoringChunksTakeTheLogitsRowsLeft) {
  IndexPool slots(8), pages(16);
  SchedulerConfig sc;
  sc.max_num_seqs = 4;
  sc.max_num_batched_tokens = 256;
  sc.prefill_chunk = 64;
  sc.max_logit_rows = 8;
  Scheduler sched(sc, slots, pages);
  std::vector<std::shared_ptr<Request>> reqs;
  for (int i = 0; i < 4; ++i) {
    auto r = std::make_shared<Request>();
    r->id = i;
    r->params.prompt = std::vector<int32_t>(i == 2 ? 50 : 1, 7);
    r->params.prompt_logprobs = i == 2 ? 1 : -1;
    r->params.max_tokens = 100;
    r->tokens = r->params.prompt;
    r->num_prompt = int32_t(r->tokens.size());
    reqs.push_back(r);
    sched.add(r);
  }
  int32_t scored = 0;
  for (int step = 0; step < 12 && scored < 49; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    ScheduledStep s = sched.schedule();
    ASSERT_EQ(s.slices.size(), 4u);
    int32_t rows = 0;
    for (size_t k = 0; k < s.slices.size(); ++k) {
      const SequenceSlice& slice = s.slices[k];
      rows += slice.want_all_logits ? slice.num_tokens : slice.want_logits ? 1 : 0;
      if (s.requests[k]->id != 2) {
        EXPECT_FALSE(slice.want_all_logits);
        EXPECT_EQ(slice.num_tokens, 1);
        continue;
      }
      // The other three take a row each: 5 are left for the scoring chunk.
      EXPECT_TRUE(slice.want_all_logits);
      EXPECT_EQ(slice.start_pos, scored);
      EXPECT_EQ(slice.num_tokens, std::min(5, 50 - scored));
      EXPECT_EQ(slice.want_logits, scored + slice.num_tokens == 50);
    }
    EXPECT_EQ(rows, s.num_logit_rows);
    EXPECT_LE(rows, 8);
    StepMetadata m = build_step_metadata(s.slices);
    EXPECT_EQ(int32_t(m.logit_rows.size()), rows);
    sched.commit(s);
    // What the engine does after the step: the scored rows counted, a token for each row that ended.
    for (size_t k = 0; k < s.slices.size(); ++k) {
      Request& r = *s.requests[k];
      if (s.slices[k].want_all_logits) r.num_prompt_scored = std::min(r.num_computed, r.num_prompt - 1);
      if (s.slices[k].want_logits) r.tokens.push_back(3);
    }
    scored = reqs[2]->num_prompt_scored;
  }
  EXPECT_EQ(scored, 49);
  // Scored: its next slices return one row, as any other.
  ScheduledStep s = sched.schedule();
  for (const SequenceSlice& slice : s.slices) EXPECT_FALSE(slice.want_all_logits);
  EXPECT_EQ(s.num_logit_rows, 4);
  EXPECT_THROW(Scheduler(SchedulerConfig{4, 64, 64, 1024, 3}, slots, pages), core::Error);  // below max_num_seqs
}

}  // namespace
}  // namespace dsv4::engine
