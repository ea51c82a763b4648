// What the stateful ops know about a step: which token rows belong to which
// sequence, at which positions, and where each sequence's state lives. Built by
// the one metadata builder (engine/step_metadata.h); the pointers are on the
// backend's device.
#pragma once

#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace dsv4::ops {

// Compressed rows are paged in blocks of this many tokens: 64 CSA rows, 2 HCA
// rows and 64 indexer rows per layer per page (a multiple of lcm(4, 128)).
inline constexpr int64_t kPageTokens = 256;

struct BatchView {
  int32_t num_tokens = 0;  // rows of the activation buffers (pad rows included)
  int32_t num_seqs = 0;
  int32_t max_blocks = 0;  // row stride of block_table
  // No sequence has more tokens in this step (host; 0: not known, num_tokens bounds it).
  // Lets a launch size its grid to the step (a decode step: 1). A graph replays its
  // capture's value, so a runner captures only steps whose replays share the bound.
  int32_t max_seq_len = 0;
  const int32_t* token_ids = nullptr;      // [num_tokens]
  const int32_t* positions = nullptr;      // [num_tokens]; -1 marks a pad row
  const int32_t* token_seq = nullptr;      // [num_tokens] sequence index; -1 for pad rows
  const int32_t* seq_begin = nullptr;      // [num_seqs] first token row of the sequence
  const int32_t* seq_len = nullptr;        // [num_seqs] tokens of the sequence in this step
  const int32_t* seq_start_pos = nullptr;  // [num_seqs] position of its first token in this step
  const int32_t* seq_slot = nullptr;       // [num_seqs] state slot: window rings, compressor states
  const int32_t* block_table = nullptr;    // [num_seqs, max_blocks] pages of compressed rows
};

// One layer's per-sequence state, in the backend's own storage format (the CPU
// keeps bf16 rows; CUDA keeps 584-byte FP8 rows). Tensors a layer type does not
// use are left undefined.
struct LayerCache {
  int64_t ratio = 0;
  core::Tensor window;             // ring of the last W KV rows per slot
  core::Tensor rows;               // compressed KV rows, [pages, kPageTokens / ratio, ...]
  core::Tensor index_rows;         // CSA indexer K rows, [pages, kPageTokens / 4, ...]
  core::Tensor kv_state;           // compressor state f32 [slots, c*m, c*d]
  core::Tensor score_state;
  core::Tensor index_kv_state;     // indexer compressor state f32 [slots, 8, 2*Di]
  core::Tensor index_score_state;
};

struct CacheGeometry {
  int64_t num_slots = 0;  // sequences that can hold state at once
  int64_t num_pages = 0;  // pages of compressed rows
  int64_t window = 0;     // W
  int64_t head_dim = 0;   // Dh
  int64_t index_head_dim = 0;
  int64_t rope_dim = 64;  // the key's rotated dims (qk_rope_head_dim): the FP8 record takes only V4's 64
};

// Bytes one layer's cache takes per state slot (window ring, compressor states) and per
// page of compressed and index rows (Backend::cache_cost; sizing the pools from a memory
// budget, checking them against the free memory).
struct CacheCost {
  int64_t per_slot = 0;
  int64_t per_page = 0;
};
// In the CUDA backend's format (FP8 KV rows of kv_row_bytes, e2m1 index rows) and in the
// CPU's (bf16 rows); f32 compressor states in both. No device needed: for sizing anywhere.
CacheCost fp8_cache_cost(const CacheGeometry& geometry, int64_t ratio);
CacheCost bf16_cache_cost(const CacheGeometry& geometry, int64_t ratio);
// The format a backend of that name ("cuda", "cpu") keeps its caches in, as one of the above.
using LayerCacheCost = CacheCost (*)(const CacheGeometry&, int64_t);
LayerCacheCost cache_cost_of_backend(const std::string& backend_name);

}  // namespace dsv4::ops
