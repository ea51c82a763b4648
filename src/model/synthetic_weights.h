// Synthetic ("random but sane") weights: scaled Gaussians quantized exactly as a
// real checkpoint stores them, so every scale path is exercised. Element values
// are pure functions of (seed, tensor name, index) (core/random.h), so the disk
// writer, the CPU builder and the GPU builder produce the same weights.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/random.h"
#include "core/synthetic_values.h"
#include "model/weight_spec.h"

namespace dsv4::model {

// CPU generation of a tensor, or of a row range of it, into host memory.
// For an FP8/FP4 weight, `scale_out` receives the rows of its paired scale that
// cover the generated weight rows (FP8: row blocks of 128; rows must be aligned).
void fill_normal(const TensorSpec& spec, uint64_t seed, int64_t begin, int64_t count, void* out);
void fill_fp8_rows(const TensorSpec& weight, uint64_t seed, int64_t row_begin, int64_t row_count, uint8_t* weight_out,
                   uint8_t* scale_out);
void fill_fp4_rows(const TensorSpec& weight, uint64_t seed, int64_t row_begin, int64_t row_count, uint8_t* weight_out,
                   uint8_t* scale_out);
void fill_expert_ids(const TensorSpec& spec, uint64_t seed, int64_t num_experts, int64_t row_begin, int64_t row_count,
                     int64_t* out);

// Where generation puts a piece of a tensor: bytes [offset, offset + size) of tensor
// `name`. Called from several threads at once, never twice for the same bytes.
using TensorPieceSink =
    std::function<void(const std::string& name, uint64_t offset, const void* data, uint64_t size)>;

// Generates specs[i] (with its paired scale, for an FP8/FP4 weight; a scale on its own
// is skipped) in pieces of about `piece_elements` values (whole 128-row blocks for FP8,
// whole rows for FP4), adding each piece's bytes to `done`. The checkpoint writer and the
// host weight store both draw through this, so they hold the same bytes.
constexpr int64_t kDefaultPieceElements = int64_t(1) << 22;
void generate_tensor(const std::vector<TensorSpec>& specs, size_t i, int64_t num_experts, uint64_t seed,
                     const TensorPieceSink& sink, std::atomic<uint64_t>& done,
                     int64_t piece_elements = kDefaultPieceElements);

// generate_tensor for each of `indices` on `threads` threads (<= 0: the hardware's
// count), tensors taken in turn. progress(done, total), if set, is called about once a
// second from a thread of its own and once at the end. Bytes do not depend on the
// thread count. Rethrows the first error of any thread.
void generate_tensors(const std::vector<TensorSpec>& specs, const std::vector<size_t>& indices, int64_t num_experts,
                      uint64_t seed, const TensorPieceSink& sink, int threads, std::atomic<uint64_t>& done,
                      uint64_t total, const std::function<void(uint64_t done, uint64_t total)>& progress,
                      int64_t piece_elements = kDefaultPieceElements);

}  // namespace dsv4::model
