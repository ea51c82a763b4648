// CPU reference ops against direct formulas in double precision (the
// reference's rounding points emulated where it rounds).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>

#include "model/synthetic_weights.h"
#include "mma_model_variants.h"
#include "op_test_util.h"
#include "ops/backend.h"
#include "ops/cpu/primitives.h"
#include "ops/gemm_order.h"

namespace dsv4::ops {
namespace {

using core::DType;
using core::Tensor;
using testing::bf;
using testing::Rng;
using testing::OneStageSlices;

QuantLinear make_quant(int64_t n, int64_t k, bool fp4, uint64_t seed) {
  return testing::synthetic_quant("test.w", n, k, fp4, seed);
}

double weight_value(const QuantLinear& q, int64_t n, int64_t k) {
  if (q.format == QuantLinear::Format::kFp8Block128)
    return core::e4m3_to_float(q.weight.as<uint8_t>()[n * q.k + k]) *
           core::e8m0_to_float(q.scale.as<uint8_t>()[(n / 128) * ((q.k + 127) / 128) + k / 128]);
  uint8_t byte = q.weight.as<uint8_t>()[n * (q.k / 2) + k / 2];
  return core::e2m1_to_float(k % 2 ? byte >> 4 : byte & 15) * core::e8m0_to_float(q.scale.as<uint8_t>()[n * (q.k / 32) + k / 32]);
}

// Closed form of spec §2.7: per-128 act quant, exact products, one bf16 rounding.
std::vector<float> linear_reference(const Tensor& x, const QuantLinear& q) {
  const int64_t T = x.size(0), K = q.k;
  std::vector<float> out(static_cast<size_t>(T * q.n));
  std::vector<float> xf(static_cast<size_t>(K));
  std::vector<uint8_t> codes(static_cast<size_t>(K));
  std::vector<int> exps(static_cast<size_t>(K / 128));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) xf[size_t(k)] = bf(x, t * K + k);
    ref::act_quant_fp8(xf.data(), K, 128, codes.data(), exps.data());
    for (int64_t n = 0; n < q.n; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k)
        acc += double(core::e4m3_to_float(codes[size_t(k)])) * std::ldexp(1.0, exps[size_t(k / 128)]) * weight_value(q, n, k);
      out[size_t(t * q.n + n)] = float(acc);
    }
  }
  return out;
}

// bf16 results may differ from the double closed form by the fp32 summation
// error before rounding: allow one bf16 ulp plus a small absolute slack.
void expect_bf16_close(float got, float want, const char* what, int64_t i) {
  EXPECT_NEAR(got, want, std::fabs(want) * 0.0079f + 1e-5f) << what << " element " << i;
}

class CpuOps : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = make_cpu_backend(2);
};

TEST_F(CpuOps, Fp8AndFp4LinearMatchClosedForm) {
  Rng rng(1);
  for (bool fp4 : {false, true})
    for (int64_t rows : {0, 1, 3}) {
      QuantLinear w = make_quant(192, 256, fp4, 11 + fp4);
      Tensor x = rng.bf16({rows, 256}, 2.0f), y = Tensor::empty_cpu(DType::kBF16, {rows, 192});
      testing::poison(y);
      be->linear(x, w, y);
      auto want = linear_reference(x, w);
      for (int64_t i = 0; i < y.numel(); ++i) expect_bf16_close(bf(y, i), core::round_bf16(want[size_t(i)]), "linear", i);
    }
}

TEST_F(CpuOps, GroupedLinearUsesDequantizedWeightsWithoutActQuant) {
  Rng rng(2);
  QuantLinear w = make_quant(256, 128, false, 21);  // 2 groups of 128 outputs, 128 inputs each
  Tensor x = rng.bf16({3, 256}), y = Tensor::empty_cpu(DType::kBF16, {3, 256});
  be->grouped_linear(x, w, 2, y);
  for (int64_t t = 0; t < 3; ++t)
    for (int64_t g = 0; g < 2; ++g)
      for (int64_t r = 0; r < 128; ++r) {
        double acc = 0;
        for (int64_t c = 0; c < 128; ++c) acc += double(bf(x, t * 256 + g * 128 + c)) * weight_value(w, g * 128 + r, c);
        expect_bf16_close(bf(y, t * 256 + g * 128 + r), core::round_bf16(float(acc)), "grouped", r);
      }
}

// grouped_linear_linear: the two ops in sequence (z written too); a second weight whose K
// is not the first's output width is refused by name.
TEST_F(CpuOps, GroupedLinearLinearIsTheTwoOps) {
  Rng rng(4);
  const QuantLinear wa = make_quant(256, 128, false, 25), wb = make_quant(192, 256, false, 26);
  const Tensor x = rng.bf16({3, 256}, 2.0f);
  Tensor z = Tensor::empty_cpu(DType::kBF16, {3, 256}), y = Tensor::empty_cpu(DType::kBF16, {3, 192});
  Tensor want_z = Tensor::empty_cpu(DType::kBF16, {3, 256}), want_y = Tensor::empty_cpu(DType::kBF16, {3, 192});
  testing::poison(z);
  testing::poison(y);
  be->grouped_linear_linear(x, wa, 2, z, wb, y);
  be->grouped_linear(x, wa, 2, want_z);
  be->linear(want_z, wb, want_y);
  EXPECT_EQ(std::memcmp(z.data(), want_z.data(), size_t(z.nbytes())), 0) << "z";
  EXPECT_EQ(std::memcmp(y.data(), want_y.data(), size_t(y.nbytes())), 0) << "y";
  // DSV4_REPEAT_OPS may name the pair (the model calls it, not grouped_linear, for wo_a).
  set_repeated_ops("grouped_linear_linear");
  const int64_t before = repeated_op_runs();
  testing::poison(y);
  be->grouped_linear_linear(x, wa, 2, z, wb, y);
  set_repeated_ops("");
  EXPECT_EQ(repeated_op_runs() - before, 1);
  EXPECT_EQ(std::memcmp(y.data(), want_y.data(), size_t(y.nbytes())), 0) << "y, the pair run twice";
  const QuantLinear narrow = make_quant(192, 128, false, 27);
  try {
    be->grouped_linear_linear(x, wa, 2, z, narrow, y);
    ADD_FAILURE() << "a second weight of K=128 after 256 columns was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("grouped_linear_linear"), std::string::npos) << e.what();
  }
}

// DSV4_REPEAT_OPS's set (backend.h): a named op runs twice a call and writes the same
// outputs, each second run counted; names of ops that are not pure, and unknown
// names, are refused with the list of those allowed.
TEST_F(CpuOps, RepeatedOpsRunTwiceWithTheSameOutputs) {
  Rng rng(3);
  QuantLinear w = make_quant(256, 128, false, 23);
  const Tensor x = rng.bf16({3, 256});
  Tensor once = Tensor::empty_cpu(DType::kBF16, {3, 256}), twice = Tensor::empty_cpu(DType::kBF16, {3, 256});
  be->grouped_linear(x, w, 2, once);
  set_repeated_ops(" grouped_linear , linear_bf16");
  const int64_t before = repeated_op_runs();
  testing::poison(twice);
  be->grouped_linear(x, w, 2, twice);
  EXPECT_EQ(repeated_op_runs() - before, 1);
  EXPECT_EQ(std::memcmp(once.data(), twice.data(), size_t(once.nbytes())), 0) << "grouped_linear run twice";
  set_repeated_ops("");
  be->grouped_linear(x, w, 2, twice);
  EXPECT_EQ(repeated_op_runs() - before, 1) << "an empty set repeats nothing";
  for (const char* bad : {"rms_norm", "hc_pre", "compress", "window_commit", "linerar"}) {
    try {
      set_repeated_ops(std::string("linear,") + bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const std::exception& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(bad), std::string::npos) << msg;
      EXPECT_NE(msg.find(repeatable_ops()), std::string::npos) << msg;
    }
  }
  set_repeated_ops("");
}

