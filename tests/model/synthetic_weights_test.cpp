#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <set>
#include <vector>

#include "model/synthetic_weights.h"
#include "model/weight_spec.h"
#include "model/weights.h"
#include "test_util.h"

namespace dsv4::model {
namespace {

// tiny with a vocabulary of 4096 (the real one's embedding and head are most of tiny's
// bytes, and these tests draw whole stores several times).
ModelConfig small_config() {
  ModelConfig c = preset_config("tiny");
  c.vocab_size = 4096;
  return c;
}

// Each tensor of the store against one whole-tensor call of its fill function: the
// pieces generate_tensor cuts (their offsets, the FP8 row blocks, the paired scales)
// must put every byte where a single draw does. Pieces of 4096 values cut most of
// tiny's tensors into several (FP8: 128-row blocks; FP4: 16 rows of K = 256).
TEST(SyntheticWeights, StoreEqualsWholeTensorDraws) {
  const ModelConfig config = small_config();
  const SyntheticWeightStore store(config, 7, 0, -1, SyntheticBuildOptions{3, nullptr, 4096});
  const std::vector<TensorSpec> specs = checkpoint_tensor_specs(config);
  int compared = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    const core::Tensor got = store.get(s.name);
    std::vector<uint8_t> want(got.nbytes()), scale;
    switch (s.init) {
      case WeightInit::kNormal:
        fill_normal(s, 7, 0, got.numel(), want.data());
        break;
      case WeightInit::kFp8Weight:
      case WeightInit::kFp4Weight: {
        const core::Tensor sc = store.get(specs[i + 1].name);
        scale.resize(sc.nbytes());
        if (s.init == WeightInit::kFp8Weight) fill_fp8_rows(s, 7, 0, s.logical_n, want.data(), scale.data());
        else fill_fp4_rows(s, 7, 0, s.logical_n, want.data(), scale.data());
        ASSERT_EQ(std::memcmp(sc.data(), scale.data(), scale.size()), 0) << specs[i + 1].name;
        break;
      }
      case WeightInit::kExpertIds:
        fill_expert_ids(s, 7, config.n_routed_experts, 0, s.shape[0], reinterpret_cast<int64_t*>(want.data()));
        break;
      case WeightInit::kFp8Scale:
      case WeightInit::kFp4Scale:
        continue;  // compared with the weight
    }
    ASSERT_EQ(std::memcmp(got.data(), want.data(), want.size()), 0) << s.name;
    ++compared;
  }
  EXPECT_GT(compared, 100);
}

// The values are a contract: make-checkpoint, the host store and the GPU builders draw
// the same bytes, and benchmarks compare runs by seed. These hashes (FNV-1a 64 of the
// bytes, seed 1) were taken from the whole-tensor, one-thread, libm-fmaf draws of
// 88c8302 and equal this code's; a change to them must be deliberate and said.
TEST(SyntheticWeights, ValuesArePinned) {
  const SyntheticWeightStore store(small_config(), 1);
  const std::vector<std::pair<const char*, uint64_t>> pinned = {
      {"embed.weight", 0x3f16bd3be21f0135ull},
      {"layers.1.attn.wq_b.weight", 0xf79a044b0f0e9fabull},
      {"layers.1.attn.wq_b.scale", 0x0a11d9015e3149dcull},
      {"layers.3.ffn.experts.7.w2.weight", 0xcd4aa6d92009265full},
      {"layers.3.ffn.experts.7.w2.scale", 0x44e37aed47cbcb90ull},
      {"layers.0.ffn.gate.tid2eid", 0xccdf6653bfc33784ull},
      {"layers.2.attn.compressor.wkv.weight", 0x0168c41559c9b45bull},
      {"mtp.0.hc_attn_fn", 0x138c1a3e5d17f5b0ull},
  };
  for (const auto& [name, want] : pinned) {
    const core::Tensor t = store.get(name);
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < t.nbytes(); ++i) h = (h ^ static_cast<const uint8_t*>(t.data())[i]) * 0x100000001b3ull;
    EXPECT_EQ(h, want) << name;
  }
}

TEST(SyntheticWeights, BytesDoNotDependOnTheThreadCount) {
  const ModelConfig config = small_config();
  const SyntheticWeightStore one(config, 3, 2, 6, SyntheticBuildOptions{1, nullptr});
  const SyntheticWeightStore four(config, 3, 2, 6, SyntheticBuildOptions{4, nullptr});
  for (const TensorSpec& s : checkpoint_tensor_specs(config)) {
    if (!is_needed_tensor(s.name, 2, 6)) continue;
    const core::Tensor a = one.get(s.name), b = four.get(s.name);
    ASSERT_EQ(a.nbytes(), b.nbytes()) << s.name;
    ASSERT_EQ(std::memcmp(a.data(), b.data(), a.nbytes()), 0) << s.name;
  }
}

// needed_weight_bytes is what binding the weights reads (the loaders' progress total and
// memory check), for all experts and for a slice.
TEST(SyntheticWeights, NeededBytesAreWhatBindingReads) {
  const ModelConfig config = small_config();
  for (const auto& [eb, ee] : std::vector<std::pair<int64_t, int64_t>>{{0, -1}, {2, 5}}) {
    const SyntheticWeightStore store(config, 1, eb, ee);
    std::set<std::string> names;
    uint64_t bytes = 0;
    bind_weights(config,
                 [&](const std::string& name) {
                   const core::Tensor t = store.get(name);
                   if (names.insert(name).second) bytes += t.nbytes();
                   return t;
                 },
                 eb, ee < 0 ? config.n_routed_experts : ee);
    EXPECT_EQ(bytes, needed_weight_bytes(config, eb, ee)) << "experts [" << eb << ", " << ee << ")";
  }
  EXPECT_LT(needed_weight_bytes(config, 2, 5), needed_weight_bytes(config));
}

TEST(SyntheticWeights, ProgressRisesToTheTotal) {
  const ModelConfig config = small_config();
  std::mutex mutex;
  std::vector<std::pair<uint64_t, uint64_t>> calls;
  const auto record = [&](uint64_t done, uint64_t total) {
    std::lock_guard<std::mutex> lock(mutex);
    calls.emplace_back(done, total);
  };
  const SyntheticWeightStore store(config, 1, 0, -1, SyntheticBuildOptions{2, record, 4096});
  ASSERT_FALSE(calls.empty());
  const uint64_t total = needed_weight_bytes(config);
  for (size_t i = 0; i < calls.size(); ++i) {
    EXPECT_EQ(calls[i].second, total);
    EXPECT_LE(calls[i].first, total);
    if (i > 0) {
      EXPECT_GE(calls[i].first, calls[i - 1].first);
    }
  }
  EXPECT_EQ(calls.back().first, total);
}

// A sink that fails stops the draw and reaches the caller.
TEST(SyntheticWeights, ASinkErrorReachesTheCaller) {
  const ModelConfig config = small_config();
  const std::vector<TensorSpec> specs = checkpoint_tensor_specs(config);
  std::vector<size_t> all(specs.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  std::atomic<uint64_t> done{0};
  EXPECT_THROW(generate_tensors(
                   specs, all, config.n_routed_experts, 1,
                   [](const std::string& name, uint64_t, const void*, uint64_t) {
                     if (name.find("wq_b") != std::string::npos) throw std::runtime_error("disk full");
                   },
                   3, done, total_bytes(specs), nullptr),
               std::runtime_error);
}

}  // namespace
}  // namespace dsv4::model
