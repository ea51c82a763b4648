// Model invariants on `tiny` (CPU reference): decode == prefill at the same
// position, chunked == one-shot prefill, batched == alone, reruns identical,
// MTP decode == MTP prefill. Rows are computed independently, so all of these
// hold bit for bit. Also the divergence locator the GPU parity test relies on.
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <random>

#include "engine/divergence_locator.h"
#include "engine/generator.h"
#include "engine/kv_pool.h"
#include "engine/model_runner.h"
#include "model/weights.h"
#include "test_util.h"

namespace dsv4::engine {
namespace {

class TinyModel : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = model::preset_config("tiny");
    weights_ = model::bind_weights(config_, testing::tiny_weights().lookup(), 0, config_.n_routed_experts);
  }

  std::unique_ptr<ModelRunner> runner(int32_t max_tokens = 512, int32_t slots = 4, bool graphs = false,
                                      ops::Backend* backend = nullptr) {
    RunnerOptions o;
    o.use_graphs = graphs;
    o.max_tokens_per_step = max_tokens;
    o.max_seqs_per_step = 8;
    o.max_logit_rows = 64;
    o.max_blocks_per_seq = 4;
    o.cache.num_slots = slots;
    o.cache.num_pages = slots * 4;
    return std::make_unique<ModelRunner>(config_, weights_, backend ? *backend : *backend_, o);
  }

  std::vector<int32_t> random_tokens(int n, uint64_t salt) {
    std::mt19937_64 g(testing::test_seed() + salt);
    std::vector<int32_t> t;
    for (int i = 0; i < n; ++i) t.push_back(int32_t(g() % uint64_t(config_.vocab_size)));
    return t;
  }

  // Runs tokens [begin, end) of `tokens` through `r` in one step for the sequence
  // in `slot`; returns logits of the rows listed (positions).
  std::vector<std::vector<float>> run(ModelRunner& r, int32_t slot, const std::vector<int32_t>& pages,
                                      const std::vector<int32_t>& tokens, int32_t begin, int32_t end,
                                      const std::vector<int32_t>& logit_positions) {
    SequenceSlice s;
    s.state_slot = slot;
    s.start_pos = begin;
    s.tokens = tokens.data() + begin;
    s.num_tokens = end - begin;
    s.block_table = &pages;
    StepMetadata m = build_step_metadata({s});
    for (int32_t p : logit_positions) m.logit_rows.push_back(p - begin);
    std::vector<float> logits;
    r.step(m, &logits);
    std::vector<std::vector<float>> rows;
    const size_t V = size_t(config_.vocab_size);
    for (size_t i = 0; i < logit_positions.size(); ++i)
      rows.emplace_back(logits.begin() + i * V, logits.begin() + (i + 1) * V);
    return rows;
  }

  model::ModelConfig config_;
  model::ModelWeights weights_;
  std::unique_ptr<ops::Backend> backend_ = ops::make_cpu_backend(2);
};

std::vector<int32_t> pages_for(int32_t slot) { return {slot * 4, slot * 4 + 1, slot * 4 + 2, slot * 4 + 3}; }

// One decode token of each sequence i that `live(i)` keeps: sequence i in slot i, its prompt
// of lengths[i] tokens prefilled, `step` tokens decoded since.
std::vector<SequenceSlice> decode_slices(const std::vector<int>& lengths, const std::vector<std::vector<int32_t>>& toks,
                                         const std::vector<std::vector<int32_t>>& pages, int step,
                                         const std::function<bool(size_t)>& live) {
  std::vector<SequenceSlice> slices;
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (!live(i)) continue;
    SequenceSlice s;
    s.state_slot = int32_t(i);
    s.start_pos = lengths[i] + step;
    s.tokens = toks[i].data() + s.start_pos;
    s.num_tokens = 1;
    s.block_table = &pages[i];
    s.want_logits = true;
    slices.push_back(s);
  }
  return slices;
}

