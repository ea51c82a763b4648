// The one metadata builder (DESIGN.md §3): from a slice of requests it builds the
// per-token and per-sequence arrays every stateful op reads. Non-TBO steps use it
// once; two-batch overlap calls the same function on each micro-batch's slice.
#pragma once

#include <cstdint>
#include <vector>

#include "ops/batch.h"

namespace dsv4::engine {

// One request's share of a step: `tokens` at positions start_pos.. .
struct SequenceSlice {
  int32_t state_slot = -1;
  int32_t start_pos = 0;
  const int32_t* tokens = nullptr;
  int32_t num_tokens = 0;
  const std::vector<int32_t>* block_table = nullptr;  // pages of compressed rows, in order
  bool want_logits = false;                           // logits of the slice's last token
  bool want_all_logits = false;                       // logits of every token (tests, scoring)
};

struct StepMetadata {
  std::vector<int32_t> token_ids, positions, token_seq;        // per token row
  std::vector<int32_t> seq_begin, seq_len, seq_start_pos, seq_slot;  // per sequence
  std::vector<int32_t> block_table;                            // [num_seqs, max_blocks], -1 padded
  int32_t max_blocks = 0;
  std::vector<int32_t> logit_rows;                             // token rows whose logits are wanted

  int32_t num_tokens() const { return int32_t(token_ids.size()); }
  int32_t num_seqs() const { return int32_t(seq_begin.size()); }
  int32_t max_seq_len() const;  // the longest sequence's tokens (0 without sequences)
  // A view with host pointers into this object.
  ops::BatchView host_view() const;
};

struct MetadataPadding {
  int32_t rows = 0;        // append pad rows (position -1, token 0, sequence -1) up to this many
  int32_t seqs = 0;        // append empty sequences (length 0) up to this many ...
  int32_t pad_slot = -1;   // ... that point at this (reserved) state slot
  int32_t max_blocks = 0;  // fixed block-table stride (0: the longest slice's)
};

// Rows of each slice are contiguous and in slice order. CUDA graphs replay a
// bucket with fixed shapes: `padding` makes every array that size.
StepMetadata build_step_metadata(const std::vector<SequenceSlice>& slices, const MetadataPadding& padding = {});

}  // namespace dsv4::engine
