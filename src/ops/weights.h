// Weight handles the ops consume. Plain views: the tensors live wherever the
// backend keeps them (a checkpoint's memory map for the CPU, device memory for CUDA).
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace dsv4::ops {

// A quantized linear weight W[N, K] (spec §2.7, §2.8).
struct QuantLinear {
  enum class Format : uint8_t {
    kFp8Block128,  // e4m3 [N, K], UE8M0 scale [ceil(N/128), ceil(K/128)]
    kFp4Group32,   // e2m1 packed I8 [N, K/2] (low nibble = even k), UE8M0 scale [N, K/32]
                   // (on CUDA both in the backend's order: upload the scale as TensorRole::kFp4Scales)
  };
  core::Tensor weight;
  core::Tensor scale;
  Format format = Format::kFp8Block128;
  int64_t n = 0;
  int64_t k = 0;
};

// mHC mixing parameters of one sub-layer (spec §4): fn [mix, hc*D], base [mix], scale [3].
struct HcWeights {
  core::Tensor fn;
  core::Tensor base;
  core::Tensor scale;
};

struct CompressorWeights {
  int64_t ratio = 0;     // 4 (overlapping, two halves) or 128
  int64_t head_dim = 0;  // d: 512 main, 128 indexer
  bool rotate = false;   // indexer compressor: Hadamard + FP4 simulation instead of FP8 simulation
  core::Tensor wkv;      // bf16 [c*d, D]
  core::Tensor wgate;    // bf16 [c*d, D]
  core::Tensor ape;      // f32 [ratio, c*d]
  core::Tensor norm;     // bf16 [d]
  int64_t width() const { return (ratio == 4 ? 2 : 1) * head_dim; }
};

struct ExpertWeights {
  QuantLinear w1, w2, w3;  // w1/w3 [I, D], w2 [D, I]
};

}  // namespace dsv4::ops
