// Compressor (spec §5.3): the incremental state machine, fed one token at a time,
// in one shot, or in odd chunks, emits exactly the rows of the closed-form
// pooling rule.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "op_test_util.h"
#include "ops/backend.h"
#include "ops/cpu/primitives.h"

namespace dsv4::ops {
namespace {

using core::DType;
using core::Tensor;

struct Case {
  int64_t ratio;
  bool rotate;  // indexer compressor
  int64_t tokens;
};

class CompressorTest : public ::testing::TestWithParam<Case> {};

// Closed form for row j: softmax per feature over the window's candidates.
std::vector<uint16_t> closed_form_row(const Tensor& a, const Tensor& g, const CompressorWeights& w, const RopeTable& rope,
                                      int64_t j) {
  const int64_t m = w.ratio, d = w.head_dim, width = w.width();
  std::vector<uint16_t> row(static_cast<size_t>(d));
  for (int64_t f = 0; f < d; ++f) {
    std::vector<float> kv, sc;
    if (m == 4) {
      for (int64_t t = (j - 1) * m; t < j * m; ++t) {  // previous window, first half
        kv.push_back(t < 0 ? 0.0f : a.as<float>()[t * width + f]);
        sc.push_back(t < 0 ? -std::numeric_limits<float>::infinity()
                           : g.as<float>()[t * width + f] + w.ape.as<float>()[(t % m) * width + f]);
      }
      for (int64_t t = j * m; t < (j + 1) * m; ++t) {  // current window, second half
        kv.push_back(a.as<float>()[t * width + d + f]);
        sc.push_back(g.as<float>()[t * width + d + f] + w.ape.as<float>()[(t % m) * width + d + f]);
      }
    } else {
      for (int64_t t = j * m; t < (j + 1) * m; ++t) {
        kv.push_back(a.as<float>()[t * width + f]);
        sc.push_back(g.as<float>()[t * width + f] + w.ape.as<float>()[(t % m) * width + f]);
      }
    }
    float mx = sc[0];
    for (float s : sc) mx = std::max(mx, s);
    float z = 0;
    for (float s : sc) z += std::exp(s - mx);
    float acc = 0;
    for (size_t c = 0; c < sc.size(); ++c) acc += kv[c] * (std::exp(sc[c] - mx) / z);
    row[size_t(f)] = core::float_to_bf16(acc);
  }
  ref::rms_norm_bf16(row.data(), w.norm.as<uint16_t>(), d, 1e-6f, row.data());
  ref::rope_bf16(row.data() + d - 64, 32, rope.inv_freq.as<float>(), j * m, false);  // at the window's first token
  if (w.rotate) {
    ref::hadamard_bf16(row.data(), d);
    ref::fp4_sim_bf16(row.data(), d, 32);
  } else {
    ref::fp8_sim_bf16(row.data(), d - 64, 64);
  }
  return row;
}

TEST_P(CompressorTest, IncrementalEqualsClosedForm) {
  const Case c = GetParam();
  auto be = make_cpu_backend(1);
  testing::Rng rng(100 + uint64_t(c.ratio) + c.rotate);
  const int64_t d = c.rotate ? 128 : 128, coff = c.ratio == 4 ? 2 : 1, width = coff * d, N = c.tokens;
  CompressorWeights w;
  w.ratio = c.ratio;
  w.head_dim = d;
  w.rotate = c.rotate;
  w.ape = rng.f32({c.ratio, width}, 0.5f);
  w.norm = rng.bf16({d}, 0.1f);
  for (int64_t i = 0; i < d; ++i) w.norm.as<uint16_t>()[i] = core::float_to_bf16(1.0f + testing::bf(w.norm, i));
  Tensor a = rng.f32({N, width}), g = rng.f32({N, width}, 2.0f);
  RopeTable rope{Tensor::empty_cpu(DType::kF32, {32}), 64};
  auto inv = rope_inv_freq(64, 160000, true, 16, 65536, 32, 1);
  std::copy(inv.begin(), inv.end(), rope.inv_freq.as<float>());
  const int32_t pages = int32_t((N + kPageTokens - 1) / kPageTokens);
  const int64_t rows_due = N / c.ratio;
  ASSERT_GE(rows_due, 3) << "at least three emissions";

  // Feeds tokens [0, N) in chunks of the given sizes (cycled) into slot 2 of 3.
  auto run = [&](std::vector<int32_t> chunks) {
    CacheGeometry geo{3, pages * 3, 16, 128, 128};
    LayerCache cache = be->allocate_cache(geo, c.ratio);
    // Stale state from a previous user of the slot must not leak into row 0.
    Tensor& kvs = c.rotate ? cache.index_kv_state : cache.kv_state;
    Tensor& scs = c.rotate ? cache.index_score_state : cache.score_state;
    for (int64_t i = 0; i < kvs.numel(); ++i) {
      kvs.as<float>()[i] = 1e3f;
      scs.as<float>()[i] = 50.0f;
    }
    int64_t done = 0;
    size_t ci = 0;
    while (done < N) {
      const int32_t n = int32_t(std::min<int64_t>(chunks[ci++ % chunks.size()], N - done));
      testing::HostBatch hb({{2, int32_t(done), n}}, pages);
      Tensor ca = Tensor::empty_cpu(DType::kF32, {n, width}), cg = Tensor::empty_cpu(DType::kF32, {n, width});
      std::memcpy(ca.data(), a.as<float>() + done * width, ca.nbytes());
      std::memcpy(cg.data(), g.as<float>() + done * width, cg.nbytes());
      be->compress(ca, cg, w, hb.view(), rope, 1e-6f, cache);
      done += n;
    }
    const Tensor& rows = c.rotate ? cache.index_rows : cache.rows;
    const int64_t per_page = kPageTokens / c.ratio;
    std::vector<std::vector<uint16_t>> out;
    for (int64_t j = 0; j < rows_due; ++j) {
      const uint16_t* r = rows.as<uint16_t>() + ((j / per_page) * per_page + j % per_page) * d;  // pages 0.. of sequence 0
      out.emplace_back(r, r + d);
    }
    return out;
  };

  const auto one_shot = run({int32_t(N)});
  const auto token_by_token = run({1});
  const auto chunked = run({3, 7, 1, 5});
  for (int64_t j = 0; j < rows_due; ++j) {
    EXPECT_EQ(token_by_token[size_t(j)], one_shot[size_t(j)]) << "row " << j;
    EXPECT_EQ(chunked[size_t(j)], one_shot[size_t(j)]) << "row " << j;
    EXPECT_EQ(closed_form_row(a, g, w, rope, j), one_shot[size_t(j)]) << "row " << j;
  }
}

INSTANTIATE_TEST_SUITE_P(Ratios, CompressorTest,
                         ::testing::Values(Case{4, false, 23}, Case{4, true, 23}, Case{128, false, 3 * 128 + 10}),
                         [](const auto& info) {
                           return std::string(info.param.rotate ? "Indexer" : "Main") + "Ratio" +
                                  std::to_string(info.param.ratio);
                         });

}  // namespace
}  // namespace dsv4::ops
