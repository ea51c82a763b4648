// The fold order of the CUDA backend's tensor-core sparse attention, the part the
// CPU backend's model of it (QuantDotModel::kHopperWgmma) must share
// (docs/design/cuda-attention.md, "Key segments"): a row's keys go in chunks of 32
// (one online-softmax step each); every kAttentionSegmentChunks chunks make a
// segment, whose (o, m, l) starts fresh and is folded into the row's (O, M, L) in
// segment order. The cut depends on the row's own key count only, never on the
// batch or on how the launcher spreads segments over CTAs, so a row's bits do not
// depend on its batch.
#pragma once

#include <cstdint>

namespace dsv4::ops {

constexpr int64_t kAttentionChunkKeys = 32;
constexpr int64_t kAttentionSegmentChunks = 2;
constexpr int64_t kAttentionSegmentKeys = kAttentionSegmentChunks * kAttentionChunkKeys;

}  // namespace dsv4::ops