TEST_F(CpuOps, HcPreMatchesSpecFormula) {
  Rng rng(3);
  const int64_t T = 2, hc = 4, D = 128, mix = 24;
  HcConfig c;
  HcWeights w{rng.f32({mix, hc * D}, 1.0f / 22.6f), rng.f32({mix}, 0.5f), rng.f32({3}, 0.1f, 1.0f)};
  Tensor X = rng.bf16({T, hc, D}, 3.0f);
  Tensor x = Tensor::empty_cpu(DType::kBF16, {T, D}), post = Tensor::empty_cpu(DType::kF32, {T, hc}),
         comb = Tensor::empty_cpu(DType::kF32, {T, hc, hc});
  be->hc_pre(X, w, c, x, post, comb);
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < hc * D; ++i) ss += double(bf(X, t * hc * D + i)) * bf(X, t * hc * D + i);
    const double r = 1.0 / std::sqrt(ss / double(hc * D) + 1e-6);
    std::vector<double> mixes(mix);
    for (int64_t j = 0; j < mix; ++j) {
      double a = 0;
      for (int64_t i = 0; i < hc * D; ++i) a += double(w.fn.as<float>()[j * hc * D + i]) * bf(X, t * hc * D + i);
      mixes[size_t(j)] = a * r;
    }
    auto sig = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
    const float* s = w.scale.as<float>();
    const float* b = w.base.as<float>();
    for (int64_t i = 0; i < hc; ++i) {
      EXPECT_NEAR(post.as<float>()[t * hc + i], 2.0 * sig(mixes[size_t(hc + i)] * s[1] + b[hc + i]), 1e-5);
      const double pre_i = sig(mixes[size_t(i)] * s[0] + b[i]) + 1e-6;
      (void)pre_i;
    }
    for (int64_t d = 0; d < D; ++d) {
      double acc = 0;
      for (int64_t i = 0; i < hc; ++i) acc += (sig(mixes[size_t(i)] * s[0] + b[i]) + 1e-6) * bf(X, (t * hc + i) * D + d);
      expect_bf16_close(bf(x, t * D + d), core::round_bf16(float(acc)), "hc_pre x", d);
    }
    // comb: Sinkhorn of the logits (checked in detail in primitives_test).
    std::vector<float> logits(16);
    for (int64_t i = 0; i < 16; ++i) logits[size_t(i)] = float(mixes[size_t(2 * hc + i)] * s[2] + b[2 * hc + i]);
    ref::sinkhorn(logits.data(), 4, 20, 1e-6f);
    for (int64_t i = 0; i < 16; ++i) EXPECT_NEAR(comb.as<float>()[t * 16 + i], logits[size_t(i)], 1e-4);
  }
}

// HcConfig::sinkhorn_later: each hc_pre op leaves comb as the Sinkhorn's logits
// (mixes * scale[2] + base) and hc_sinkhorn finishes it; every output is then the
// whole op's, bit for bit. hc_sinkhorn names the tensor it rejects.
TEST_F(CpuOps, HcSinkhornLaterEqualsSinkhornInPre) {
  Rng rng(8);
  const int64_t T = 3, hc = 4, D = 128, mix = (2 + hc) * hc, Na = 128, Nb = 256;
  HcConfig whole;
  HcConfig later = whole;
  later.sinkhorn_later = true;
  HcWeights w{rng.f32({mix, hc * D}, 1.0f / 22.6f), rng.f32({mix}, 0.5f), rng.f32({3}, 0.1f, 1.0f)};
  const QuantLinear wa = make_quant(Na, D, false, 81), wb = make_quant(Nb, D, false, 82);
  auto equal = [](const Tensor& a, const Tensor& b) { return std::memcmp(a.data(), b.data(), a.nbytes()) == 0; };
  auto bf16 = [](std::initializer_list<int64_t> shape) { return Tensor::empty_cpu(DType::kBF16, shape); };
  auto f32 = [](std::initializer_list<int64_t> shape) { return Tensor::empty_cpu(DType::kF32, shape); };
  const Tensor X = rng.bf16({T, hc, D}, 3.0f), norm_w = rng.bf16({D}), f = rng.bf16({T, D});
  const Tensor post0 = rng.f32({T, hc}, 0.5f, 1.0f), comb0 = rng.f32({T, hc, hc}, 0.3f, 0.25f);
  for (int op = 0; op < 3; ++op) {
    Tensor x[2], xn[2], post[2], comb[2], ya[2], yb[2], Y[2];
    for (int l = 0; l < 2; ++l) {
      const HcConfig& c = l ? later : whole;
      x[l] = bf16({T, D}), xn[l] = bf16({T, D}), post[l] = f32({T, hc}), comb[l] = f32({T, hc, hc});
      ya[l] = bf16({T, Na}), yb[l] = bf16({T, Nb}), Y[l] = bf16({T, hc, D});
      for (Tensor* t : {&xn[l], &ya[l], &yb[l], &Y[l]}) std::memset(t->data(), 0, t->nbytes());
      if (op == 0) {
        be->hc_pre(X, w, c, x[l], post[l], comb[l]);
      } else if (op == 1) {
        be->hc_pre_norm_linear_pair(X, w, c, norm_w, 1e-6f, x[l], xn[l], post[l], comb[l], wa, ya[l], wb, yb[l]);
      } else {
        be->hc_post_pre_norm(HcPostInput::of_sublayer(f, X, post0, comb0), Y[l], w, c, norm_w, 1e-6f, x[l], xn[l],
                             post[l], comb[l]);
      }
      if (l == 1) {
        // What was left: the logits of spec §4.1 (double-precision formula, as HcPreMatchesSpecFormula).
        if (op == 0) {
          for (int64_t t = 0; t < T; ++t) {
            double ss = 0;
            for (int64_t i = 0; i < hc * D; ++i) ss += double(bf(X, t * hc * D + i)) * bf(X, t * hc * D + i);
            const double r = 1.0 / std::sqrt(ss / double(hc * D) + 1e-6);
            for (int64_t e = 0; e < hc * hc; ++e) {
              double a = 0;
              for (int64_t i = 0; i < hc * D; ++i)
                a += double(w.fn.as<float>()[(2 * hc + e) * hc * D + i]) * bf(X, t * hc * D + i);
              const double logit = a * r * w.scale.as<float>()[2] + w.base.as<float>()[2 * hc + e];
              EXPECT_NEAR(comb[l].as<float>()[t * hc * hc + e], logit, 1e-4) << "t=" << t << " e=" << e;
            }
          }
        }
        be->hc_sinkhorn(comb[l], c);
      }
    }
    EXPECT_TRUE(equal(x[0], x[1]) && equal(xn[0], xn[1]) && equal(post[0], post[1]) && equal(comb[0], comb[1]) &&
                equal(ya[0], ya[1]) && equal(yb[0], yb[1]) && equal(Y[0], Y[1]))
        << "op " << op;
  }
  try {
    be->hc_sinkhorn(f32({T, hc, hc + 1}), whole);
    ADD_FAILURE() << "a [3, 4, 5] comb was accepted";
  } catch (const core::Error& e) {
    EXPECT_NE(std::string(e.what()).find("hc_sinkhorn: comb"), std::string::npos) << e.what();
  }
  be->hc_sinkhorn(f32({0, hc, hc}), whole);  // no rows: nothing to do
}

TEST_F(CpuOps, HcPostSumsOverTheFirstIndexOfComb) {
  Rng rng(4);
  const int64_t T = 2, hc = 4, D = 64;
  Tensor f = rng.bf16({T, D}), R = rng.bf16({T, hc, D}), post = rng.f32({T, hc}), comb = rng.f32({T, hc, hc});
  Tensor Y = Tensor::empty_cpu(DType::kBF16, {T, hc, D});
  be->hc_post(f, R, post, comb, Y);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < hc; ++j)
      for (int64_t d = 0; d < D; ++d) {
        double acc = double(post.as<float>()[t * hc + j]) * bf(f, t * D + d);
        for (int64_t i = 0; i < hc; ++i) acc += double(comb.as<float>()[(t * hc + i) * hc + j]) * bf(R, (t * hc + i) * D + d);
        expect_bf16_close(bf(Y, (t * hc + j) * D + d), core::round_bf16(float(acc)), "hc_post", d);
      }
}

