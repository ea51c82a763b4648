#include <gtest/gtest.h>

#include "core/error.h"
#include "engine/kv_pool.h"
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

}  // namespace
}  // namespace dsv4::engine
