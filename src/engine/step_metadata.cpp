#include "engine/step_metadata.h"

#include <algorithm>

#include "core/error.h"
#include "ops/batch.h"

namespace dsv4::engine {

ops::BatchView StepMetadata::host_view() const {
  ops::BatchView v;
  v.num_tokens = num_tokens();
  v.num_seqs = num_seqs();
  v.max_blocks = max_blocks;
  v.max_seq_len = max_seq_len();
  v.token_ids = token_ids.data();
  v.positions = positions.data();
  v.token_seq = token_seq.data();
  v.seq_begin = seq_begin.data();
  v.seq_len = seq_len.data();
  v.seq_start_pos = seq_start_pos.data();
  v.seq_slot = seq_slot.data();
  v.block_table = block_table.data();
  return v;
}

int32_t StepMetadata::max_seq_len() const {
  return seq_len.empty() ? 0 : *std::max_element(seq_len.begin(), seq_len.end());
}

StepMetadata build_step_metadata(const std::vector<SequenceSlice>& slices, const MetadataPadding& padding) {
  StepMetadata m;
  for (const auto& s : slices) {
    DSV4_CHECK(s.block_table != nullptr, "sequence slice without a block table");
    m.max_blocks = std::max(m.max_blocks, int32_t(s.block_table->size()));
  }
  m.max_blocks = std::max(m.max_blocks, 1);
  if (padding.max_blocks > 0) {
    DSV4_CHECK(m.max_blocks <= padding.max_blocks, "a slice holds {} pages, the fixed stride is {}", m.max_blocks,
               padding.max_blocks);
    m.max_blocks = padding.max_blocks;
  }
  for (size_t i = 0; i < slices.size(); ++i) {
    const SequenceSlice& s = slices[i];
    DSV4_CHECK(s.num_tokens > 0 && s.state_slot >= 0 && s.start_pos >= 0,
               "slice {}: {} tokens, slot {}, start {}", i, s.num_tokens, s.state_slot, s.start_pos);
    const int64_t needed_pages = (int64_t(s.start_pos) + s.num_tokens + ops::kPageTokens - 1) / ops::kPageTokens;
    DSV4_CHECK(int64_t(s.block_table->size()) >= needed_pages,
               "slice {} reaches position {} but holds only {} pages", i, s.start_pos + s.num_tokens - 1,
               s.block_table->size());
    m.seq_begin.push_back(m.num_tokens());
    m.seq_len.push_back(s.num_tokens);
    m.seq_start_pos.push_back(s.start_pos);
    m.seq_slot.push_back(s.state_slot);
    for (int32_t t = 0; t < s.num_tokens; ++t) {
      if (s.want_all_logits || (s.want_logits && t == s.num_tokens - 1)) m.logit_rows.push_back(m.num_tokens());
      m.token_ids.push_back(s.tokens[t]);
      m.positions.push_back(s.start_pos + t);
      m.token_seq.push_back(int32_t(i));
    }
    for (int32_t b = 0; b < m.max_blocks; ++b)
      m.block_table.push_back(b < int32_t(s.block_table->size()) ? (*s.block_table)[size_t(b)] : -1);
  }
  while (m.num_tokens() < padding.rows) {
    m.token_ids.push_back(0);
    m.positions.push_back(-1);
    m.token_seq.push_back(-1);
  }
  while (m.num_seqs() < padding.seqs) {
    DSV4_CHECK(padding.pad_slot >= 0, "padding sequences need a reserved state slot");
    m.seq_begin.push_back(m.num_tokens());
    m.seq_len.push_back(0);
    m.seq_start_pos.push_back(0);
    m.seq_slot.push_back(padding.pad_slot);
    for (int32_t b = 0; b < m.max_blocks; ++b) m.block_table.push_back(-1);
  }
  return m;
}

}  // namespace dsv4::engine
