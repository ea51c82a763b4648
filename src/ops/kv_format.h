// Byte layouts of cached rows on the GPU (the CPU reference keeps bf16 rows).
// Both are lossless with respect to the reference, which already rounds what
// it caches to these grids (spec §7.2):
//  * KV row (window and compressed, head_dim d, rope r): e4m3 nope values
//    [0, d-r), then bf16 rope values, then one UE8M0 scale byte per 64 nope
//    values, padded to 8 bytes: 448 + 128 + 7 + 1 = 584 bytes for V4.
//  * Indexer K row (index_head_dim di): packed e2m1 (low nibble = even element),
//    then one UE8M0 scale byte per 32: 64 + 4 = 68 bytes for di = 128.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace dsv4::ops {

// The rope dims the CUDA kernels' KV record layout is built for (V4's qk_rope_head_dim):
// fp8_cache_cost refuses another value, so a model that has one fails at load.
inline constexpr int64_t kFp8KvRopeDim = 64;

DSV4_HD int64_t kv_row_bytes(int64_t head_dim, int64_t rope_dim) {
  const int64_t nope = head_dim - rope_dim;
  return (nope + 2 * rope_dim + nope / 64 + 7) / 8 * 8;
}
DSV4_HD int64_t kv_row_rope_offset(int64_t head_dim, int64_t rope_dim) { return head_dim - rope_dim; }
DSV4_HD int64_t kv_row_scale_offset(int64_t head_dim, int64_t rope_dim) {
  return head_dim - rope_dim + 2 * rope_dim;
}

DSV4_HD int64_t index_row_bytes(int64_t index_head_dim) { return index_head_dim / 2 + index_head_dim / 32; }
DSV4_HD int64_t index_row_scale_offset(int64_t index_head_dim) { return index_head_dim / 2; }

}  // namespace dsv4::ops