TEST_F(TinyModel, DecodeLogitsEqualPrefillLogits) {
  // 300-token prompt: the window wraps, 75 CSA rows (> index_topk 8, so the
  // indexer is selective), 2 HCA rows; decoding to 399 crosses the third HCA
  // emission (p = 383) and many CSA emissions (spec §10.1).
  const std::vector<int32_t> tokens = random_tokens(400, 1);
  auto r = runner();
  const auto pages = pages_for(0);
  std::vector<int32_t> probe;
  for (int32_t p = 299; p < 400; p += 4) probe.push_back(p);
  probe.push_back(383);
  probe.push_back(399);
  std::vector<std::vector<float>> prefill;
  for (size_t i = 0; i < probe.size(); i += 32) {
    std::vector<int32_t> part(probe.begin() + int64_t(i), probe.begin() + int64_t(std::min(i + 32, probe.size())));
    auto rows = run(*r, 0, pages, tokens, 0, 400, part);
    prefill.insert(prefill.end(), rows.begin(), rows.end());
  }
  // Fresh state: prefill 300, then decode one token at a time.
  auto r2 = runner();
  std::map<int32_t, std::vector<float>> decoded;
  decoded[299] = run(*r2, 0, pages, tokens, 0, 300, {299})[0];
  for (int32_t p = 300; p < 400; ++p) decoded[p] = run(*r2, 0, pages, tokens, p, p + 1, {p})[0];
  for (size_t i = 0; i < probe.size(); ++i) {
    ASSERT_EQ(decoded[probe[i]], prefill[i]) << "position " << probe[i];
  }
  // And the logits are not degenerate.
  float mn = 1e30f, mx = -1e30f;
  for (float v : prefill[0]) mn = std::min(mn, v), mx = std::max(mx, v);
  EXPECT_GT(mx - mn, 1.0f);
}

TEST_F(TinyModel, ChunkedPrefillEqualsOneShot) {
  const std::vector<int32_t> tokens = random_tokens(330, 2);
  const auto pages = pages_for(1);
  auto r = runner();
  const auto one_shot = run(*r, 1, pages, tokens, 0, 330, {128, 255, 256, 329});
  auto r2 = runner();
  const std::vector<int32_t> chunks = {37, 1, 90, 5, 127, 70};
  std::map<int32_t, std::vector<float>> got;
  int32_t done = 0;
  for (int32_t n : chunks) {
    std::vector<int32_t> want;
    for (int32_t p : {128, 255, 256, 329})
      if (p >= done && p < done + n) want.push_back(p);
    auto rows = run(*r2, 1, pages, tokens, done, done + n, want);
    for (size_t i = 0; i < want.size(); ++i) got[want[i]] = rows[i];
    done += n;
  }
  ASSERT_EQ(done, 330);
  EXPECT_EQ(got[128], one_shot[0]);
  EXPECT_EQ(got[255], one_shot[1]);
  EXPECT_EQ(got[256], one_shot[2]);
  EXPECT_EQ(got[329], one_shot[3]);
}

TEST_F(TinyModel, BatchedDecodeEqualsEachSequenceAlone) {
  const std::vector<int> lengths = {20, 150, 301, 75};
  GenerateOptions go;
  go.prefill_chunk = 97;
  std::vector<GenerateRequest> requests;
  for (size_t i = 0; i < lengths.size(); ++i) {
    GenerateRequest q;
    q.prompt = random_tokens(lengths[i], 10 + i);
    q.max_new_tokens = 24;
    requests.push_back(q);
  }
  std::vector<std::vector<std::vector<float>>> batched(requests.size());
  auto keep = [](std::vector<std::vector<std::vector<float>>>& into, int offset) {
    return [&into, offset](int s, int, const float* row, int32_t) { into[size_t(s + offset)].emplace_back(row, row + 129280); };
  };
  auto r = runner();
  IndexPool slots(4), pages(16);
  const auto out = generate(*r, slots, pages, requests, go, keep(batched, 0));
  EXPECT_EQ(slots.num_used(), 0);
  EXPECT_EQ(pages.num_used(), 0);
  for (size_t i = 0; i < requests.size(); ++i) {
    std::vector<std::vector<std::vector<float>>> alone(1);
    auto r1 = runner();
    IndexPool s1(4), p1(16);
    const auto o1 = generate(*r1, s1, p1, {requests[i]}, go, keep(alone, 0));
    EXPECT_EQ(o1[0], out[i]) << "sequence " << i;
    ASSERT_EQ(alone[0].size(), batched[i].size());
    for (size_t k = 0; k < alone[0].size(); ++k) ASSERT_EQ(alone[0][k], batched[i][k]) << "sequence " << i << " token " << k;
  }
}

