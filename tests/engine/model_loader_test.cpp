#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "engine/model_loader.h"
#include "model/weights.h"

namespace dsv4::engine {
namespace {

std::string fit_error(uint64_t needed, std::optional<uint64_t> available) {
  try {
    check_weights_fit("preset bench-1g", needed, available, "host", "draw them on a GPU (--backend cuda)");
  } catch (const core::Error& e) {
    return e.what();
  }
  return "";
}

TEST(ModelLoader, WeightsThatDoNotFitFailWithTheNumbers) {
  const std::string e = fit_error(34'330'000'000ull, 24'720'000'000ull);
  EXPECT_NE(e.find("preset bench-1g"), std::string::npos) << e;
  EXPECT_NE(e.find("34.33 GB of host memory"), std::string::npos) << e;
  EXPECT_NE(e.find("24.72 GB are free"), std::string::npos) << e;
  EXPECT_NE(e.find("--backend cuda"), std::string::npos) << e;
}

TEST(ModelLoader, WeightsThatFitOrUnknownMemoryPass) {
  EXPECT_EQ(fit_error(10, 10), "");
  EXPECT_EQ(fit_error(10, 11), "");
  EXPECT_EQ(fit_error(uint64_t(1) << 60, std::nullopt), "");  // (nothing known: no check)
}

// The host-drawn preset reports its progress through the source, ending at the bytes
// the weights take; the model binds.
TEST(ModelLoader, PresetLoadReportsProgressToTheTotal) {
  auto backend = ops::make_cpu_backend(1);
  std::vector<std::pair<uint64_t, uint64_t>> calls;
  ModelSource source{"", "tiny", 1, [&](uint64_t done, uint64_t total) { calls.emplace_back(done, total); }};
  const auto loaded = load_model(source, *backend, 0, 4);
  ASSERT_FALSE(calls.empty());
  EXPECT_EQ(calls.back().second, model::needed_weight_bytes(loaded->config, 0, 4));
  EXPECT_EQ(calls.back().first, calls.back().second);
  EXPECT_EQ(loaded->weights.expert_end, 4);
  EXPECT_NE(loaded->weights.layers[0].experts[3].w1.weight.data(), nullptr);
}

// In-process CPU ranks of an expert-parallel group: one model, each rank binding its slice.
TEST(ModelLoader, AnExpertSliceSharesTheWholeModelsTensors) {
  auto backend = ops::make_cpu_backend(1);
  const auto whole = load_model(ModelSource{"", "tiny", 1, {}}, *backend);
  const auto slice = bind_expert_slice(whole, 2, 5);
  EXPECT_EQ(slice->weights.expert_begin, 2);
  EXPECT_EQ(slice->weights.expert_end, 5);
  const auto& a = whole->weights.layers[1];
  const auto& b = slice->weights.layers[1];
  EXPECT_EQ(b.experts[3].w1.weight.data(), a.experts[3].w1.weight.data());  // the same tensor, not a copy
  EXPECT_EQ(b.experts[0].w1.weight.data(), nullptr);                       // outside the slice: unbound
  EXPECT_EQ(b.wq_b.weight.data(), a.wq_b.weight.data());
  EXPECT_EQ(slice->weights.head.data(), whole->weights.head.data());
  // A slice of a slice is refused: its experts are not all there.
  EXPECT_THROW(bind_expert_slice(slice, 0, 2), core::Error);
}

}  // namespace
}  // namespace dsv4::engine