// The fused FFN output is moe_output then hc_post, and checks both contracts by name.
TEST_F(CpuOps, MoeOutputHcPostIsMoeOutputThenHcPost) {
  Rng rng(5);
  const int64_t T = 3, hc = 4, D = 64;
  Tensor routed = rng.f32({T, D}), shared = rng.bf16({T, D}), R = rng.bf16({T, hc, D}), post = rng.f32({T, hc}),
         comb = rng.f32({T, hc, hc});
  Tensor y = Tensor::empty_cpu(DType::kBF16, {T, D}), Y = Tensor::empty_cpu(DType::kBF16, {T, hc, D});
  Tensor want_y = Tensor::empty_cpu(DType::kBF16, {T, D}), want = Tensor::empty_cpu(DType::kBF16, {T, hc, D});
  be->moe_output_hc_post(routed, shared, R, post, comb, y, Y);
  be->moe_output(routed, shared, want_y);
  be->hc_post(want_y, R, post, comb, want);
  EXPECT_EQ(std::memcmp(y.data(), want_y.data(), want_y.nbytes()), 0);
  EXPECT_EQ(std::memcmp(Y.data(), want.data(), want.nbytes()), 0);
  Tensor bad_post = rng.f32({T, hc + 1});
  try {
    be->moe_output_hc_post(routed, shared, R, bad_post, comb, y, Y);
    ADD_FAILURE() << "a post of the wrong shape was accepted";
  } catch (const core::Error& e) {
    EXPECT_NE(std::string(e.what()).find("moe_output_hc_post"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("post"), std::string::npos) << e.what();
  }
}

// The norm + linear ops are their parts in sequence (the contract a backend's fused
// version must keep), and their contract errors name the op and the tensor.
TEST_F(CpuOps, NormLinearOpsAreTheirPartsInSequence) {
  Rng rng(6);
  const int64_t T = 3, hc = 4, D = 256, Na = 128, Nb = 384;
  const QuantLinear wa = make_quant(Na, D, false, 61), wb = make_quant(Nb, D, false, 62);
  auto equal = [](const Tensor& a, const Tensor& b) { return std::memcmp(a.data(), b.data(), a.nbytes()) == 0; };
  auto bf16 = [&](std::initializer_list<int64_t> shape) { return Tensor::empty_cpu(DType::kBF16, shape); };
  Tensor x = rng.bf16({T, D}, 3.0f), norm_w = rng.bf16({D});
  {
    Tensor xn = bf16({T, D}), ya = bf16({T, Na}), yb = bf16({T, Nb});
    Tensor want_xn = bf16({T, D}), want_a = bf16({T, Na}), want_b = bf16({T, Nb});
    be->rms_norm(x, norm_w, 1e-6f, want_xn);
    be->linear_pair(want_xn, wa, want_a, wb, want_b);
    be->rms_norm_linear_pair(x, norm_w, 1e-6f, xn, wa, ya, wb, yb);
    EXPECT_TRUE(equal(xn, want_xn) && equal(ya, want_a) && equal(yb, want_b)) << "rms_norm_linear_pair";
    Tensor y1 = bf16({T, Na}), want_1 = bf16({T, Na});
    be->linear(want_xn, wa, want_1);
    be->rms_norm_linear(x, norm_w, 1e-6f, xn, wa, y1);
    EXPECT_TRUE(equal(xn, want_xn) && equal(y1, want_1)) << "rms_norm_linear";
    try {
      be->rms_norm_linear_pair(x, norm_w, 1e-6f, bf16({T, D + 128}), wa, ya, wb, yb);
      ADD_FAILURE() << "an xn of the wrong shape was accepted";
    } catch (const core::Error& e) {
      EXPECT_NE(std::string(e.what()).find("rms_norm_linear_pair"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("xn"), std::string::npos) << e.what();
    }
  }
  {
    HcConfig c;
    const int64_t mix = (2 + hc) * hc;
    HcWeights w{rng.f32({mix, hc * D}, 1.0f / 22.6f), rng.f32({mix}, 0.5f), rng.f32({3}, 0.1f, 1.0f)};
    Tensor X = rng.bf16({T, hc, D}, 3.0f);
    auto f32 = [](std::initializer_list<int64_t> shape) { return Tensor::empty_cpu(DType::kF32, shape); };
    Tensor hx = bf16({T, D}), xn = bf16({T, D}), post = f32({T, hc}), comb = f32({T, hc, hc});
    Tensor ya = bf16({T, Na}), yb = bf16({T, Nb});
    Tensor want_x = bf16({T, D}), want_xn = bf16({T, D}), want_post = f32({T, hc}), want_comb = f32({T, hc, hc});
    Tensor want_a = bf16({T, Na}), want_b = bf16({T, Nb});
    be->hc_pre_norm(X, w, c, norm_w, 1e-6f, want_x, want_xn, want_post, want_comb);
    be->linear_pair(want_xn, wa, want_a, wb, want_b);
    be->hc_pre_norm_linear_pair(X, w, c, norm_w, 1e-6f, hx, xn, post, comb, wa, ya, wb, yb);
    EXPECT_TRUE(equal(hx, want_x) && equal(xn, want_xn) && equal(post, want_post) && equal(comb, want_comb) &&
                equal(ya, want_a) && equal(yb, want_b))
        << "hc_pre_norm_linear_pair";
    try {
      be->hc_pre_norm_linear_pair(X, w, c, norm_w, 1e-6f, hx, xn, post, comb, wa, ya, wb, bf16({T, Nb + 1}));
      ADD_FAILURE() << "a yb of the wrong shape was accepted";
    } catch (const core::Error& e) {
      EXPECT_NE(std::string(e.what()).find("hc_pre_norm_linear_pair"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("yb"), std::string::npos) << e.what();
    }
  }
}

// hc_post_pre_norm(_linear_pair) is hc_post (or moe_output_hc_post, after moe_reduce
// from slots), then hc_pre_norm (and linear_pair), with post and comb read and then
// overwritten in place.
TEST_F(CpuOps, HcPostPreNormIsHcPostThenHcPreNorm) {
  Rng rng(7);
  const int64_t T = 3, hc = 4, D = 128, mix = (2 + hc) * hc, Na = 128, Nb = 256;
  HcConfig c;
  HcWeights w{rng.f32({mix, hc * D}, 1.0f / 22.6f), rng.f32({mix}, 0.5f), rng.f32({3}, 0.1f, 1.0f)};
  const QuantLinear wa = make_quant(Na, D, false, 71), wb = make_quant(Nb, D, false, 72);
  auto equal = [](const Tensor& a, const Tensor& b) { return std::memcmp(a.data(), b.data(), a.nbytes()) == 0; };
  auto bf16 = [](std::initializer_list<int64_t> shape) { return Tensor::empty_cpu(DType::kBF16, shape); };
  auto copy = [](const Tensor& t) {
    Tensor r = Tensor::empty_cpu(t.dtype(), t.shape(), t.ndim());
    std::memcpy(r.data(), t.data(), t.nbytes());
    return r;
  };
  Tensor norm_w = rng.bf16({D}), R = rng.bf16({T, hc, D}, 2.0f), f = rng.bf16({T, D});
  Tensor routed = rng.f32({T, D}), shared = rng.bf16({T, D});
  const int64_t k = 3;
  Tensor slot_out = rng.bf16({T, k, D}), ids = Tensor::empty_cpu(DType::kI32, {T, k});
  for (int64_t i = 0; i < T * k; ++i) ids.as<int32_t>()[i] = int32_t((i * 7 + 5) % 11) - 1;  // one -1
  const Tensor post0 = rng.f32({T, hc}, 0.5f, 1.0f), comb0 = rng.f32({T, hc, hc}, 0.3f, 0.25f);
  for (const int form : {0, 1, 2}) {  // f, moe (routed), moe slots
    const bool moe = form > 0, slots = form == 2;
    Tensor post = copy(post0), comb = copy(comb0), y = bf16({T, D}), Y = bf16({T, hc, D}), x = bf16({T, D}),
           xn = bf16({T, D}), ya = bf16({T, Na}), yb = bf16({T, Nb});
    Tensor routed_scratch = Tensor::empty_cpu(DType::kF32, {T, D});
    HcPostInput in = slots ? HcPostInput::of_moe_slots(slot_out, ids, routed_scratch, shared, y, R, post, comb)
                     : moe ? HcPostInput::of_moe_output(routed, shared, y, R, post, comb)
                           : HcPostInput::of_sublayer(f, R, post, comb);
    be->hc_post_pre_norm_linear_pair(in, Y, w, c, norm_w, 1e-6f, x, xn, post, comb, wa, ya, wb, yb);
    Tensor spost = copy(post0), scomb = copy(comb0), sy = bf16({T, D}), sY = bf16({T, hc, D}), sx = bf16({T, D}),
           sxn = bf16({T, D}), sya = bf16({T, Na}), syb = bf16({T, Nb});
    if (slots) be->moe_reduce(slot_out, ids, routed);
    if (moe) be->moe_output_hc_post(routed, shared, R, spost, scomb, sy, sY);
    else be->hc_post(f, R, spost, scomb, sY);
    be->hc_pre_norm(sY, w, c, norm_w, 1e-6f, sx, sxn, spost, scomb);
    be->linear_pair(sxn, wa, sya, wb, syb);
    EXPECT_TRUE((!moe || equal(y, sy)) && equal(Y, sY) && equal(x, sx) && equal(xn, sxn) && equal(post, spost) &&
                equal(comb, scomb) && equal(ya, sya) && equal(yb, syb))
        << (slots ? "slots" : moe ? "moe" : "f");
    if (slots) {  // ids of another slot count
      HcPostInput bad = in;
      bad.ids = Tensor::empty_cpu(DType::kI32, {T, k + 1});
      try {
        be->hc_post_pre_norm(bad, Y, w, c, norm_w, 1e-6f, x, xn, post, comb);
        ADD_FAILURE() << "ids of the wrong shape were accepted";
      } catch (const core::Error& e) {
        EXPECT_NE(std::string(e.what()).find("ids"), std::string::npos) << e.what();
      }
    }
    in.R = Y;  // Y may not alias R
    try {
      be->hc_post_pre_norm(in, Y, w, c, norm_w, 1e-6f, x, xn, post, comb);
      ADD_FAILURE() << "Y aliasing R was accepted";
    } catch (const core::Error& e) {
      EXPECT_NE(std::string(e.what()).find("hc_post_pre_norm: Y aliases R"), std::string::npos) << e.what();
    }
  }
}

// The model of the CUDA tensor-core attention (kHopperWgmma: chunks of 32 keys,
// online softmax per 64-key segment, tensor-core sums) against the reference's
// attention: within the fast kernel's documented tolerance (2 bf16 ulp + 4e-3 of
// the largest |v| per element, relative L2 below 1e-2 per head), over 130 keys
// (5 chunks, 3 segments, the last chunk partial).
TEST_F(CpuOps, HopperAttentionModelStaysWithinTheFastKernelTolerance) {
  Rng rng(15);
  const int64_t H = 3, W = 128;
  for (const int64_t Dh : {128, 512}) {
    auto hopper = make_cpu_backend(2, QuantDotModel::kHopperWgmma);
    CacheGeometry g{3, 8, W, Dh, 128};
    LayerCache cache = be->allocate_cache(g, 128);
    for (int64_t i = 0; i < cache.window.numel(); ++i) cache.window.as<uint16_t>()[i] = core::float_to_bf16(rng.normal());
    for (int64_t i = 0; i < cache.rows.numel(); ++i) cache.rows.as<uint16_t>()[i] = core::float_to_bf16(rng.normal());
    testing::HostBatch hb({{1, 300, 2}}, 4);
    hb.block_table = {5, 6, 7, 0};
    const BatchView batch = hb.view();
    Tensor q = rng.bf16({2, H, Dh}, 2.0f), kv = rng.bf16({2, Dh}), sink = rng.f32({H});
    RopeTable rope{Tensor::empty_cpu(DType::kF32, {32}), 64};
    auto inv = rope_inv_freq(64, 160000, true, 16, 65536, 32, 1);
    std::copy(inv.begin(), inv.end(), rope.inv_freq.as<float>());
    const float scale = 1.0f / std::sqrt(float(Dh));
    Tensor want = Tensor::empty_cpu(DType::kBF16, {2, H, Dh}), got = Tensor::empty_cpu(DType::kBF16, {2, H, Dh});
    be->sparse_attention(q, kv, cache, batch, Tensor(), sink, scale, rope, want);
    hopper->sparse_attention(q, kv, cache, batch, Tensor(), sink, scale, rope, got);
    float vmax = 0.0f;
    for (const Tensor* t : {&cache.window, &cache.rows, &kv})
      for (int64_t i = 0; i < t->numel(); ++i) vmax = std::max(vmax, std::fabs(bf(*t, i)));
    int64_t differ = 0;
    for (int64_t row = 0; row < 2 * H; ++row) {
      double err = 0.0, norm = 0.0;
      for (int64_t i = 0; i < Dh; ++i) {
        const float w = bf(want, row * Dh + i), o = bf(got, row * Dh + i);
        EXPECT_LE(std::fabs(o - w), 2.0f * std::ldexp(std::fabs(w), -7) + 4e-3f * vmax) << "Dh " << Dh << " row " << row << " i " << i;
        err += double(o - w) * double(o - w);
        norm += double(w) * double(w);
        differ += o != w;
      }
      EXPECT_LT(std::sqrt(err / norm), 1e-2) << "Dh " << Dh << " row " << row;
    }
    EXPECT_GT(differ, 0) << "the model should not be the reference's arithmetic";
  }
}

TEST_F(CpuOps, SparseAttentionWithSinkOverWindowRingAndCompressedRows) {
  // One HCA layer, window 4; a 2-token step at positions 300, 301 of a sequence in
  // slot 1: keys = window (ring for 298, 299; this step's rows for 300, 301) + the
  // 2 compressed rows visible at p >= 255.
  Rng rng(5);
  const int64_t H = 2, Dh = 128, W = 4;
  CacheGeometry g{3, 8, W, Dh, 128};
  LayerCache cache = be->allocate_cache(g, 128);
  Rng fill(6);
  for (int64_t i = 0; i < cache.window.numel(); ++i) cache.window.as<uint16_t>()[i] = core::float_to_bf16(fill.normal());
  for (int64_t i = 0; i < cache.rows.numel(); ++i) cache.rows.as<uint16_t>()[i] = core::float_to_bf16(fill.normal());
  testing::HostBatch hb({{1, 300, 2}}, 4);
  hb.block_table = {5, 6, 7, 0};  // pages of sequence 0
  const BatchView batch = hb.view();
  Tensor q = rng.bf16({2, H, Dh}, 0.3f), kv = rng.bf16({2, Dh}), sink = rng.f32({H});
  Tensor o = Tensor::empty_cpu(DType::kBF16, {2, H, Dh});
  RopeTable rope{Tensor::empty_cpu(DType::kF32, {32}), 64};
  auto inv = rope_inv_freq(64, 160000, true, 16, 65536, 32, 1);
  std::copy(inv.begin(), inv.end(), rope.inv_freq.as<float>());
  const float scale = 1.0f / std::sqrt(float(Dh));
  be->sparse_attention(q, kv, cache, batch, Tensor(), sink, scale, rope, o);
  for (int64_t t = 0; t < 2; ++t) {
    const int64_t p = 300 + t;
    std::vector<const uint16_t*> keys;
    for (int64_t qp = p - W + 1; qp <= p; ++qp)
      keys.push_back(qp >= 300 ? kv.as<uint16_t>() + (qp - 300) * Dh : cache.window.as<uint16_t>() + (1 * W + qp % W) * Dh);
    // HCA row j lives on page block_table[j*128/256], row j % 2 of it.
    for (int64_t j = 0; j < (p + 1) / 128; ++j) keys.push_back(cache.rows.as<uint16_t>() + (5 * 2 + j) * Dh);
    ASSERT_EQ(keys.size(), 6u);
    for (int64_t h = 0; h < H; ++h) {
      std::vector<double> l;
      double mx = -1e30;
      for (auto* k : keys) {
        double a = 0;
        for (int64_t i = 0; i < Dh; ++i) a += double(bf(q, (t * H + h) * Dh + i)) * core::bf16_to_float(k[i]);
        l.push_back(a * scale);
        mx = std::max(mx, l.back());
      }
      double denom = std::exp(double(sink.as<float>()[h]) - mx);
      std::vector<double> acc(size_t(Dh), 0.0);
      for (size_t u = 0; u < keys.size(); ++u) {
        const double pr = std::exp(l[u] - mx);
        denom += pr;
        for (int64_t i = 0; i < Dh; ++i) acc[size_t(i)] += double(core::round_bf16(float(pr))) * core::bf16_to_float(keys[u][i]);
      }
      std::vector<uint16_t> want(static_cast<size_t>(Dh));
      for (int64_t i = 0; i < Dh; ++i) want[size_t(i)] = core::float_to_bf16(float(acc[size_t(i)] / denom));
      ref::rope_bf16(want.data() + Dh - 64, 32, rope.inv_freq.as<float>(), p, true);
      for (int64_t i = 0; i < Dh; ++i)
        EXPECT_NEAR(bf(o, (t * H + h) * Dh + i), core::bf16_to_float(want[size_t(i)]),
                    0.016f * std::fabs(core::bf16_to_float(want[size_t(i)])) + 1e-3f)
            << "t " << t << " h " << h << " i " << i;
    }
  }
}

TEST_F(CpuOps, IndexerTopkIsCausalAndBreaksTiesLow) {
  // One CSA layer; queries at positions 7 and 10 see 2 rows each ((p+1)//4);
  // position 13 sees 3. Rows are built so that per-head logits are known; the
  // selected rows come in ascending row order.
  const int64_t Hi = 1, Di = 32;
  CacheGeometry g{1, 1, 4, 128, Di};
  LayerCache cache = be->allocate_cache(g, 4);
  auto set_row = [&](int64_t j, float v) {
    for (int64_t i = 0; i < Di; ++i) cache.index_rows.as<uint16_t>()[j * Di + i] = core::float_to_bf16(i == 0 ? v : 0.0f);
  };
  set_row(0, 1.0f);
  set_row(1, 2.0f);
  set_row(2, 2.0f);  // ties with row 1
  set_row(3, 9.0f);  // not yet visible to any query
  testing::HostBatch hb({{0, 7, 1}, {0, 10, 1}, {0, 13, 1}}, 1);
  for (auto& b : hb.block_table) b = 0;
  Tensor q = Tensor::zeros_cpu(DType::kBF16, {3, Hi, Di}), w = Tensor::empty_cpu(DType::kBF16, {3, Hi});
  for (int t = 0; t < 3; ++t) {
    q.as<uint16_t>()[t * Di] = core::float_to_bf16(1.0f);
    w.as<uint16_t>()[t] = core::float_to_bf16(1.0f);
  }
  Tensor topk = Tensor::empty_cpu(DType::kI32, {3, 2});
  be->indexer_topk(q, w, 1.0f, cache, hb.view(), topk);
  const int32_t* k = topk.as<int32_t>();
  EXPECT_EQ(k[0], 0);  // p=7: rows {0, 1}, in row order
  EXPECT_EQ(k[1], 1);
  EXPECT_EQ(k[2], 0);  // p=10: rows {0, 1}
  EXPECT_EQ(k[3], 1);
  EXPECT_EQ(k[4], 1);  // p=13: rows {0, 1, 2}; 1 and 2 tie above 0, row 3 invisible
  EXPECT_EQ(k[5], 2);
  // With a negative query every ReLU'd score is 0: all tie, lowest rows win.
  for (int t = 0; t < 3; ++t) q.as<uint16_t>()[t * Di] = core::float_to_bf16(-1.0f);
  Tensor topk3 = Tensor::empty_cpu(DType::kI32, {3, 4});
  be->indexer_topk(q, w, 1.0f, cache, hb.view(), topk3);
  EXPECT_EQ(std::vector<int32_t>(topk3.as<int32_t>() + 8, topk3.as<int32_t>() + 12), (std::vector<int32_t>{0, 1, 2, -1}));
  be->indexer_topk(q, w, 1.0f, cache, hb.view(), topk);  // p=13 at K=2: rows 0 and 1 of the three tied
  EXPECT_EQ(std::vector<int32_t>(topk.as<int32_t>() + 4, topk.as<int32_t>() + 6), (std::vector<int32_t>{0, 1}));
  // Selected by score, written in row order: row 2 scores 9 and row 0 scores 1 (p=13, K=2).
  set_row(2, 9.0f);
  for (int t = 0; t < 3; ++t) q.as<uint16_t>()[t * Di] = core::float_to_bf16(1.0f);
  be->indexer_topk(q, w, 1.0f, cache, hb.view(), topk);
  EXPECT_EQ(std::vector<int32_t>(topk.as<int32_t>() + 4, topk.as<int32_t>() + 6), (std::vector<int32_t>{1, 2}));
}

TEST_F(CpuOps, RouterSelectsByBiasButWeightsByScores) {
  const int64_t E = 4, D = 128;
  Tensor gate = Tensor::zeros_cpu(DType::kBF16, {E, D}), x = Tensor::zeros_cpu(DType::kBF16, {2, D});
  // Logit of expert e = e - 1 for a row x = e_0.
  for (int64_t e = 0; e < E; ++e) gate.as<uint16_t>()[e * D] = core::float_to_bf16(float(e) - 1.0f);
  x.as<uint16_t>()[0] = core::float_to_bf16(1.0f);
  x.as<uint16_t>()[D] = core::float_to_bf16(1.0f);
  Tensor bias = Tensor::zeros_cpu(DType::kF32, {E});
  bias.as<float>()[0] = 10.0f;  // selects expert 0 despite its low score
  testing::HostBatch hb({{0, 0, 2}}, 1);
  RouterConfig rc;
  rc.topk = 2;
  rc.route_scale = 1.5f;
  Tensor w = Tensor::empty_cpu(DType::kF32, {2, 2}), ids = Tensor::empty_cpu(DType::kI32, {2, 2});
  be->router(x, gate, bias, Tensor(), hb.view(), rc, w, ids);
  auto score = [](double l) { return std::sqrt(std::log1p(std::exp(l))); };
  EXPECT_EQ(ids.as<int32_t>()[0], 0);
  EXPECT_EQ(ids.as<int32_t>()[1], 3);
  const double s0 = score(-1), s3 = score(2);
  EXPECT_NEAR(w.as<float>()[0], 1.5 * s0 / (s0 + s3), 1e-6);
  EXPECT_NEAR(w.as<float>()[1], 1.5 * s3 / (s0 + s3), 1e-6);
  // Hash routing takes ids from tid2eid by token id; weights still from the scores.
  Tensor tid2eid = Tensor::empty_cpu(DType::kI64, {1000, 2});
  for (int64_t t = 0; t < 1000; ++t) {
    tid2eid.as<int64_t>()[2 * t] = t % 4;
    tid2eid.as<int64_t>()[2 * t + 1] = (t + 1) % 4;
  }
  be->router(x, gate, Tensor(), tid2eid, hb.view(), rc, w, ids);
  for (int64_t r = 0; r < 2; ++r) {
    const int64_t tok = hb.token_ids[size_t(r)];
    EXPECT_EQ(ids.as<int32_t>()[r * 2], tok % 4);
    EXPECT_EQ(ids.as<int32_t>()[r * 2 + 1], (tok + 1) % 4);
    const double a = score(double(tok % 4) - 1), b = score(double((tok + 1) % 4) - 1);
    EXPECT_NEAR(w.as<float>()[r * 2], 1.5 * a / (a + b), 1e-6);
  }
}

// Non-finite biased scores: -inf ties go to the lower ids, each once (fewer finite scores
// than k); NaN scores are never selected, and slots left without a candidate route nowhere
// (id -1, weight 0), also in a row of NaN logits.
TEST_F(CpuOps, RouterNeverRepeatsAnExpertAndSkipsNaNScores) {
  const int64_t E = 8, D = 128, k = 4;
  Tensor gate = Tensor::zeros_cpu(DType::kBF16, {E, D}), x = Tensor::zeros_cpu(DType::kBF16, {2, D});
  for (int64_t e = 0; e < E; ++e) gate.as<uint16_t>()[e * D] = core::float_to_bf16(float(e) - 4.0f);
  x.as<uint16_t>()[0] = core::float_to_bf16(1.0f);
  x.as<uint16_t>()[D] = core::float_to_bf16(std::nanf(""));  // row 1: every logit NaN
  Tensor bias = Tensor::zeros_cpu(DType::kF32, {E});
  for (int64_t e = 0; e < E; ++e) bias.as<float>()[e] = -INFINITY;
  bias.as<float>()[6] = 0.0f;  // experts 6 and 2 finite, 6 first
  bias.as<float>()[2] = 0.0f;
  bias.as<float>()[5] = std::nanf("");  // expert 5 NaN, never selected
  testing::HostBatch hb({{0, 0, 2}}, 1);
  RouterConfig rc;
  rc.topk = k;
  rc.scoring = ScoringFunc::kSigmoid;
  Tensor w = Tensor::empty_cpu(DType::kF32, {2, k}), ids = Tensor::empty_cpu(DType::kI32, {2, k});
  be->router(x, gate, bias, Tensor(), hb.view(), rc, w, ids);
  EXPECT_EQ(std::vector<int32_t>(ids.as<int32_t>(), ids.as<int32_t>() + k), (std::vector<int32_t>{6, 2, 0, 1}));
  const double s[4] = {1 / (1 + std::exp(-2.0)), 1 / (1 + std::exp(2.0)), 1 / (1 + std::exp(4.0)),
                       1 / (1 + std::exp(3.0))};
  const double sum = s[0] + s[1] + s[2] + s[3];
  for (int64_t i = 0; i < k; ++i) EXPECT_NEAR(w.as<float>()[i], s[i] / sum, 1e-6) << "slot " << i;
  for (int64_t i = 0; i < k; ++i) {
    EXPECT_EQ(ids.as<int32_t>()[k + i], -1) << "NaN row, slot " << i;
    EXPECT_EQ(w.as<float>()[k + i], 0.0f) << "NaN row, slot " << i;
  }
}

TEST_F(CpuOps, ExpertAppliesTheSwigluClampAndWeightBeforeW2) {
  Rng rng(7);
  ExpertWeights ew{make_quant(128, 128, true, 31), make_quant(128, 128, true, 32), make_quant(128, 128, true, 33)};
  Tensor x = rng.bf16({2, 128}, 4.0f), rw = rng.f32({2}, 0.3f, 0.5f), y = Tensor::empty_cpu(DType::kBF16, {2, 128});
  const float limit = 0.5f;  // small, so both clamp branches fire
  be->expert_ffn(x, ew, rw, limit, y);
  auto g = linear_reference(x, ew.w1), u = linear_reference(x, ew.w3);
  Tensor h = Tensor::empty_cpu(DType::kBF16, {2, 128});
  int clamped = 0;
  for (int64_t i = 0; i < 256; ++i) {
    float gate = core::round_bf16(g[size_t(i)]), up = core::round_bf16(u[size_t(i)]);
    clamped += (gate > limit) + (std::fabs(up) > limit);
    up = std::clamp(up, -limit, limit);
    gate = std::min(gate, limit);
    h.as<uint16_t>()[i] = core::float_to_bf16(rw.as<float>()[i / 128] * (gate / (1 + std::exp(-gate))) * up);
  }
  EXPECT_GT(clamped, 10);
  auto want = linear_reference(h, ew.w2);
  for (int64_t i = 0; i < 256; ++i) expect_bf16_close(bf(y, i), core::round_bf16(want[size_t(i)]), "expert", i);
}

TEST_F(CpuOps, MoeReduceAddsInAscendingExpertOrder) {
  // fp32: (2^24 + 1) + -2^24 = 0, but (-2^24 + 2^24) + 1 = 1; the reference order gives 0.
  const int64_t D = 1;
  Tensor slots = Tensor::empty_cpu(DType::kBF16, {1, 3, D}), ids = Tensor::empty_cpu(DType::kI32, {1, 3});
  const float vals[3] = {-16777216.0f, 16777216.0f, 1.0f};
  const int32_t eids[3] = {5, 0, 1};
  for (int i = 0; i < 3; ++i) {
    slots.as<uint16_t>()[i] = core::float_to_bf16(vals[i]);
    ids.as<int32_t>()[i] = eids[i];
  }
  Tensor routed = Tensor::empty_cpu(DType::kF32, {1, D});
  be->moe_reduce(slots, ids, routed);
  EXPECT_EQ(routed.as<float>()[0], 0.0f);
}

TEST_F(CpuOps, EveryOpAcceptsZeroRows) {
  Tensor x0 = Tensor::empty_cpu(DType::kBF16, {0, 256});
  QuantLinear w = make_quant(128, 256, false, 41);
  Tensor y0 = Tensor::empty_cpu(DType::kBF16, {0, 128});
  EXPECT_NO_THROW(be->linear(x0, w, y0));
  Tensor rn = Tensor::empty_cpu(DType::kBF16, {256});
  EXPECT_NO_THROW(be->rms_norm(x0, rn, 1e-6f, x0));
  testing::HostBatch hb({}, 1);
  RouterConfig rc;
  rc.topk = 2;
  Tensor gate = Tensor::zeros_cpu(DType::kBF16, {4, 256});
  Tensor wts = Tensor::empty_cpu(DType::kF32, {0, 2}), ids = Tensor::empty_cpu(DType::kI32, {0, 2});
  EXPECT_NO_THROW(be->router(x0, gate, Tensor::zeros_cpu(DType::kF32, {4}), Tensor(), hb.view(), rc, wts, ids));
}

// The Hopper FP8 dot-product model against hand-computed cases: terms aligned to
// the largest product exponent and truncated toward zero 13 bits below it, the sum
// truncated to 14 significant bits.
TEST(HopperDot, AlignsTruncatesAndKeepsFourteenBits) {
  const auto code = [](float v) { return core::float_to_e4m3(v); };
  uint8_t a[32], b[32];
  const auto fill = [&](float va, float vb) {
    for (int k = 0; k < 32; ++k) {
      a[k] = code(va);
      b[k] = code(vb);
    }
  };
  // 32 equal products: exact (32 * 1.5 * 2 = 96).
  fill(1.5f, 2.0f);
  EXPECT_EQ(ref::hopper_e4m3_dot32(a, b), 96.0f);
  // A product 2^-14 below the largest is truncated away; at 2^-13 it survives.
  fill(0.0f, 0.0f);
  a[0] = code(1.0f), b[0] = code(1.0f);
  a[1] = code(0x1p-7f), b[1] = code(0x1p-7f);  // 2^-14
  EXPECT_EQ(ref::hopper_e4m3_dot32(a, b), 1.0f);
  b[1] = code(0x1p-6f);  // 2^-13: the last kept bit
  EXPECT_EQ(ref::hopper_e4m3_dot32(a, b), 1.0f + 0x1p-13f);
  // Truncation toward zero for a negative term: -(1 + 2^-13 + 2^-14) keeps -(1 + 2^-13).
  a[0] = code(-1.0f);
  a[1] = code(-0x1p-7f), b[1] = code(0x1p-6f);  // -2^-13
  a[2] = code(-0x1p-7f), b[2] = code(0x1p-7f);  // -2^-14: dropped
  EXPECT_EQ(ref::hopper_e4m3_dot32(a, b), -(1.0f + 0x1p-13f));
  // The sum keeps 14 significant bits: 2 + 2^-13 (15 bits at the sum's scale) -> 2.
  fill(0.0f, 0.0f);
  a[0] = code(1.0f), b[0] = code(1.0f);
  a[1] = code(1.0f), b[1] = code(1.0f);
  a[2] = code(0x1p-7f), b[2] = code(0x1p-6f);  // 2^-13
  EXPECT_EQ(ref::hopper_e4m3_dot32(a, b), 2.0f);
  // A lone product of two e4m3 subnormals is exact: 2^-9 * 2^-9.
  fill(0.0f, 0.0f);
  a[0] = code(0x1p-9f), b[0] = code(0x1p-9f);
  EXPECT_EQ(ref::hopper_e4m3_dot32(a, b), 0x1p-18f);
}

// The Hopper bf16 k16 step against hand-computed cases: products keep the exponent
// e_a + e_b, the accumulator joins the alignment, every term is truncated toward
// zero 25 bits below the largest exponent, the sum truncated toward zero to fp32.
TEST(HopperBf16Step, AlignsTruncatesAndRoundsTowardZero) {
  const auto h = [](float v) { return core::float_to_bf16(v); };
  uint16_t a[16], b[16];
  const auto clear = [&] {
    for (int k = 0; k < 16; ++k) a[k] = b[k] = h(0.0f);
  };
  // Small integers: every term and the sum exact, signs and c included.
  clear();
  for (int k = 0; k < 16; ++k) {
    a[k] = h(float(k - 7));
    b[k] = h(float((k % 5) - 2));
  }
  double exact = 100.0;
  for (int k = 0; k < 16; ++k) exact += double(k - 7) * double((k % 5) - 2);
  EXPECT_EQ(ref::hopper_bf16_mma16(100.0f, a, b), float(exact));
  // The final rounding is toward zero: 1 + 1.5 * 2^-24 gives 1 (IEEE fp32 would give 1 + 2^-23).
  clear();
  a[0] = h(0x1.8p-24f), b[0] = h(1.0f);
  EXPECT_EQ(ref::hopper_bf16_mma16(1.0f, a, b), 1.0f);
  EXPECT_EQ(ref::hopper_bf16_mma16(-1.0f, a, b), -1.0f + 0x1p-23f);  // -(1 - 1.5 * 2^-24) toward zero
  // Each term is truncated on its own, 25 bits below c's exponent: 15 products of
  // 1.5 * 2^-25 keep 2^-25 each, the sum 1 + 15 * 2^-25 then truncates to 1 + 3 * 2^-23
  // (the exact sum truncated would be 1 + 5 * 2^-23).
  clear();
  for (int k = 0; k < 15; ++k) a[k] = h(0x1.8p-25f), b[k] = h(1.0f);
  EXPECT_EQ(ref::hopper_bf16_mma16(1.0f, a, b), 1.0f + 3 * 0x1p-23f);
  // A product's exponent is e_a + e_b, not normalised: 1.5 * 1.5 = 2.25 aligns on 2^0,
  // so eight products of 2^-25 keep their bits (2^-22 in all); aligned on 2^1 they would vanish.
  clear();
  a[0] = h(1.5f), b[0] = h(1.5f);
  for (int k = 1; k < 9; ++k) a[k] = h(0x1p-25f), b[k] = h(1.0f);
  EXPECT_EQ(ref::hopper_bf16_mma16(0.0f, a, b), 2.25f + 0x1p-22f);
  // A large accumulator sets the alignment: 2^-26 below 2^0 is dropped, a product at 2^-25 kept.
  clear();
  a[0] = h(0x1p-26f), b[0] = h(1.0f);
  EXPECT_EQ(ref::hopper_bf16_mma16(1.0f, a, b), 1.0f);
  EXPECT_EQ(ref::hopper_bf16_mma16(0.0f, a, b), 0x1p-26f);  // alone it is exact
  // Cancellation to zero gives +0; non-finite inputs follow IEEE's class.
  clear();
  a[0] = h(3.0f), b[0] = h(-1.0f);
  EXPECT_EQ(core::float_bits(ref::hopper_bf16_mma16(3.0f, a, b)), 0u);
  a[1] = h(INFINITY), b[1] = h(1.0f);
  EXPECT_EQ(ref::hopper_bf16_mma16(0.0f, a, b), INFINITY);
  b[1] = h(0.0f);
  EXPECT_TRUE(std::isnan(ref::hopper_bf16_mma16(0.0f, a, b)));
  // A longer K chains steps with the result as the next accumulator.
  uint16_t a32[32], b32[32];
  for (int k = 0; k < 32; ++k) a32[k] = h(0x1.8p-25f), b32[k] = h(1.0f);
  a32[0] = h(1.0f);
  EXPECT_EQ(ref::hopper_bf16_dot(0.0f, a32, b32, 32),
            ref::hopper_bf16_mma16(ref::hopper_bf16_mma16(0.0f, a32, b32), a32 + 16, b32 + 16));
}

// The diagnostic variants the GPU test tries on a mismatch (mma_model_variants.h)
// reduce to the model at its parameters, on random steps of spread exponents.
TEST(HopperBf16Step, DiagnosticVariantAtTheModelsParametersIsTheModel) {
  std::mt19937 gen(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> spread(-12, 12);
  uint16_t a[16], b[16];
  int64_t differ_rne = 0;
  for (int it = 0; it < 20000; ++it) {
    for (int k = 0; k < 16; ++k) {
      a[k] = core::float_to_bf16(std::ldexp(normal(gen), spread(gen)));
      b[k] = core::float_to_bf16(std::ldexp(normal(gen), spread(gen)));
    }
    const float c = it % 3 == 0 ? 0.0f : std::ldexp(normal(gen), spread(gen));
    const float model = ref::hopper_bf16_mma16(c, a, b);
    ASSERT_EQ(core::float_bits(testing::bf16_step_variant(c, a, b, {})), core::float_bits(model)) << it;
    testing::Bf16StepVariant rne;
    rne.round_nearest = true;
    differ_rne += testing::bf16_step_variant(c, a, b, rne) != model;
  }
  EXPECT_GT(differ_rne, 0);  // the variants do differ
}

// One FP8 weight row of K zero codes, block scale 2^0 (the tests set its codes).
QuantLinear zero_fp8_row(int64_t K) {
  QuantLinear w;
  w.format = QuantLinear::Format::kFp8Block128;
  w.n = 1;
  w.k = K;
  w.weight = Tensor::zeros_cpu(DType::kF8E4M3, {1, K});
  w.scale = Tensor::empty_cpu(DType::kF8E8M0, {1, (K + 127) / 128});
  for (int64_t i = 0; i < (K + 127) / 128; ++i) w.scale.as<uint8_t>()[i] = 127;  // 2^0
  return w;
}

// An FP8 linear under kHopperWgmma chains a 128-wide stage's four k32 steps in the
// tensor core (ref::hopper_e4m3_step) before one fold: a product 2^-14 below the
// stage's running sum of 1 + 2^-8 is cut, so the output stays on the bf16 tie
// (rounding to 1), where the exact sum (and chunks folded one by one) round up.
TEST(HopperDot, CpuBackendModelChainsFp8Stages) {
  auto exact = make_cpu_backend(1), hopper = make_cpu_backend(1, QuantDotModel::kHopperWgmma);
  const int64_t K = 128;
  QuantLinear w = zero_fp8_row(K);
  Tensor x = Tensor::zeros_cpu(DType::kBF16, {1, K});
  const std::pair<int, float> terms[] = {{0, 1.0f}, {1, 0x1p-4f}, {32, 0x1p-7f}};  // chunk 0: 1 + 2^-8; chunk 1: 2^-14
  for (const auto& [k, v] : terms) {
    w.weight.as<uint8_t>()[k] = core::float_to_e4m3(v);
    x.as<uint16_t>()[k] = core::float_to_bf16(v);
  }
  Tensor y0 = Tensor::empty_cpu(DType::kBF16, {1, 1}), y1 = Tensor::empty_cpu(DType::kBF16, {1, 1});
  exact->linear(x, w, y0);
  hopper->linear(x, w, y1);
  EXPECT_EQ(core::bf16_to_float(y0.as<uint16_t>()[0]), 1.0f + 0x1p-7f);
  EXPECT_EQ(core::bf16_to_float(y1.as<uint16_t>()[0]), 1.0f);
}

// ref::hopper_e4m3_step on cases an H200 computed (CudaMma.E4m3AccumulatorDump, one
// product onto an accumulator): every term is cut on the grid 2^(E - 13) of the largest
// exponent E before the sum, the accumulator's too.
TEST(HopperDot, E4m3StepOntoAnAccumulatorMatchesTheHardwareCases) {
  uint8_t a[32] = {}, b[32] = {};
  const auto step = [&](uint32_t c_bits, uint8_t x, uint8_t y) {
    a[0] = x, b[0] = y;
    return core::float_bits(ref::hopper_e4m3_step(core::bits_float(c_bits), a, b));
  };
  // c dominates: on c's grid 2^-2, c -> -3455.5 and the product 0.8125 x 0.1875 -> 0.
  EXPECT_EQ(step(0xc557f927u, 0x35, 0x24), 0xc557f800u);
  // The product dominates: c = -6.4e-9 is cut to 0 on the grid 2^-16; 0.171875 x 1.
  EXPECT_EQ(step(0xb1dce400u, 0x23, 0x38), 0x3e300000u);
  // Both cut on 2^-1: 7912.98 -> 7912.5, 1.25 x 1.375 = 1.71875 -> 1.5; 7914.
  EXPECT_EQ(step(0x45f747d9u, 0x3a, 0x3b), 0x45f75000u);
  // The accumulator alone is cut to 14 significant bits; the step from zero is hopper_e4m3_dot32.
  EXPECT_EQ(step(0x3f8ccccdu, 0x00, 0x38), 0x3f8ccc00u);
}

// The e4m3 step variants' defaults are ref::hopper_e4m3_step, and with c = 0
// ref::hopper_e4m3_dot32, on random finite codes of every exponent and spread accumulators.
TEST(HopperDot, E4m3StepVariantDefaultsAreTheModel) {
  std::mt19937 gen(0x5e);
  std::uniform_int_distribution<int> byte(0, 255), spread(-30, 30);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  uint8_t a[32], b[32];
  for (int it = 0; it < 20000; ++it) {
    for (int k = 0; k < 32; ++k) {
      do a[k] = uint8_t(byte(gen)); while ((a[k] & 0x7f) == 0x7f);
      do b[k] = uint8_t(byte(gen)); while ((b[k] & 0x7f) == 0x7f);
    }
    const float c = it % 4 == 0 ? 0.0f : std::ldexp(normal(gen), spread(gen));
    const float model = ref::hopper_e4m3_step(c, a, b);
    ASSERT_EQ(core::float_bits(testing::e4m3_step_variant(c, a, b, {})), core::float_bits(model)) << it;
    if (c == 0.0f) {
      ASSERT_EQ(core::float_bits(ref::hopper_e4m3_dot32(a, b)), core::float_bits(model)) << it;
    }
  }
}

// Where no product is truncated, QuantDotModel::kHopperWgmma equals the exact sum,
// for FP4 and FP8 weights.
TEST(HopperDot, CpuBackendModelEqualsExactWithoutTruncation) {
  auto exact = make_cpu_backend(1), hopper = make_cpu_backend(1, QuantDotModel::kHopperWgmma);
  const int64_t N = 3, K = 256;
  for (const bool fp4 : {true, false}) {
    QuantLinear w;
    w.format = fp4 ? QuantLinear::Format::kFp4Group32 : QuantLinear::Format::kFp8Block128;
    w.n = N;
    w.k = K;
    if (fp4) {
      w.weight = Tensor::empty_cpu(DType::kI8, {N, K / 2});
      w.scale = Tensor::empty_cpu(DType::kF8E8M0, {N, K / 32});
      for (int64_t i = 0; i < N * K / 2; ++i) w.weight.as<uint8_t>()[i] = uint8_t(0x22 + (i % 3));  // 1.0 / 1.5 / 2.0
    } else {
      w.weight = Tensor::empty_cpu(DType::kF8E4M3, {N, K});
      w.scale = Tensor::empty_cpu(DType::kF8E8M0, {1, K / 128});
      const float values[3] = {1.0f, 1.5f, 2.0f};
      for (int64_t i = 0; i < N * K; ++i) w.weight.as<uint8_t>()[i] = core::float_to_e4m3(values[i % 3]);
    }
    for (int64_t i = 0; i < w.scale.numel(); ++i) w.scale.as<uint8_t>()[i] = uint8_t(120 + i % 5);
    Tensor x = Tensor::empty_cpu(DType::kBF16, {2, K});
    for (int64_t i = 0; i < 2 * K; ++i) x.as<uint16_t>()[i] = core::float_to_bf16(i % 2 ? 0.5f : 1.0f);
    Tensor y0 = Tensor::empty_cpu(DType::kBF16, {2, N}), y1 = Tensor::empty_cpu(DType::kBF16, {2, N});
    exact->linear(x, w, y0);
    hopper->linear(x, w, y1);
    for (int64_t i = 0; i < 2 * N; ++i) EXPECT_EQ(y0.as<uint16_t>()[i], y1.as<uint16_t>()[i]) << (fp4 ? "fp4 " : "fp8 ") << i;
  }
}

// The model reaches FP8 linears: +1 - 1 + 2^-14 in one chunk (activation codes 256,
// -256, 2 at scale 2^-8) is 2^-14 exactly, but the tensor core aligns the 2^-6
// product 14 binades below the largest and drops it.
TEST(HopperDot, CpuBackendModelTruncatesFp8Chunks) {
  auto exact = make_cpu_backend(1), hopper = make_cpu_backend(1, QuantDotModel::kHopperWgmma);
  const int64_t K = 128;
  QuantLinear w = zero_fp8_row(K);
  for (int i = 0; i < 3; ++i) w.weight.as<uint8_t>()[i] = core::float_to_e4m3(i < 2 ? 1.0f : 0x1p-7f);
  Tensor x = Tensor::zeros_cpu(DType::kBF16, {1, K});
  x.as<uint16_t>()[0] = core::float_to_bf16(1.0f);
  x.as<uint16_t>()[1] = core::float_to_bf16(-1.0f);
  x.as<uint16_t>()[2] = core::float_to_bf16(0x1p-7f);
  Tensor y0 = Tensor::empty_cpu(DType::kBF16, {1, 1}), y1 = Tensor::empty_cpu(DType::kBF16, {1, 1});
  exact->linear(x, w, y0);
  hopper->linear(x, w, y1);
  EXPECT_EQ(core::bf16_to_float(y0.as<uint16_t>()[0]), 0x1p-14f);
  EXPECT_EQ(core::bf16_to_float(y1.as<uint16_t>()[0]), 0.0f);
}

// The K slices of the CUDA GEMMs (ops/gemm_order.h) at the model's shapes: enough
// slices for ~256 CTAs, whole stages per slice, at most 32.
TEST(HopperGemmOrder, SlicesFollowTheLaunchNotTheRows) {
  EXPECT_EQ(gemm_k_slices(gemm_weight_tiles(1024), 4096 / 128, 1), 32);       // Flash wq_a: 8 tiles
  EXPECT_EQ(gemm_k_slices(gemm_weight_tiles(1024 + 512), 4096 / 128, 1), 32);  // wq_a + wkv stacked: 12 tiles
  EXPECT_EQ(gemm_k_slices(gemm_weight_tiles(2048 + 2048), 4096 / 128, 1), 8);  // 32 tiles stacked; 16 alone
  EXPECT_EQ(gemm_k_slices(gemm_weight_tiles(32768), 1024 / 128, 1), 1);        // wq_b: 256 tiles
  EXPECT_EQ(gemm_k_slices(gemm_weight_tiles(4096), 2048 / 128, 4), 2);         // routed w2: 32 tiles x 4
  EXPECT_EQ(gemm_k_slices(gemm_weight_tiles(200), 384 / 128, 1), 1);           // 3 stages: odd
  EXPECT_EQ(gemm_k_slices(gemm_weight_tiles(1024, 8), 4096 / 64, 1), 4);      // wo_a, 8 groups
  // A floor on a slice's stages (DSV4_GEMM_MIN_SLICE_STAGES) halves S until it holds.
  EXPECT_EQ(gemm_k_slices(gemm_weight_tiles(1024 + 512), 4096 / 128, 1, 2), 16);  // wq_a + wkv: 2 stages a slice
  EXPECT_EQ(gemm_k_slices(gemm_weight_tiles(1024 + 512), 4096 / 128, 1, 4), 8);
  EXPECT_EQ(gemm_k_slices(gemm_weight_tiles(2048 + 2048), 4096 / 128, 1, 4), 8);  // already 4 stages a slice
  EXPECT_EQ(gemm_k_slices(gemm_weight_tiles(1024 + 512), 4096 / 128, 1, 64), 1);  // more than K holds: one slice
  EXPECT_EQ(gemm_slices(gemm_weight_tiles(1024 + 512), 4096 / 128, 1, true),
            gemm_k_slices(gemm_weight_tiles(1024 + 512), 4096 / 128, 1, gemm_min_quant_slice_stages()));
  EXPECT_EQ(gemm_slices(gemm_weight_tiles(256), 4096 / 64, 1, false),  // the router: bf16 stages
            gemm_k_slices(gemm_weight_tiles(256), 4096 / 64, 1, gemm_min_slice_stages()));
  if (std::getenv("DSV4_GEMM_MIN_SLICE_STAGES") == nullptr &&
      std::getenv("DSV4_GEMM_MIN_QUANT_SLICE_STAGES") == nullptr) {
    EXPECT_EQ(gemm_min_slice_stages(), 2);  // the defaults
    EXPECT_EQ(gemm_min_quant_slice_stages(), 2);
    EXPECT_EQ(gemm_slices(gemm_weight_tiles(1024 + 512), 4096 / 128, 1, true), 16);
    EXPECT_EQ(gemm_slices(gemm_weight_tiles(256), 4096 / 64, 1, false), 32);
  }
  {
    const OneStageSlices one_stage;  // the test hook, for both backends and both floors
    EXPECT_EQ(gemm_slices(gemm_weight_tiles(1024 + 512), 4096 / 128, 1, true), 32);
    EXPECT_EQ(gemm_min_slice_stages(), 1);
    EXPECT_EQ(gemm_min_quant_slice_stages(), 1);
  }
}

// The bf16 and FP8-as-bf16 GEMMs under kHopperWgmma are the chained tensor-core steps
// per K slice, the slices added in order from zero; the exact backend differs.
TEST(HopperGemmOrder, CpuBackendModelsBf16AndGroupedGemms) {
  const OneStageSlices one_stage;  // (the sums below are written for one-stage slices)
  auto exact = make_cpu_backend(2), hopper = make_cpu_backend(2, QuantDotModel::kHopperWgmma);
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t T = 3, N = 200, K = 256;  // 2 tiles, 4 stages: S = 4 slices of 64
  ASSERT_EQ(gemm_k_slices(gemm_weight_tiles(N), K / 64, 1), 4);
  Tensor x = Tensor::empty_cpu(DType::kBF16, {T, K}), w = Tensor::empty_cpu(DType::kBF16, {N, K});
  for (int64_t i = 0; i < x.numel(); ++i) x.as<uint16_t>()[i] = core::float_to_bf16(normal(gen));
  for (int64_t i = 0; i < w.numel(); ++i) w.as<uint16_t>()[i] = core::float_to_bf16(normal(gen));
  Tensor y = Tensor::empty_cpu(DType::kF32, {T, N}), y_exact = Tensor::empty_cpu(DType::kF32, {T, N});
  hopper->linear_bf16(x, w, y);
  exact->linear_bf16(x, w, y_exact);
  int64_t differ = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n) {
      float want = 0.0f;
      for (int64_t s = 0; s < 4; ++s)
        want += ref::hopper_bf16_dot(0.0f, w.as<uint16_t>() + n * K + 64 * s, x.as<uint16_t>() + t * K + 64 * s, 64);
      ASSERT_EQ(core::float_bits(y.as<float>()[t * N + n]), core::float_bits(want)) << t << " " << n;
      differ += y.as<float>()[t * N + n] != y_exact.as<float>()[t * N + n];
    }
  EXPECT_GT(differ, 0);

  // grouped (wo_a): 2 groups of 128 rows, C = 128: 2 stages of 64 with the block scale of their 128 columns.
  const int64_t G = 2, R = 128, C = 128;
  QuantLinear q;
  q.format = QuantLinear::Format::kFp8Block128;
  q.n = G * R;
  q.k = C;
  q.weight = Tensor::empty_cpu(DType::kF8E4M3, {G * R, C});
  q.scale = Tensor::empty_cpu(DType::kF8E8M0, {G * R / 128, 1});
  for (int64_t i = 0; i < q.weight.numel(); ++i) q.weight.as<uint8_t>()[i] = core::float_to_e4m3(normal(gen));
  for (int64_t i = 0; i < q.scale.numel(); ++i) q.scale.as<uint8_t>()[i] = uint8_t(120 + i);
  Tensor xg = Tensor::empty_cpu(DType::kBF16, {T, G * C}), yg = Tensor::empty_cpu(DType::kBF16, {T, G * R});
  for (int64_t i = 0; i < xg.numel(); ++i) xg.as<uint16_t>()[i] = core::float_to_bf16(normal(gen));
  const int slices = gemm_k_slices(gemm_weight_tiles(R, G), C / 64, 1);
  ASSERT_EQ(slices, 2);
  hopper->grouped_linear(xg, q, G, yg);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t row = 0; row < G * R; ++row) {
      std::vector<uint16_t> wr(static_cast<size_t>(C));
      for (int64_t k = 0; k < C; ++k)
        wr[size_t(k)] = core::float_to_bf16(core::e4m3_to_float(q.weight.as<uint8_t>()[row * C + k]));
      const float scale = core::e8m0_to_float(q.scale.as<uint8_t>()[row / 128]);
      float want = 0.0f;
      for (int64_t st = 0; st < 2; ++st)  // one stage per slice
        want += std::fma(ref::hopper_bf16_dot(0.0f, wr.data() + 64 * st, xg.as<uint16_t>() + t * G * C + (row / R) * C + 64 * st, 64),
                         scale, 0.0f);
      ASSERT_EQ(yg.as<uint16_t>()[t * G * R + row], core::float_to_bf16(want)) << t << " " << row;
    }
}

// The caches' bytes per state slot and per page (256 tokens) for V4's layer shapes
// (head_dim 512 with rope 64, index_head_dim 128, window 128), worked by hand:
// FP8 KV rows of 448 + 128 + 8 = 584 bytes, index rows of 64 + 4 = 68; f32 compressor
// states of 2 (kv, score) x coff*ratio x coff*512, coff = 2 at ratio 4; the indexer's
// 2 x 8 x 256 at ratio 4.
TEST(CacheCost, Fp8AndBf16RowsOfV4ByHand) {
  const CacheGeometry g{1, 1, 128, 512, 128};
  const int64_t window_fp8 = 128 * 584, window_bf16 = 128 * 1024;
  const int64_t state4 = 2 * 8 * 1024 * 4 + 2 * 8 * 256 * 4, state128 = 2 * 128 * 512 * 4;
  const auto expect = [](CacheCost c, int64_t per_slot, int64_t per_page) {
    EXPECT_EQ(c.per_slot, per_slot);
    EXPECT_EQ(c.per_page, per_page);
  };
  expect(fp8_cache_cost(g, 0), window_fp8, 0);
  expect(fp8_cache_cost(g, 4), window_fp8 + state4, 64 * 584 + 64 * 68);
  expect(fp8_cache_cost(g, 128), window_fp8 + state128, 2 * 584);
  expect(bf16_cache_cost(g, 0), window_bf16, 0);
  expect(bf16_cache_cost(g, 4), window_bf16 + state4, 64 * 1024 + 64 * 256);
  expect(bf16_cache_cost(g, 128), window_bf16 + state128, 2 * 1024);
}

// The FP8 record layout (and every CUDA kernel reading it) has V4's 64 rope dims: another
// qk_rope_head_dim fails in the cost (what the loader asks before any weight is read), naming
// the field; the bf16 rows take it.
TEST(CacheCost, Fp8RowsTakeOnlyV4RopeDims) {
  CacheGeometry g{1, 1, 128, 512, 128};
  g.rope_dim = 32;
  std::string error;
  try {
    fp8_cache_cost(g, 4);
  } catch (const core::Error& e) {
    error = e.what();
  }
  EXPECT_NE(error.find("qk_rope_head_dim 32"), std::string::npos) << error;
  EXPECT_NE(error.find("--backend cpu"), std::string::npos) << error;
  EXPECT_EQ(bf16_cache_cost(g, 4).per_page, 64 * 1024 + 64 * 256);
}

}  // namespace
}  // namespace dsv4::ops