TEST_F(TinyModel, PaddedGraphDecodeEqualsEager) {
  // Decode steps replayed from per-bucket recordings with pad rows and empty
  // pad sequences give exactly the eager logits, and the pads leave no trace.
  const std::vector<int> lengths = {20, 150, 45};
  auto eager = runner(512, 4, false);
  auto graphs = runner(512, 4, true);
  std::vector<std::vector<int32_t>> toks;
  std::vector<std::vector<int32_t>> pages;
  for (size_t i = 0; i < lengths.size(); ++i) {
    toks.push_back(random_tokens(lengths[i] + 12, 40 + i));
    pages.push_back(pages_for(int32_t(i)));
  }
  auto prefill = [&](ModelRunner& r) {
    for (size_t i = 0; i < lengths.size(); ++i) run(r, int32_t(i), pages[i], toks[i], 0, lengths[i], {});
  };
  prefill(*eager);
  prefill(*graphs);
  for (int step = 0; step < 12; ++step) {
    // Sequences drop out over time so buckets 4 and 2 (and 1) are all used.
    const auto slices = decode_slices(lengths, toks, pages, step, [&](size_t i) { return step < 10 - 3 * int(i); });
    if (slices.empty()) break;
    const StepMetadata m = build_step_metadata(slices);
    std::vector<float> a, b;
    eager->step(m, &a);
    graphs->step(m, &b);
    ASSERT_EQ(a, b) << "decode step " << step;
  }
  EXPECT_GE(graphs->num_graphs(), 2u);
}

// The warm-up before serving (a prefill step as long as a step, then every decode bucket's
// graph, written to the padding slot and the pool's first pages) leaves no trace: a runner
// that warmed up gives the logits of one that did not, bit for bit, for sequences whose
// pages are the ones the warm-up wrote and whose decode steps replay its graphs.
TEST_F(TinyModel, WarmUpLeavesNoTrace) {
  const std::vector<int> lengths = {300, 20, 150};
  auto cold = runner(512, 4, true);
  auto warm = runner(512, 4, true);
  const WarmUpReport report = warm->warm_up(true);
  EXPECT_EQ(report.prefill_tokens, 512);
  EXPECT_EQ(report.graph_buckets, (std::vector<int32_t>{64, 48, 32, 16, 8, 4, 2, 1}));
  EXPECT_EQ(warm->num_graphs(), report.graph_buckets.size());
  EXPECT_EQ(cold->num_graphs(), 0u);
  std::vector<std::vector<int32_t>> toks, pages;
  for (size_t i = 0; i < lengths.size(); ++i) {
    toks.push_back(random_tokens(lengths[i] + 10, 60 + i));
    pages.push_back(pages_for(int32_t(i)));  // sequence 0 takes pages 0-3, which the warm-up wrote
  }
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int32_t last = lengths[i] - 1;
    ASSERT_EQ(run(*warm, int32_t(i), pages[i], toks[i], 0, lengths[i], {last}),
              run(*cold, int32_t(i), pages[i], toks[i], 0, lengths[i], {last}))
        << "prefill of sequence " << i;
  }
  for (int step = 0; step < 10; ++step) {
    const StepMetadata m = build_step_metadata(decode_slices(lengths, toks, pages, step, [](size_t) { return true; }));
    std::vector<float> a, b;
    warm->step(m, &a);
    cold->step(m, &b);
    ASSERT_EQ(a, b) << "decode step " << step;
  }
  EXPECT_EQ(warm->num_graphs(), report.graph_buckets.size());  // the decode steps replayed the warm-up's graph
}

