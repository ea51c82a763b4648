// Model level, CUDA against the CPU reference on `tiny` (GPU; skipped without
// one): the same checkpoint loaded on both backends, four prompts of different
// lengths (one past 300 tokens, so the indexer is selective and the ratio-128
// compressor has emitted rows), chunked prefill and 100 decode steps.
// - greedy tokens identical for at least the first 64 steps of every sequence;
// - every logits row up to the first divergence within the model tolerance:
//   relative L2 error <= 2e-2 (bf16 activations between ops, fp32 accumulation
//   in another order than the reference: ~1e-3 per op, compounded over layers);
// - CUDA graph replay == eager CUDA, bit for bit, over the same generation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <thread>

#include "engine/generator.h"
#include "engine/kv_pool.h"
#include "engine/model_loader.h"
#include "engine/model_runner.h"
#include "model/checkpoint_writer.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda_test_util.h"
#include "test_util.h"

namespace dsv4::engine {
namespace {

constexpr int kDecodeSteps = 100;
constexpr int kGreedyMatchSteps = 64;
constexpr double kRelL2Tolerance = 2e-2;

using Logits = std::vector<std::vector<std::vector<float>>>;  // [seq][token][vocab]

class CudaTinyModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string why;
    if (!ops::cuda_device_available(&why)) return;
    dir_ = new std::string(testing::temp_dir("cuda_model_tiny"));
    model::CheckpointWriteOptions o;
    o.out_dir = *dir_;
    o.seed = 1;
    model::write_checkpoint(model::preset_config("tiny"), o);
  }
  static void TearDownTestSuite() { delete dir_; }

  std::unique_ptr<ModelRunner> runner(ops::Backend& be, const LoadedModel& m, bool graphs) {
    RunnerOptions o;
    o.use_graphs = graphs;
    o.graph_buckets = {1, 2, 4};
    o.max_tokens_per_step = 512;
    o.max_seqs_per_step = 8;
    o.max_logit_rows = 64;
    o.max_blocks_per_seq = 4;
    o.cache.num_slots = 4;
    o.cache.num_pages = 16;
    return std::make_unique<ModelRunner>(m.config, m.weights, be, o);
  }

  std::vector<GenerateRequest> requests() const {
    std::vector<GenerateRequest> out;
    std::mt19937_64 g(testing::test_seed());
    for (int len : {20, 150, 301, 75}) {
      GenerateRequest q;
      for (int t = 0; t < len; ++t) q.prompt.push_back(int32_t(g() % 129280));
      q.max_new_tokens = kDecodeSteps;
      out.push_back(q);
    }
    return out;
  }

  std::vector<std::vector<int32_t>> run(ModelRunner& r, Logits& logits) {
    const auto reqs = requests();
    logits.assign(reqs.size(), {});
    IndexPool slots(4), pages(16);
    GenerateOptions go;
    go.prefill_chunk = 97;  // odd chunks: prefill spans several steps
    auto out = generate(r, slots, pages, reqs, go, [&](int s, int, const float* row, int32_t) {
      logits[size_t(s)].emplace_back(row, row + 129280);
    });
    EXPECT_EQ(slots.num_used(), 0);
    EXPECT_EQ(pages.num_used(), 0);
    return out;
  }

  static std::string* dir_;
};
std::string* CudaTinyModel::dir_ = nullptr;

TEST_F(CudaTinyModel, MatchesCpuReference) {
  DSV4_REQUIRE_CUDA();
  auto cpu = ops::make_cpu_backend(int(std::max(1u, std::thread::hardware_concurrency())));
  auto cuda = ops::make_cuda_backend(0);
  const ModelSource source{*dir_, "", 0};
  auto cpu_model = load_model(source, *cpu);
  auto cuda_model = load_model(source, *cuda);
  Logits ref, got;
  const auto ref_tokens = run(*runner(*cpu, *cpu_model, false), ref);
  const auto got_tokens = run(*runner(*cuda, *cuda_model, false), got);
  double worst = 0;
  for (size_t s = 0; s < ref_tokens.size(); ++s) {
    size_t agree = 0;
    while (agree < ref_tokens[s].size() && ref_tokens[s][agree] == got_tokens[s][agree]) ++agree;
    std::printf("sequence %zu: greedy tokens agree for %zu of %d steps\n", s, agree, kDecodeSteps);
    EXPECT_GE(agree, size_t(kGreedyMatchSteps)) << "sequence " << s;
    // Rows up to and including the first divergence saw the same inputs.
    for (size_t i = 0; i < std::min(agree + 1, ref[s].size()); ++i) {
      double num = 0, den = 0;
      for (size_t v = 0; v < ref[s][i].size(); ++v) {
        const double d = double(got[s][i][v]) - double(ref[s][i][v]);
        ASSERT_TRUE(std::isfinite(got[s][i][v])) << "sequence " << s << " token " << i << " id " << v;
        num += d * d;
        den += double(ref[s][i][v]) * ref[s][i][v];
      }
      const double rel = std::sqrt(num / std::max(den, 1e-30));
      worst = std::max(worst, rel);
      EXPECT_LE(rel, kRelL2Tolerance) << "sequence " << s << " token " << i;
    }
  }
  std::printf("worst relative L2 logits error: %.3e (tolerance %.1e)\n", worst, kRelL2Tolerance);
}

TEST_F(CudaTinyModel, GraphReplayEqualsEagerBitForBit) {
  DSV4_REQUIRE_CUDA();
  auto cuda = ops::make_cuda_backend(0);
  auto model = load_model(ModelSource{*dir_, "", 0}, *cuda);
  Logits eager, replayed;
  auto eager_runner = runner(*cuda, *model, false);
  auto graph_runner = runner(*cuda, *model, true);
  const auto a = run(*eager_runner, eager);
  const auto b = run(*graph_runner, replayed);
  EXPECT_GE(graph_runner->num_graphs(), 1u);
  ASSERT_EQ(a, b);
  for (size_t s = 0; s < eager.size(); ++s)
    for (size_t i = 0; i < eager[s].size(); ++i) ASSERT_EQ(eager[s][i], replayed[s][i]) << "sequence " << s << " token " << i;
}

}  // namespace
}  // namespace dsv4::engine