// The divergence locator (engine/divergence_locator.h, which the GPU's bit-for-bit
// parity test runs when it fails) on two CPU arithmetic models: the plain dot
// products and the model of the Hopper tensor cores part at the first quantized
// linear (layer 0's attention input stage), not before; one model run twice never
// parts.
TEST_F(TinyModel, DivergenceLocatorFindsWhereTwoArithmeticsPart) {
  auto hopper = ops::make_cpu_backend(2, ops::QuantDotModel::kHopperWgmma);
  GenerateRequest q;
  q.prompt = random_tokens(40, 7);
  q.max_new_tokens = 3;
  auto generate_once = [&](ModelRunner& r) {
    IndexPool slots(4), pages(16);
    generate(r, slots, pages, {q}, GenerateOptions{}, {});
  };
  for (const bool same : {false, true}) {
    auto a = runner();
    auto b = runner(512, 4, false, same ? nullptr : hopper.get());
    testing::DivergenceLocator locate(*a, *b);
    locate.record();
    generate_once(*a);
    locate.compare(4);
    generate_once(*b);
    locate.stop();
    if (same) {
      EXPECT_TRUE(locate.differences().empty()) << locate.differences().front();
    } else {
      ASSERT_FALSE(locate.differences().empty());
      EXPECT_EQ(locate.differences().front().rfind("L0.attn_in ", 0), 0u) << locate.differences().front();
    }
  }
}

TEST_F(TinyModel, RerunsAreIdentical) {
  std::vector<GenerateRequest> requests(2);
  requests[0].prompt = random_tokens(40, 20);
  requests[1].prompt = random_tokens(9, 21);
  for (auto& q : requests) {
    q.max_new_tokens = 12;
    q.sampling.temperature = 0.8f;
    q.sampling.seed = 5;
  }
  auto r = runner();
  IndexPool slots(4), pages(16);
  const auto a = generate(*r, slots, pages, requests, {});
  const auto b = generate(*r, slots, pages, requests, {});  // same runner, reused slots
  EXPECT_EQ(a, b);
}

TEST_F(TinyModel, MtpDecodeEqualsMtpPrefill) {
  // The MTP block takes the main model's final hyper-streams at p and token p+1.
  const std::vector<int32_t> tokens = random_tokens(41, 30);
  const auto pages = pages_for(2);
  auto r = runner();
  SequenceSlice s;
  s.state_slot = 2;
  s.start_pos = 0;
  s.tokens = tokens.data();
  s.num_tokens = 40;
  s.block_table = &pages;
  StepMetadata main = build_step_metadata({s});
  std::vector<uint16_t> hidden;
  r->step(main, nullptr, &hidden);
  const std::vector<int32_t> next(tokens.begin() + 1, tokens.end());
  SequenceSlice m = s;
  m.tokens = next.data();
  m.want_all_logits = true;
  std::vector<float> prefill;
  r->mtp_step(build_step_metadata({m}), hidden, &prefill);
  // Again in chunks of 1..: MTP state (its own window ring) must hand over.
  auto r2 = runner();
  r2->step(main, nullptr, nullptr);
  const size_t row = size_t(config_.hc_mult * config_.hidden_size), V = size_t(config_.vocab_size);
  int32_t done = 0;
  for (int32_t n : {13, 1, 20, 6}) {
    SequenceSlice c = m;
    c.start_pos = done;
    c.tokens = next.data() + done;
    c.num_tokens = n;
    std::vector<uint16_t> h(hidden.begin() + int64_t(done * row), hidden.begin() + int64_t((done + n) * row));
    std::vector<float> logits;
    r2->mtp_step(build_step_metadata({c}), h, &logits);
    for (int32_t i = 0; i < n; ++i)
      ASSERT_TRUE(std::equal(logits.begin() + int64_t(i * V), logits.begin() + int64_t((i + 1) * V),
                             prefill.begin() + int64_t((done + i) * V)))
          << "MTP position " << done + i;
    done += n;
  }
}

}  // namespace
}  // namespace dsv4::engine
