// CUDA pointwise ops (src/ops/cuda/cuda_pointwise.cu) against the CPU reference
// on fresh random inputs, outputs poisoned first, shapes from 0 to 257 rows.
//
// Tolerances:
//  * bit for bit where the kernel repeats the reference's arithmetic exactly:
//    embed, gather_rows, add_broadcast, hc_post, moe_reduce, moe_output (and fused with hc_post), the
//    FP8 part of kv_rope_quant, and q_norm_rope / kv RoPE (cos/sin of the fp32
//    angle in double on both sides: a 1-ulp disagreement would need the two
//    libraries' double results to straddle an fp32 rounding boundary, so we
//    allow a handful of 1-ulp elements and report them);
//  * rms_norm, hc_pre, hc_head: the reference now sums in the kernels' orders (the
//    row norm's 256 FMA chains and trees; 128-wide slices of FMAs for the mixes),
//    so they should agree bit for bit; until a GPU run shows it, the old
//    tolerances stay (bf16 within 1 ulp, fp32 mHC weights within 2e-5 relative,
//    comb after Sinkhorn 1e-4 absolute) and the differing elements are printed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "cuda_test_util.h"
#include "op_test_util.h"
#include "ops/backend.h"
#include "ops/cpu/primitives.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_test_hooks.h"

namespace dsv4::ops {
namespace {

using core::DType;
using core::Tensor;
using testing::Rng;

const std::vector<int64_t> kRows = {0, 1, 3, 16, 65, 257};

// ---- helpers -----------------------------------------------------------------------

// Distance in bf16 ulps (monotone integer map of the bits; -0 == +0).
int64_t bf16_ulps(uint16_t a, uint16_t b) {
  auto key = [](uint16_t x) -> int32_t { return (x & 0x8000u) ? -int32_t(x & 0x7fffu) : int32_t(x); };
  return std::abs(int64_t(key(a)) - int64_t(key(b)));
}

void expect_bits_equal(const Tensor& got, const Tensor& want, const char* what) {
  ASSERT_EQ(got.nbytes(), want.nbytes()) << what;
  if (got.nbytes() == 0) return;
  const auto* g = got.as<uint8_t>();
  const auto* w = want.as<uint8_t>();
  size_t first = got.nbytes();
  int64_t count = 0;
  for (size_t i = 0; i < got.nbytes(); ++i)
    if (g[i] != w[i]) {
      if (first == got.nbytes()) first = i;
      ++count;
    }
  EXPECT_EQ(count, 0) << what << ": " << count << " differing bytes, first at byte " << first;
}

// bf16 tensors within max_ulps; at most max_off elements may differ at all.
// With cancel_scale > 0, an element is also within when it is off by at most one
// bf16 ulp of cancel_scale: sums of terms of both signs (hc_pre's weighted sum of
// streams) land near zero, where another summation order moves many ulps but
// only by the rounding of the terms.
void expect_bf16_close(const Tensor& got, const Tensor& want, int64_t max_ulps, int64_t max_off, const char* what,
                       double cancel_scale = 0) {
  ASSERT_EQ(got.numel(), want.numel()) << what;
  int64_t off = 0, worst = 0, worst_i = -1;
  for (int64_t i = 0; i < got.numel(); ++i) {
    int64_t u = bf16_ulps(got.as<uint16_t>()[i], want.as<uint16_t>()[i]);
    if (u != 0) ++off;
    if (u > max_ulps && cancel_scale > 0 &&
        std::fabs(double(testing::bf(got, i)) - double(testing::bf(want, i))) <= cancel_scale / 256.0)
      u = max_ulps;
    if (u > worst) {
      worst = u;
      worst_i = i;
    }
  }
  EXPECT_LE(worst, max_ulps) << what << ": element " << worst_i << " got " << testing::bf(got, worst_i) << " want "
                             << testing::bf(want, worst_i);
  EXPECT_LE(off, max_off) << what << ": " << off << " of " << got.numel() << " elements differ";
  if (off > 0) std::fprintf(stderr, "[%s: %lld of %lld bf16 elements differ by <= %lld ulp]\n", what, (long long)off,
                            (long long)got.numel(), (long long)worst);
}

// Root mean square of a bf16 tensor (the scale of a "typical" element).
double bf16_rms(const Tensor& t) {
  double s = 0;
  for (int64_t i = 0; i < t.numel(); ++i) s += double(testing::bf(t, i)) * testing::bf(t, i);
  return t.numel() ? std::sqrt(s / double(t.numel())) : 0.0;
}

// f32 tensors within rel * |want| + abs; reports how many differ in any bit (hc_pre's
// reference sums in the kernels' order, so none should: printed, not yet required).
void expect_f32_close(const Tensor& got, const Tensor& want, double rel, double abs, const char* what) {
  ASSERT_EQ(got.numel(), want.numel()) << what;
  int64_t off = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    const double g = got.as<float>()[i], w = want.as<float>()[i];
    ASSERT_NEAR(g, w, rel * std::fabs(w) + abs) << what << " element " << i;
    off += std::memcmp(got.as<float>() + i, want.as<float>() + i, sizeof(float)) != 0;
  }
  if (off > 0)
    std::fprintf(stderr, "[%s: %lld of %lld f32 elements differ]\n", what, (long long)off, (long long)got.numel());
}

Tensor copy_host(const Tensor& t) {
  Tensor c = Tensor::empty_cpu(t.dtype(), t.shape(), t.ndim());
  if (t.nbytes()) std::memcpy(c.data(), t.data(), t.nbytes());
  return c;
}

// A batch: sequences of the given lengths at the given start positions, then pad rows.
using testing::BatchArrays;
using TestBatch = BatchArrays;

// `rows` token rows: sequences of random lengths and starts, the last rows pad rows
// (position -1) when rows > 2. Token ids random in [0, vocab).
TestBatch random_batch(int64_t rows, Rng& rng, int64_t vocab = 1000) {
  TestBatch b;
  const int64_t pads = rows > 2 ? std::min<int64_t>(3, rows / 4) : 0;
  int64_t left = rows - pads;
  int32_t s = 0;
  while (left > 0) {
    const int32_t len = int32_t(std::min<int64_t>(left, rng.uniform_int(1, 40)));
    const int32_t start = int32_t(rng.uniform_int(0, 5000));
    b.seq_begin.push_back(int32_t(b.positions.size()));
    b.seq_len.push_back(len);
    b.seq_start.push_back(start);
    b.seq_slot.push_back(s);
    b.block_table.push_back(0);
    for (int32_t i = 0; i < len; ++i) {
      b.positions.push_back(start + i);
      b.token_seq.push_back(s);
      b.token_ids.push_back(int32_t(rng.uniform_int(0, vocab - 1)));
    }
    left -= len;
    ++s;
  }
  for (int64_t i = 0; i < pads; ++i) {
    b.positions.push_back(-1);
    b.token_seq.push_back(-1);
    b.token_ids.push_back(0);
  }
  return b;
}

using testing::DeviceBatch;
using testing::upload_batch;

using testing::host_rope;

class CudaPointwise : public ::testing::Test, protected testing::CudaAndCpuBackends {
 protected:
  void SetUp() override {
    DSV4_REQUIRE_CUDA();
    create(4);
  }
  // ChooseTokensAndTheirLogprobsMatchTheReference's cases, on rows drawn with `salt`.
  void check_choose_tokens(uint64_t salt);
};

// ---- embed, gather, add_broadcast ------------------------------------------------

TEST_F(CudaPointwise, EmbedMatchesCpuBitwise) {
  Rng rng(201);
  for (int64_t D : {256, 100})
    for (int64_t rows : kRows) {
      const int64_t V = 500, hc = 4;
      Tensor table = rng.bf16({V, D});
      TestBatch b = random_batch(rows, rng, V);
      DeviceBatch db = upload_batch(cuda(), b);
      Tensor want = Tensor::empty_cpu(DType::kBF16, {rows, hc, D});
      testing::poison(want);
      cpu().embed(table, b.view(), want);
      Tensor X = poisoned(DType::kBF16, {rows, hc, D});
      cuda().embed(dev(table), db.view, X);
      expect_bits_equal(host(X), want, "embed");
    }
}

TEST_F(CudaPointwise, GatherRowsMatchesCpuBitwise) {
  Rng rng(202);
  for (int64_t D : {64, 3})  // 512-byte rows (16-byte path) and 24-byte rows (byte path)
    for (int64_t R : kRows) {
      const int64_t src_rows = 300;
      Tensor src = rng.bf16({src_rows, 4, D});
      Tensor rows = Tensor::empty_cpu(DType::kI32, {R});
      for (int64_t i = 0; i < R; ++i) rows.as<int32_t>()[i] = int32_t(rng.uniform_int(0, src_rows - 1));
      Tensor want = Tensor::empty_cpu(DType::kBF16, {R, 4, D});
      cpu().gather_rows(src, rows, want);
      Tensor got = poisoned(DType::kBF16, {R, 4, D});
      cuda().gather_rows(dev(src), dev(rows), got);
      expect_bits_equal(host(got), want, "gather_rows");
    }
}

TEST_F(CudaPointwise, AddBroadcastMatchesCpuBitwise) {
  Rng rng(203);
  for (int64_t D : {256, 36})
    for (int64_t T : kRows) {
      Tensor e = rng.bf16({T, D}), h = rng.bf16({T, 4, D}, 2.0f);
      Tensor want = Tensor::empty_cpu(DType::kBF16, {T, 4, D});
      cpu().add_broadcast(e, h, want);
      Tensor got = poisoned(DType::kBF16, {T, 4, D});
      cuda().add_broadcast(dev(e), dev(h), got);
      expect_bits_equal(host(got), want, "add_broadcast");
    }
}

// ---- norms and RoPE ----------------------------------------------------------------

TEST_F(CudaPointwise, RmsNormWithinOneUlpAndInPlaceEqualsOutOfPlace) {
  Rng rng(204);
  for (int64_t N : {4096, 1024, 512, 100})
    for (int64_t T : kRows) {
      Tensor x = rng.bf16({T, N}, 3.0f), w = rng.bf16({N}, 0.2f);
      for (int64_t i = 0; i < N; ++i) w.as<uint16_t>()[i] = core::float_to_bf16(1.0f + testing::bf(w, i));
      Tensor want = Tensor::empty_cpu(DType::kBF16, {T, N});
      cpu().rms_norm(x, w, 1e-6f, want);
      Tensor dw = dev(w), dx = dev(x);
      Tensor got = poisoned(DType::kBF16, {T, N});
      cuda().rms_norm(dx, dw, 1e-6f, got);
      const Tensor got_h = host(got);
      expect_bf16_close(got_h, want, 1, T * N / 100 + 1, "rms_norm");
      cuda().rms_norm(dx, dw, 1e-6f, dx);  // in place
      expect_bits_equal(host(dx), got_h, "rms_norm in place");
    }
}

// The norm kernels' early form (the weights loaded before the dependency wait, x kept in
// registers; rows of up to 4096 values, one or two chunks a thread) against the late form,
// bit for bit, in place too. 4104: three chunks a thread, the late form either way; 100:
// no 8-value chunks.
TEST_F(CudaPointwise, RmsNormEarlyFormEqualsLateBitForBit) {
  struct Restore {
    ~Restore() { cuda_force_norm_early(-1); }
  } restore;
  Rng rng(231);
  for (int64_t N : {4096, 2056, 2048, 1024, 512, 200, 4104, 100})
    for (int64_t T : kRows) {
      const std::string what = "N=" + std::to_string(N) + " T=" + std::to_string(T);
      Tensor x = rng.bf16({T, N}, 3.0f), w = rng.bf16({N}, 0.2f);
      for (int64_t i = 0; i < N; ++i) w.as<uint16_t>()[i] = core::float_to_bf16(1.0f + testing::bf(w, i));
      const Tensor dw = dev(w);
      Tensor out[2];
      for (int early : {0, 1}) {
        cuda_force_norm_early(early);
        const int64_t launches = cuda_norm_early_launches();
        out[early] = poisoned(DType::kBF16, {T, N});
        cuda().rms_norm(dev(x), dw, 1e-6f, out[early]);
        const bool takes_early = early == 1 && T > 0 && N % 8 == 0 && N <= 4096;
        EXPECT_EQ(cuda_norm_early_launches() - launches, takes_early ? 1 : 0) << what << " early=" << early;
        Tensor in_place = dev(x);
        cuda().rms_norm(in_place, dw, 1e-6f, in_place);
        expect_bits_equal(host(in_place), host(out[early]), ("rms_norm in place " + what).c_str());
      }
      expect_bits_equal(host(out[1]), host(out[0]), ("rms_norm early vs late " + what).c_str());
    }
}

TEST_F(CudaPointwise, QNormRopeMatchesCpu) {
  Rng rng(205);
  struct Shape {
    int64_t H, Dh;
  };
  for (Shape sh : {Shape{64, 512}, Shape{4, 128}, Shape{3, 70}})
    for (int64_t T : kRows) {
      const RopeTable rope = host_rope(true);
      TestBatch b = random_batch(T, rng);
      DeviceBatch db = upload_batch(cuda(), b);
      Tensor q = rng.bf16({T, sh.H, sh.Dh}, 2.0f);
      Tensor want = copy_host(q);
      cpu().q_norm_rope(want, b.view(), rope, 1e-6f);
      Tensor dq = dev(q);
      cuda().q_norm_rope(dq, db.view, dev_rope(rope), 1e-6f);
      expect_bf16_close(host(dq), want, 1, 4, "q_norm_rope");
    }
}

// T KV rows of Dh values, the first 64-value block of every row scaled by `tiny` and,
// where Dh > 128, the second by `large`: FP8 blocks at the 1e-4 amax floor and large ones.
Tensor kv_rows(Rng& rng, int64_t T, int64_t Dh, float tiny, float large) {
  Tensor kv = rng.bf16({T, Dh}, 1.5f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < 64; ++i) {
      kv.as<uint16_t>()[t * Dh + i] = core::float_to_bf16(testing::bf(kv, t * Dh + i) * tiny);
      if (Dh > 128) kv.as<uint16_t>()[t * Dh + 64 + i] = core::float_to_bf16(testing::bf(kv, t * Dh + 64 + i) * large);
    }
  return kv;
}

TEST_F(CudaPointwise, KvRopeQuantMatchesCpu) {
  Rng rng(206);
  for (int64_t Dh : {512, 128})
    for (int64_t T : kRows) {
      const RopeTable rope = host_rope(Dh == 512);
      TestBatch b = random_batch(T, rng);
      DeviceBatch db = upload_batch(cuda(), b);
      const Tensor kv = kv_rows(rng, T, Dh, 1e-6f, 3e4f);
      Tensor want = copy_host(kv);
      cpu().kv_rope_quant(want, b.view(), rope);
      Tensor dkv = dev(kv);
      cuda().kv_rope_quant(dkv, db.view, dev_rope(rope));
      expect_bf16_close(host(dkv), want, 1, 4, "kv_rope_quant");
    }
}

// A NaN in the quantized part stays NaN on both backends (std::clamp passes it to
// the e4m3 cast; a fminf/fmaxf clamp turned it into -448 before).
TEST_F(CudaPointwise, KvRopeQuantKeepsANanAsTheCpuDoes) {
  Rng rng(207);
  const int64_t T = 3, Dh = 128;
  const RopeTable rope = host_rope(false);
  TestBatch b = random_batch(T, rng);
  DeviceBatch db = upload_batch(cuda(), b);
  Tensor kv = rng.bf16({T, Dh}, 1.5f);
  kv.as<uint16_t>()[Dh + 5] = core::float_to_bf16(NAN);
  Tensor want = copy_host(kv);
  cpu().kv_rope_quant(want, b.view(), rope);
  Tensor dkv = dev(kv);
  cuda().kv_rope_quant(dkv, db.view, dev_rope(rope));
  const Tensor got = host(dkv);
  ASSERT_TRUE(std::isnan(testing::bf(want, Dh + 5)));
  EXPECT_TRUE(std::isnan(testing::bf(got, Dh + 5))) << "GPU gave " << testing::bf(got, Dh + 5);
  for (int64_t i = 0; i < T * Dh; ++i) {
    if (i == Dh + 5) continue;
    EXPECT_FALSE(std::isnan(testing::bf(got, i))) << i;
  }
}

// ---- mHC -----------------------------------------------------------------------------

struct HcCase {
  int64_t hc, D, iters;
  HcConfig config() const {
    HcConfig cfg;
    cfg.hc_mult = hc;
    cfg.sinkhorn_iters = iters;
    return cfg;
  }
};

HcWeights random_hc_weights(Rng& rng, int64_t hc, int64_t D, bool head) {
  const int64_t mix = head ? hc : (2 + hc) * hc;
  return HcWeights{rng.f32({mix, hc * D}, 1.0f / std::sqrt(float(hc * D))), rng.f32({mix}, 0.5f),
                   rng.f32({head ? 1 : 3}, 0.1f, 1.0f)};
}

TEST_F(CudaPointwise, HcPreMatchesCpu) {
  Rng rng(207);
  // D = 7168 (Pro's hidden size): hc_finish_kernel forms x in two passes of registers.
  for (HcCase c : {HcCase{4, 4096, 20}, HcCase{4, 256, 20}, HcCase{4, 256, 1}, HcCase{2, 64, 20}, HcCase{4, 7168, 20}})
    for (int64_t T : {0, 1, 3, 16, 65, 257, 600}) {  // 600: two launches of the 512-row partial buffer
      if (c.D >= 4096 && T > 257) continue;
      const HcConfig cfg = c.config();
      const HcWeights w = random_hc_weights(rng, c.hc, c.D, false);
      const HcWeights dw{dev(w.fn), dev(w.base), dev(w.scale)};
      Tensor X = rng.bf16({T, c.hc, c.D}, 3.0f);
      Tensor x = Tensor::empty_cpu(DType::kBF16, {T, c.D}), post = Tensor::empty_cpu(DType::kF32, {T, c.hc}),
             comb = Tensor::empty_cpu(DType::kF32, {T, c.hc, c.hc});
      cpu().hc_pre(X, w, cfg, x, post, comb);
      Tensor gx = poisoned(DType::kBF16, {T, c.D}), gpost = poisoned(DType::kF32, {T, c.hc}),
             gcomb = poisoned(DType::kF32, {T, c.hc, c.hc});
      cuda().hc_pre(dev(X), dw, cfg, gx, gpost, gcomb);
      expect_bf16_close(host(gx), x, 1, T * c.D / 50 + 1, "hc_pre x", bf16_rms(x));
      expect_f32_close(host(gpost), post, 2e-5, 1e-6, "hc_pre post");
      expect_f32_close(host(gcomb), comb, 1e-4, 1e-4, "hc_pre comb");
    }
}

// hc_pre_norm = hc_pre, then rms_norm: against the CPU (within the two ops'
// tolerances) and against the two CUDA ops bit for bit (one launch pair on the
// fast path, the row norm shared with rms_norm_kernel).
TEST_F(CudaPointwise, HcPreNormEqualsHcPreThenRmsNorm) {
  Rng rng(211);
  // D = 7168: the norm reloads the first pass's x (hc_finish_kernel keeps one pass in registers).
  for (HcCase c : {HcCase{4, 4096, 20}, HcCase{4, 256, 20}, HcCase{2, 64, 20}, HcCase{4, 256, 1}, HcCase{4, 7168, 20}})
    for (int64_t T : {0, 1, 3, 16, 65, 257, 600}) {
      if (c.D >= 4096 && T > 257) continue;
      const HcConfig cfg = c.config();
      const HcWeights w = random_hc_weights(rng, c.hc, c.D, false);
      const HcWeights dw{dev(w.fn), dev(w.base), dev(w.scale)};
      const Tensor X = rng.bf16({T, c.hc, c.D}, 3.0f), nw = rng.bf16({c.D}, 0.2f);
      for (int64_t i = 0; i < c.D; ++i) nw.as<uint16_t>()[i] = core::float_to_bf16(1.0f + testing::bf(nw, i));
      const Tensor dX = dev(X), dnw = dev(nw);
      const float eps = 1e-6f;
      Tensor x = Tensor::empty_cpu(DType::kBF16, {T, c.D}), xn = Tensor::empty_cpu(DType::kBF16, {T, c.D}),
             post = Tensor::empty_cpu(DType::kF32, {T, c.hc}), comb = Tensor::empty_cpu(DType::kF32, {T, c.hc, c.hc});
      cpu().hc_pre_norm(X, w, cfg, nw, eps, x, xn, post, comb);
      Tensor gx = poisoned(DType::kBF16, {T, c.D}), gxn = poisoned(DType::kBF16, {T, c.D}),
             gpost = poisoned(DType::kF32, {T, c.hc}), gcomb = poisoned(DType::kF32, {T, c.hc, c.hc});
      cuda().hc_pre_norm(dX, dw, cfg, dnw, eps, gx, gxn, gpost, gcomb);
      const std::string what = "hc_pre_norm D=" + std::to_string(c.D) + " T=" + std::to_string(T);
      expect_bf16_close(host(gx), x, 1, T * c.D / 50 + 1, (what + " x").c_str(), bf16_rms(x));
      // xn: the CPU norm of the GPU's x (x itself may differ by an ulp, see hc_pre).
      Tensor want_xn = Tensor::empty_cpu(DType::kBF16, {T, c.D});
      cpu().rms_norm(host(gx), nw, eps, want_xn);
      expect_bf16_close(host(gxn), want_xn, 1, T * c.D / 100 + 1, (what + " xn").c_str());
      Tensor sx = poisoned(DType::kBF16, {T, c.D}), sxn = poisoned(DType::kBF16, {T, c.D}),
             spost = poisoned(DType::kF32, {T, c.hc}), scomb = poisoned(DType::kF32, {T, c.hc, c.hc});
      cuda().hc_pre(dX, dw, cfg, sx, spost, scomb);
      cuda().rms_norm(sx, dnw, eps, sxn);
      expect_bits_equal(host(gx), host(sx), (what + " x vs hc_pre").c_str());
      expect_bits_equal(host(gxn), host(sxn), (what + " xn vs hc_pre + rms_norm").c_str());
      expect_bits_equal(host(gpost), host(spost), (what + " post vs hc_pre").c_str());
      expect_bits_equal(host(gcomb), host(scomb), (what + " comb vs hc_pre").c_str());
    }
}

// hc_mix_rows_kernel (a thread a row, its mixes in 1, 2 or 4 parts) against
// hc_mix_partial_kernel (a lane a mix): the same partials, so x, xn, post and comb
// (hc_pre_norm) and hc_head's y agree bit for bit, at row counts on both sides of
// the rule's 32, of the 32- and 64-row blocks of the split forms and across two
// 512-row launches; hc = 2 and 4 (8, 24, 2 and 4 mixes: 2 has no 4-part form and
// takes 2).
TEST_F(CudaPointwise, HcRowMixEqualsLaneMixBitForBit) {
  Rng rng(214);
  struct Reset {
    ~Reset() {
      cuda_hc_force_row_mix(-1);
      cuda_hc_force_row_split(0);
    }
  } reset;
  for (HcCase c : {HcCase{4, 4096, 20}, HcCase{2, 64, 20}, HcCase{4, 256, 20}})
    for (int64_t T : {1, 31, 32, 33, 65, 100, 257, 600}) {
      if (c.D >= 4096 && T > 257) continue;
      const HcConfig cfg = c.config();
      const HcWeights w = random_hc_weights(rng, c.hc, c.D, false), wh = random_hc_weights(rng, c.hc, c.D, true);
      const HcWeights dw{dev(w.fn), dev(w.base), dev(w.scale)}, dwh{dev(wh.fn), dev(wh.base), dev(wh.scale)};
      const Tensor dX = dev(rng.bf16({T, c.hc, c.D}, 3.0f)), dnw = dev(rng.bf16({c.D}, 0.2f));
      std::vector<Tensor> got[4];  // a lane a mix; a thread a row in 1, 2, 4 parts
      const int parts[4] = {0, 1, 2, 4};
      for (int v = 0; v < 4; ++v) {
        cuda_hc_force_row_mix(v == 0 ? 0 : 1);
        cuda_hc_force_row_split(parts[v]);
        const int64_t before = cuda_hc_row_mix_launches();
        Tensor x = poisoned(DType::kBF16, {T, c.D}), xn = poisoned(DType::kBF16, {T, c.D}),
               post = poisoned(DType::kF32, {T, c.hc}), comb = poisoned(DType::kF32, {T, c.hc, c.hc}),
               y = poisoned(DType::kBF16, {T, c.D});
        cuda().hc_pre_norm(dX, dw, cfg, dnw, 1e-6f, x, xn, post, comb);
        cuda().hc_head(dX, dwh, cfg, y);
        for (const Tensor& t : {x, xn, post, comb, y}) got[v].push_back(host(t));
        const int64_t launches = cuda_hc_row_mix_launches() - before;
        if (v > 0) {
          EXPECT_GE(launches, 2) << "hc_mix_rows_kernel launches, T=" << T;
        } else {
          EXPECT_EQ(launches, 0) << "T=" << T;
        }
      }
      const char* names[] = {"x", "xn", "post", "comb", "hc_head y"};
      for (int v = 1; v < 4; ++v)
        for (size_t i = 0; i < got[0].size(); ++i)
          expect_bits_equal(got[v][i], got[0][i],
                            ("hc=" + std::to_string(c.hc) + " D=" + std::to_string(c.D) + " T=" +
                             std::to_string(T) + " " + names[i] + ": a thread a row in " + std::to_string(parts[v]) +
                             " parts vs a lane a mix")
                                .c_str());
    }
}

// HcConfig::sinkhorn_later: the pre ops leave comb's logits (hc_finish_kernel's warp 8
// skips the Sinkhorn) and hc_sinkhorn_kernel finishes them: x, xn, post and comb bit
// for bit those of the ops run whole, for hc_pre, hc_pre_norm and hc_post_pre_norm
// (whose mix kernel forms the stream up to 16 rows), across the mix kernels' row rules
// and two 512-row launches; and the CUDA Sinkhorn against the CPU's on the same logits.
TEST_F(CudaPointwise, HcSinkhornLaterEqualsSinkhornInPreBitForBit) {
  Rng rng(215);
  for (HcCase c : {HcCase{4, 4096, 20}, HcCase{2, 64, 20}, HcCase{4, 256, 1}})
    for (int64_t T : {0, 1, 3, 16, 65, 600}) {
      if (c.D >= 4096 && T > 257) continue;
      const HcConfig whole = c.config();
      HcConfig later = whole;
      later.sinkhorn_later = true;
      const HcWeights w = random_hc_weights(rng, c.hc, c.D, false);
      const HcWeights dw{dev(w.fn), dev(w.base), dev(w.scale)};
      const Tensor dX = dev(rng.bf16({T, c.hc, c.D}, 3.0f)), dnw = dev(rng.bf16({c.D}, 0.2f));
      const Tensor df = dev(rng.bf16({T, c.D})), dpost0 = dev(rng.f32({T, c.hc}, 0.5f, 1.0f)),
                   dcomb0 = dev(rng.f32({T, c.hc, c.hc}, 0.3f, 0.25f));
      const char* ops[] = {"hc_pre", "hc_pre_norm", "hc_post_pre_norm"};
      for (int op = 0; op < 3; ++op) {
        const std::string what =
            std::string(ops[op]) + " hc=" + std::to_string(c.hc) + " D=" + std::to_string(c.D) + " T=" +
            std::to_string(T);
        std::vector<Tensor> got[2];
        for (int l = 0; l < 2; ++l) {
          const HcConfig& cfg = l ? later : whole;
          Tensor x = poisoned(DType::kBF16, {T, c.D}), xn = poisoned(DType::kBF16, {T, c.D}),
                 post = poisoned(DType::kF32, {T, c.hc}), comb = poisoned(DType::kF32, {T, c.hc, c.hc}),
                 Y = poisoned(DType::kBF16, {T, c.hc, c.D});
          if (op == 0) cuda().hc_pre(dX, dw, cfg, x, post, comb);
          else if (op == 1) cuda().hc_pre_norm(dX, dw, cfg, dnw, 1e-6f, x, xn, post, comb);
          else cuda().hc_post_pre_norm(HcPostInput::of_sublayer(df, dX, dpost0, dcomb0), Y, dw, cfg, dnw, 1e-6f, x,
                                       xn, post, comb);
          if (l == 1) {
            Tensor want = host(comb);  // the logits, finished by the CPU
            cpu().hc_sinkhorn(want, cfg);
            cuda().hc_sinkhorn(comb, cfg);
            expect_f32_close(host(comb), want, 1e-6, 1e-7, (what + " hc_sinkhorn vs CPU").c_str());
          }
          got[l] = {host(x), host(post), host(comb)};
          if (op > 0) got[l].push_back(host(xn));
          if (op == 2) got[l].push_back(host(Y));
        }
        const char* names[] = {" x", " post", " comb", " xn", " Y"};
        for (size_t i = 0; i < got[0].size(); ++i)
          expect_bits_equal(got[1][i], got[0][i], (what + names[i] + ": Sinkhorn later vs in the op").c_str());
      }
    }
}

// The six mHC ops of the fused and cluster tests on one set of inputs (a shape, a row count,
// the Sinkhorn in the op or later), drawn once: run(op) gives x, then post and comb, xn, Y
// and y where the op writes them. post and comb start from the same values on every run:
// hc_post reads them and the hc_pre overwrites them in place, as the model does.
constexpr const char* kHcOpNames[] = {"hc_pre",           "hc_pre_norm",          "hc_head", "hc_post_pre_norm f",
                                      "hc_post_pre_norm moe", "hc_post_pre_norm slots"};
struct HcOpInputs {
  CudaBackend& cuda;
  HcCase c;
  int64_t T;
  HcConfig cfg;
  HcWeights dw, dwh;
  Tensor dX, dnw, df, drouted, dshared, post0, comb0, dslots, dids;

  HcOpInputs(CudaBackend& be, Rng& rng, HcCase hc_case, int64_t rows, bool later)
      : cuda(be), c(hc_case), T(rows), cfg(hc_case.config()) {
    cfg.sinkhorn_later = later;
    const HcWeights w = random_hc_weights(rng, c.hc, c.D, false), wh = random_hc_weights(rng, c.hc, c.D, true);
    dw = HcWeights{dev(w.fn), dev(w.base), dev(w.scale)};
    dwh = HcWeights{dev(wh.fn), dev(wh.base), dev(wh.scale)};
    dX = dev(rng.bf16({T, c.hc, c.D}, 3.0f));
    dnw = dev(rng.bf16({c.D}, 0.2f));
    df = dev(rng.bf16({T, c.D}));
    drouted = dev(rng.f32({T, c.D}, 2.0f));
    dshared = dev(rng.bf16({T, c.D}));
    post0 = rng.f32({T, c.hc}, 0.5f, 1.0f);
    comb0 = rng.f32({T, c.hc, c.hc}, 0.3f, 0.25f);
    const int64_t k = 6;
    Tensor ids = Tensor::empty_cpu(DType::kI32, {T, k});
    for (int64_t i = 0; i < T * k; ++i) ids.as<int32_t>()[i] = int32_t((i * 53 + 11) % 97) - 1;
    ids.as<int32_t>()[T * k - 1] = ids.as<int32_t>()[0];  // a repeated id (equal ids add in slot order)
    dslots = dev(rng.bf16({T, k, c.D}));
    dids = dev(ids);
  }
  Tensor dev(const Tensor& h) const { return testing::to_device(cuda, h); }
  std::string what(int op) const {
    return std::string(kHcOpNames[op]) + " hc=" + std::to_string(c.hc) + " D=" + std::to_string(c.D) +
           " T=" + std::to_string(T) + (cfg.sinkhorn_later ? " later" : "");
  }
  std::vector<Tensor> run(int op) const {
    auto poisoned = [&](DType t, std::initializer_list<int64_t> shape) {
      return testing::device_poisoned(cuda, t, shape);
    };
    Tensor post = dev(post0), comb = dev(comb0);
    Tensor x = poisoned(DType::kBF16, {T, c.D}), xn = poisoned(DType::kBF16, {T, c.D}),
           Y = poisoned(DType::kBF16, {T, c.hc, c.D}), y = poisoned(DType::kBF16, {T, c.D});
    if (op == 0) cuda.hc_pre(dX, dw, cfg, x, post, comb);
    else if (op == 1) cuda.hc_pre_norm(dX, dw, cfg, dnw, 1e-6f, x, xn, post, comb);
    else if (op == 2) cuda.hc_head(dX, dwh, cfg, x);
    else
      cuda.hc_post_pre_norm(op == 3   ? HcPostInput::of_sublayer(df, dX, post, comb)
                            : op == 4 ? HcPostInput::of_moe_output(drouted, dshared, y, dX, post, comb)
                                      : HcPostInput::of_moe_slots(dslots, dids, poisoned(DType::kF32, {T, c.D}),
                                                                  dshared, y, dX, post, comb),
                            Y, dw, cfg, dnw, 1e-6f, x, xn, post, comb);
    std::vector<Tensor> out = {testing::to_host(cuda, x)};
    if (op != 2) {
      out.push_back(testing::to_host(cuda, post));
      out.push_back(testing::to_host(cuda, comb));
    }
    if (op == 1 || op >= 3) out.push_back(testing::to_host(cuda, xn));
    if (op >= 3) out.push_back(testing::to_host(cuda, Y));
    if (op >= 4) out.push_back(testing::to_host(cuda, y));
    return out;
  }
};

// The chain of mHC ops the graph-replay tests capture (hc = 4, D = 4096, the Sinkhorn left
// for later): hc_pre_norm of T rows, the Sinkhorn, hc_post_pre_norm of a sublayer output,
// hc_head of the first head_rows rows right after it, then hc_pre of the first row. Its
// inputs X and f, and every output (poisoned first).
struct HcGraphChain {
  CudaBackend& cuda;
  HcCase c{4, 4096, 20};
  HcConfig cfg;
  HcWeights dw, dwh;
  Tensor dnw, X, f, x, xn, post, comb, Y, x2, xn2, y, x1, post1, comb1;
  int64_t T, head_rows;

  HcGraphChain(CudaBackend& be, Rng& rng, int64_t rows, int64_t head)
      : cuda(be), cfg(c.config()), T(rows), head_rows(head) {
    cfg.sinkhorn_later = true;
    const HcWeights w = random_hc_weights(rng, c.hc, c.D, false), wh = random_hc_weights(rng, c.hc, c.D, true);
    dw = HcWeights{dev(w.fn), dev(w.base), dev(w.scale)};
    dwh = HcWeights{dev(wh.fn), dev(wh.base), dev(wh.scale)};
    dnw = dev(rng.bf16({c.D}, 0.2f));
    X = dev(rng.bf16({T, c.hc, c.D}, 3.0f));
    f = dev(rng.bf16({T, c.D}));
    x = poisoned(DType::kBF16, {T, c.D});
    xn = poisoned(DType::kBF16, {T, c.D});
    post = poisoned(DType::kF32, {T, c.hc});
    comb = poisoned(DType::kF32, {T, c.hc, c.hc});
    Y = poisoned(DType::kBF16, {T, c.hc, c.D});
    x2 = poisoned(DType::kBF16, {T, c.D});
    xn2 = poisoned(DType::kBF16, {T, c.D});
    y = poisoned(DType::kBF16, {head_rows, c.D});
    x1 = poisoned(DType::kBF16, {1, c.D});
    post1 = poisoned(DType::kF32, {1, c.hc});
    comb1 = poisoned(DType::kF32, {1, c.hc, c.hc});
  }
  Tensor dev(const Tensor& h) const { return testing::to_device(cuda, h); }
  Tensor poisoned(DType t, std::initializer_list<int64_t> shape) const {
    return testing::device_poisoned(cuda, t, shape);
  }
  void run() {
    cuda.hc_pre_norm(X, dw, cfg, dnw, 1e-6f, x, xn, post, comb);
    cuda.hc_sinkhorn(comb, cfg);
    cuda.hc_post_pre_norm(HcPostInput::of_sublayer(f, X, post, comb), Y, dw, cfg, dnw, 1e-6f, x2, xn2, post, comb);
    cuda.hc_head(Y.rows(0, head_rows), dwh, cfg, y);  // right after the previous launch
    cuda.hc_pre(Y.rows(0, 1), dw, cfg, x1, post1, comb1);  // and again
  }
  std::vector<Tensor> outputs() const {
    std::vector<Tensor> out;
    for (const Tensor& t : {x, xn, post, comb, Y, x2, xn2, y, x1, post1, comb1})
      out.push_back(testing::to_host(cuda, t));
    return out;
  }
  // Three rounds on fresh X and f: `reference` run eagerly, then `graph` (a capture of run())
  // replayed over outputs zeroed first; every output bit for bit. `what` names the pair.
  template <typename Reference>
  void expect_replays_equal(Rng& rng, Graph& graph, const Reference& reference, const std::string& what) {
    for (int round = 0; round < 3; ++round) {
      const Tensor hX = rng.bf16({T, c.hc, c.D}, 3.0f), hf = rng.bf16({T, c.D});
      cuda.upload(X, hX.data(), hX.nbytes());
      cuda.upload(f, hf.data(), hf.nbytes());
      reference();
      const std::vector<Tensor> want = outputs();
      cuda.upload(X, hX.data(), hX.nbytes());
      cuda.upload(f, hf.data(), hf.nbytes());
      for (Tensor t : {x, xn, Y, x2, xn2, y, x1}) cuda.fill_zero(t);
      graph.replay();
      const std::vector<Tensor> replayed = outputs();
      for (size_t i = 0; i < want.size(); ++i)
        expect_bits_equal(replayed[i], want[i],
                          ("round " + std::to_string(round) + " output " + std::to_string(i) + ": " + what).c_str());
    }
  }
};

// The mHC mix and finish in one launch (hc_mix_finish_kernel, forced on up to 16
// rows) against the two launches, bit for bit: hc_pre, hc_pre_norm, hc_head and
// hc_post_pre_norm (a sublayer's output, the MoE's, or its slots; the stream Y and the MoE output y
// too, the slots summed by the mix at every row count), with the Sinkhorn in the op and
// left for later, at 1 to 16 rows and at 17 (the two launches on both sides), with the
// quick hand-over and without; and how many launches took the fused kernel.
TEST_F(CudaPointwise, HcFusedMixFinishEqualsTwoLaunchesBitForBit) {
  Rng rng(216);
  struct Reset {
    ~Reset() {
      cuda_hc_force_fused(-1);
      cuda_hc_force_slot_rows(-1);
      cuda_hc_force_quick_hand_over(-1);
      cuda_hc_force_cluster(-1);
      cuda_hc_force_row_finishers(-1);
    }
  } reset;
  cuda_hc_force_slot_rows(16);  // the mix sums the MoE slots at every row count here
  cuda_hc_force_cluster(0);     // (HcClusterMixFinishEqualsFusedBitForBit holds the cluster form against this one)
  for (HcCase c : {HcCase{4, 4096, 20}, HcCase{2, 256, 20}, HcCase{4, 256, 1}, HcCase{1, 128, 20}})
    for (const bool later : {false, true})
      for (int64_t T : {1, 2, 3, 8, 9, 16, 17}) {
        const HcOpInputs in(cuda(), rng, c, T, later);
        for (int op = 0; op < 6; ++op) {
          const std::string what = in.what(op);
          // two launches; fused, quick hand-over, finishers by the rule (two at 2 rows); fused, polled
          // hand-over, one finisher a row; fused, two finishers a row
          constexpr int kVariants = 4;
          std::vector<Tensor> got[kVariants];
          for (int variant = 0; variant < kVariants; ++variant) {
            const int fused = variant > 0 ? 1 : 0;
            cuda_hc_force_fused(fused);
            cuda_hc_force_quick_hand_over(variant == 2 ? 0 : 1);
            cuda_hc_force_row_finishers(variant == 1 ? -1 : variant == 3 ? 2 : 1);
            const int64_t before = cuda_hc_fused_launches(), two_before = cuda_hc_two_finisher_launches();
            got[variant] = in.run(op);
            const int64_t launches = cuda_hc_fused_launches() - before;
            EXPECT_EQ(launches, fused == 1 && T <= 16 ? 1 : 0) << "fused launches, " << what;
            const bool two_finishers = variant == 3 || (variant == 1 && T == 2);  // (forced; the rule's)
            if (!std::getenv("DSV4_CUDA_HC_ROW_FINISHERS")) {
              EXPECT_EQ(cuda_hc_two_finisher_launches() - two_before, launches == 1 && two_finishers ? 1 : 0)
                  << "two-finisher launches, " << what;
            }
          }
          for (int variant = 1; variant < kVariants; ++variant)
            for (size_t i = 0; i < got[0].size(); ++i) {
              const std::string form = variant == 1   ? ": fused (quick hand-over)"
                                       : variant == 2 ? ": fused"
                                                      : ": fused (two finishers a row)";
              expect_bits_equal(got[variant][i], got[0][i],
                                (what + " output " + std::to_string(i) + form + " vs two launches").c_str());
            }
        }
      }
}

// The fused kernel in a captured graph: launches back to back (one launch's CTAs start
// while the previous one ends; both use the same counters, after their wait) and with
// other kernels between, replayed on fresh inputs, give the eager run's bytes; with the
// quick hand-over (one finisher at 1 row, several at 5 and 16) and without, and with two
// finishers a row.
TEST_F(CudaPointwise, HcFusedMixFinishGraphReplayEqualsEager) {
  struct Form {
    int quick, finishers;
    const char* name;
  };
  for (const Form form : {Form{1, 1, "quick hand-over"}, Form{0, 1, "polled hand-over"},
                          Form{1, 2, "quick hand-over, two finishers a row"}}) {
    SCOPED_TRACE(form.name);
    cuda_hc_force_quick_hand_over(form.quick);
    cuda_hc_force_row_finishers(form.finishers);
    Rng rng(217);
    struct Reset {
      ~Reset() {
        cuda_hc_force_fused(-1);
        cuda_hc_force_quick_hand_over(-1);
        cuda_hc_force_cluster(-1);
        cuda_hc_force_row_finishers(-1);
      }
    } reset;
    cuda_hc_force_fused(1);  // (the rule takes it up to 8 rows; here every launch, 16 rows included)
    cuda_hc_force_cluster(0);
    HcGraphChain chain(cuda(), rng, 16, 5);  // hc_head of 5 rows
    auto body = [&] { chain.run(); };
    const int64_t before = cuda_hc_fused_launches();
    body();  // eager (also grows the scratch buffers before the capture)
    ASSERT_EQ(cuda_hc_fused_launches() - before, 4) << "the body's hc launches should all take the fused kernel";
    cuda().synchronize();
    std::unique_ptr<Graph> graph = cuda().capture(body);
    if (!testing::pdl_disabled()) {
      EXPECT_GT(cuda().last_capture_programmatic_edges(), 0);
    }
    chain.expect_replays_equal(rng, *graph, body, "replay vs eager");
  }
}

// The mHC mix and finish by one cluster (hc_mix_finish_cluster_kernel, forced on: 1-2 rows,
// D a multiple of 2048 up to 4096) against the fused launch, bit for bit: every op and
// hc_post source of HcFusedMixFinishEqualsTwoLaunchesBitForBit, with the Sinkhorn in the op
// and left for later; at 3 rows and at D = 256 the fused launch runs on both sides. On a
// GPU where the cluster of 16 does not fit, the count fails: the form must be measured there.
TEST_F(CudaPointwise, HcClusterMixFinishEqualsFusedBitForBit) {
  Rng rng(218);
  struct Reset {
    ~Reset() {
      cuda_hc_force_fused(-1);
      cuda_hc_force_cluster(-1);
      cuda_hc_force_slot_rows(-1);
    }
  } reset;
  cuda_hc_force_slot_rows(16);
  for (HcCase c : {HcCase{4, 4096, 20}, HcCase{4, 2048, 20}, HcCase{2, 2048, 20}, HcCase{1, 2048, 20},
                   HcCase{4, 256, 20}})
    for (const bool later : {false, true})
      for (int64_t T : {1, 2, 3}) {
        const HcOpInputs in(cuda(), rng, c, T, later);
        const bool applies = T <= 2 && c.D % 2048 == 0;
        for (int op = 0; op < 6; ++op) {
          const std::string what = in.what(op);
          std::vector<Tensor> got[2];  // fused; cluster
          for (int variant = 0; variant < 2; ++variant) {
            cuda_hc_force_fused(1);
            cuda_hc_force_cluster(variant);
            const int64_t before = cuda_hc_cluster_launches();
            got[variant] = in.run(op);
            EXPECT_EQ(cuda_hc_cluster_launches() - before, variant == 1 && applies ? 1 : 0)
                << "cluster launches, " << what;
          }
          for (size_t i = 0; i < got[0].size(); ++i)
            expect_bits_equal(got[1][i], got[0][i],
                              (what + " output " + std::to_string(i) + ": cluster vs fused").c_str());
        }
      }
}

// The cluster form in a captured graph, launches back to back (the next one's CTAs may start
// while the previous one ends) and with a Sinkhorn between, replayed on fresh inputs: the
// eager run's bytes, and those of the fused launch.
TEST_F(CudaPointwise, HcClusterMixFinishGraphReplayEqualsEager) {
  Rng rng(219);
  struct Reset {
    ~Reset() {
      cuda_hc_force_fused(-1);
      cuda_hc_force_cluster(-1);
    }
  } reset;
  HcGraphChain chain(cuda(), rng, 2, 1);  // 2 rows; hc_head of 1
  auto body = [&] { chain.run(); };
  cuda_hc_force_fused(1);
  cuda_hc_force_cluster(1);
  const int64_t before = cuda_hc_cluster_launches();
  body();  // eager (also grows the scratch buffers before the capture)
  ASSERT_EQ(cuda_hc_cluster_launches() - before, 4) << "the body's hc launches should all take the cluster kernel";
  cuda().synchronize();
  std::unique_ptr<Graph> graph = cuda().capture(body);
  if (!testing::pdl_disabled()) {
    EXPECT_GT(cuda().last_capture_programmatic_edges(), 0);
  }
  // The reference: the fused launch, eagerly.
  auto fused = [&] {
    cuda_hc_force_cluster(0);
    chain.run();
    cuda_hc_force_cluster(1);
  };
  chain.expect_replays_equal(rng, *graph, fused, "cluster replay vs fused");
}

TEST_F(CudaPointwise, HcHeadMatchesCpu) {
  Rng rng(208);
  for (HcCase c : {HcCase{4, 4096, 0}, HcCase{4, 256, 0}})
    for (int64_t T : kRows) {
      HcConfig cfg;
      cfg.hc_mult = c.hc;
      const HcWeights w = random_hc_weights(rng, c.hc, c.D, true);
      Tensor X = rng.bf16({T, c.hc, c.D}, 3.0f);
      Tensor y = Tensor::empty_cpu(DType::kBF16, {T, c.D});
      cpu().hc_head(X, w, cfg, y);
      Tensor gy = poisoned(DType::kBF16, {T, c.D});
      cuda().hc_head(dev(X), HcWeights{dev(w.fn), dev(w.base), dev(w.scale)}, cfg, gy);
      expect_bf16_close(host(gy), y, 1, T * c.D / 50 + 1, "hc_head", bf16_rms(y));
    }
}

TEST_F(CudaPointwise, HcPostMatchesCpuBitwise) {
  Rng rng(209);
  for (int64_t D : {4096, 40})
    for (int64_t T : kRows) {
      const int64_t hc = 4;
      Tensor f = rng.bf16({T, D}), R = rng.bf16({T, hc, D}, 2.0f), post = rng.f32({T, hc}, 0.5f, 1.0f),
             comb = rng.f32({T, hc, hc}, 0.3f, 0.25f);
      Tensor want = Tensor::empty_cpu(DType::kBF16, {T, hc, D});
      cpu().hc_post(f, R, post, comb, want);
      Tensor got = poisoned(DType::kBF16, {T, hc, D});
      cuda().hc_post(dev(f), dev(R), dev(post), dev(comb), got);
      expect_bits_equal(host(got), want, "hc_post");
    }
}

// ---- MoE combine -----------------------------------------------------------------------

TEST_F(CudaPointwise, MoeReduceAddsInAscendingExpertOrderBitwise) {
  Rng rng(210);
  // D = 4096 and 1030 (not a multiple of 8) span several column blocks of a row.
  for (const int64_t D : {256, 4096, 1030})
  for (int64_t k : {6, 8})
    for (int64_t T : kRows) {
      if (D != 256 && T > 64) continue;
      Tensor slots = rng.bf16({T, k, D}, 4.0f), ids = Tensor::empty_cpu(DType::kI32, {T, k});
      for (int64_t i = 0; i < T * k; ++i) {
        const int64_t r = rng.uniform_int(0, 9);
        ids.as<int32_t>()[i] = r == 0 ? -1 : int32_t(rng.uniform_int(0, 255));  // some skipped slots
      }
      if (T > 0) {  // equal ids keep slot order; large cancelling values expose any other order
        ids.as<int32_t>()[0] = 7;
        ids.as<int32_t>()[1] = 7;
        slots.as<uint16_t>()[0] = core::float_to_bf16(16777216.0f);
        slots.as<uint16_t>()[D] = core::float_to_bf16(-16777216.0f);
      }
      Tensor want = Tensor::empty_cpu(DType::kF32, {T, D});
      cpu().moe_reduce(slots, ids, want);
      Tensor got = poisoned(DType::kF32, {T, D});
      cuda().moe_reduce(dev(slots), dev(ids), got);
      expect_bits_equal(host(got), want, "moe_reduce");
    }
}

TEST_F(CudaPointwise, MoeOutputMatchesCpuBitwise) {
  Rng rng(211);
  for (int64_t D : {4096, 20})
    for (int64_t T : kRows) {
      Tensor routed = rng.f32({T, D}, 2.0f), shared = rng.bf16({T, D});
      Tensor want = Tensor::empty_cpu(DType::kBF16, {T, D});
      cpu().moe_output(routed, shared, want);
      Tensor got = poisoned(DType::kBF16, {T, D});
      cuda().moe_output(dev(routed), dev(shared), got);
      expect_bits_equal(host(got), want, "moe_output");
    }
}

// The fused ffn_post (one kernel on the GPU) against the CPU's two ops, y and Y.
TEST_F(CudaPointwise, MoeOutputHcPostMatchesCpuBitwise) {
  Rng rng(212);
  for (int64_t D : {4096, 20})
    for (int64_t hc : {4, 1})
      for (int64_t T : kRows) {
        Tensor routed = rng.f32({T, D}, 2.0f), shared = rng.bf16({T, D}), R = rng.bf16({T, hc, D}, 2.0f);
        Tensor post = rng.f32({T, hc}, 0.5f, 1.0f), comb = rng.f32({T, hc, hc}, 0.3f, 0.25f);
        Tensor want_y = Tensor::empty_cpu(DType::kBF16, {T, D}), want = Tensor::empty_cpu(DType::kBF16, {T, hc, D});
        cpu().moe_output(routed, shared, want_y);
        cpu().hc_post(want_y, R, post, comb, want);
        Tensor got_y = poisoned(DType::kBF16, {T, D}), got = poisoned(DType::kBF16, {T, hc, D});
        cuda().moe_output_hc_post(dev(routed), dev(shared), dev(R), dev(post), dev(comb), got_y, got);
        expect_bits_equal(host(got_y), want_y, "moe_output_hc_post y");
        expect_bits_equal(host(got), want, "moe_output_hc_post Y");
      }
}

// ---- batch independence ------------------------------------------------------------------

// A row's outputs are bit-identical alone and inside a batch of 257 (fixed
// reduction splits, no dependence on T or the row's index).
TEST_F(CudaPointwise, RowResultsDoNotDependOnTheBatch) {
  Rng rng(212);
  const int64_t T = 257, D = 4096, hc = 4, pick = 130;
  HcConfig cfg;
  const HcWeights w = random_hc_weights(rng, hc, D, false);
  const HcWeights dw{dev(w.fn), dev(w.base), dev(w.scale)};
  Tensor X = rng.bf16({T, hc, D}, 3.0f), norm_w = rng.bf16({D});
  Tensor dX = dev(X), dnorm = dev(norm_w);
  Tensor x = poisoned(DType::kBF16, {T, D}), post = poisoned(DType::kF32, {T, hc}),
         comb = poisoned(DType::kF32, {T, hc, hc}), xn = poisoned(DType::kBF16, {T, D});
  cuda().hc_pre(dX, dw, cfg, x, post, comb);
  cuda().rms_norm(x, dnorm, 1e-6f, xn);
  Tensor x1 = poisoned(DType::kBF16, {1, D}), post1 = poisoned(DType::kF32, {1, hc}),
         comb1 = poisoned(DType::kF32, {1, hc, hc}), xn1 = poisoned(DType::kBF16, {1, D});
  cuda().hc_pre(dX.rows(pick, 1), dw, cfg, x1, post1, comb1);
  cuda().rms_norm(x1, dnorm, 1e-6f, xn1);
  expect_bits_equal(host(x1), copy_host(host(x).rows(pick, 1)), "hc_pre x alone vs batch");
  expect_bits_equal(host(post1), copy_host(host(post).rows(pick, 1)), "hc_pre post alone vs batch");
  expect_bits_equal(host(comb1), copy_host(host(comb).rows(pick, 1)), "hc_pre comb alone vs batch");
  expect_bits_equal(host(xn1), copy_host(host(xn).rows(pick, 1)), "rms_norm alone vs batch");
}

// argmax_rows against the reference scan, on rows that make the rule matter: the maximum
// repeated (the lowest index wins), NaNs before and after it, a NaN in column 0, rows of
// -inf and of NaNs, +0 against -0, and widths off the 16-byte path.
TEST_F(CudaPointwise, ArgmaxRowsMatchesTheReferenceScan) {
  Rng rng(231);
  for (int64_t V : {129280, 1000, 1003, 1})
    for (int64_t R : kRows) {
      Tensor logits = rng.f32({R, V}, 3.0f);
      float* x = logits.as<float>();
      for (int64_t r = 0; r < R; ++r) {
        float* row = x + r * V;
        const int64_t a = rng.uniform_int(0, V - 1), b = rng.uniform_int(0, V - 1);
        switch (r % 8) {
          case 1: row[a] = row[b] = 50.0f; break;  // a tie for the maximum
          case 2: row[a] = NAN; row[b] = 60.0f; break;
          case 3: row[0] = NAN; row[b] = 70.0f; break;  // the scan never leaves column 0
          case 4: for (int64_t i = 0; i < V; ++i) row[i] = -INFINITY; break;
          case 5: for (int64_t i = 0; i < V; ++i) row[i] = NAN; break;
          case 6: for (int64_t i = 0; i < V; ++i) row[i] = (i % 3 == 0) ? -0.0f : (i % 3 == 1 ? 0.0f : -1.0f); break;
          case 7: row[a] = INFINITY; row[b] = INFINITY; break;
          default: break;
        }
      }
      Tensor want = Tensor::empty_cpu(DType::kI32, {R});
      cpu().argmax_rows(logits, want);
      Tensor got = poisoned(DType::kI32, {R});
      cuda().argmax_rows(dev(logits), got);
      expect_bits_equal(host(got), want, ("argmax_rows V=" + std::to_string(V)).c_str());
    }
  // The 16-byte path needs an aligned row start: a view one column in takes the scalar one.
  Tensor wide = rng.f32({1, 1025}, 1.0f);
  Tensor d = dev(wide);
  Tensor want = Tensor::empty_cpu(DType::kI32, {1});
  Tensor got = poisoned(DType::kI32, {1});
  cuda().argmax_rows(Tensor(static_cast<float*>(d.data()) + 1, DType::kF32, {1, 1024}, core::Device::kCuda, d.owner()),
                     got);
  cpu().argmax_rows(Tensor(wide.as<float>() + 1, DType::kF32, {1, 1024}), want);
  expect_bits_equal(host(got), want, "argmax_rows, unaligned row");
}

// penalize_logits against the CPU reference, bit for bit: random logits (zeros, negatives,
// large), random penalties in the API's ranges, each (row, token) once, and entries outside the
// rows and the vocabulary skipped.
TEST_F(CudaPointwise, PenalizeLogitsMatchesTheReference) {
  Rng rng(240);
  for (const auto& [R, V] : std::vector<std::pair<int64_t, int64_t>>{{1, 7}, {5, 3001}, {64, 129280}}) {
    Tensor logits = Tensor::empty_cpu(DType::kF32, {R, V});
    for (int64_t i = 0; i < R * V; ++i)
      logits.as<float>()[i] = i % 17 == 0 ? 0.0f : rng.normal(i % 5 == 0 ? 30.0f : 3.0f);
    std::vector<LogitPenalty> entries;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t t = rng.uniform_int(0, 9); t < V; t += rng.uniform_int(1, 40)) {  // distinct tokens a row
        LogitPenalty p;
        p.row = int32_t(r), p.token = int32_t(t);
        p.output_count = int32_t(rng.uniform_int(0, 3));
        p.in_prompt = int32_t(rng.uniform_int(0, 1));
        p.presence = float(rng.uniform_int(-8, 8)) / 4.0f + rng.normal(0.01f);
        p.frequency = rng.normal(1.0f);
        p.repetition = float(rng.uniform_int(1, 20)) / 10.0f + 0.013f;
        entries.push_back(p);
      }
    LogitPenalty outside;
    outside.row = int32_t(R), outside.output_count = 1, outside.repetition = 2.0f;
    entries.push_back(outside);
    outside.row = 0, outside.token = int32_t(V);
    entries.push_back(outside);
    Tensor t = Tensor::empty_cpu(DType::kI32, {int64_t(entries.size()), kLogitPenaltyWords});
    std::memcpy(t.data(), entries.data(), entries.size() * sizeof(LogitPenalty));
    Tensor want = copy_host(logits);
    cpu().penalize_logits(want, t);
    Tensor got = dev(logits);
    cuda().penalize_logits(got, dev(t));
    SCOPED_TRACE("R " + std::to_string(R) + " V " + std::to_string(V));
    expect_bits_equal(host(got), want, "penalize_logits");
  }
}

// choose_tokens against the CPU reference, token for token, on rows and choices that make
// the law's rules decide (testing::token_choice_case: ties cut by top_k and top_p, NaNs,
// infinities, near-flat and peaked rows, greedy rows among sampled ones), widths off the
// 16-byte path, and an unaligned row; in each form of the radix histograms' bin updates
// (DSV4_CUDA_CHOOSE_AGGREGATE: an atomic a key, a thread's keys of a bin summed, summed when weighed),
// with the CTAs a row picked by the row count (a cluster of up to 8 where rows are few), and then
// with 1, 2 and 8 CTAs a row forced (DSV4_CUDA_CHOOSE_CTAS; both kernels).
// The tokens (choose_tokens) and, where a row's choice asks, its log-probability record
// (token_logprobs, for the token chosen) against the CPU reference, bit for bit.
TEST_F(CudaPointwise, ChooseTokensAndTheirLogprobsMatchTheReference) {
  const int64_t clustered = cuda_choose_row_ctas_launches(2) + cuda_choose_row_ctas_launches(4) +
                            cuda_choose_row_ctas_launches(8);
  for (int form : {0, 1, 2}) {
    SCOPED_TRACE(form == 0 ? "an atomic a key" : form == 1 ? "a thread's keys of a bin summed" : "summed when weighed");
    cuda_choose_force_bin_updates(form);
    const int64_t before = cuda_choose_launches(form);
    check_choose_tokens(232 + form);
    EXPECT_GT(cuda_choose_launches(form), before);  // (the form asked for ran)
    cuda_choose_force_bin_updates(-1);
  }
  EXPECT_GT(cuda_choose_row_ctas_launches(2) + cuda_choose_row_ctas_launches(4) + cuda_choose_row_ctas_launches(8),
            clustered)
      << "no launch spread a row over several CTAs on its own";
  for (int ctas : {1, 2, 8}) {
    SCOPED_TRACE(std::to_string(ctas) + " CTAs a row");
    cuda_choose_force_row_ctas(ctas);
    const int64_t before = cuda_choose_row_ctas_launches(ctas);
    check_choose_tokens(240 + ctas);
    EXPECT_GT(cuda_choose_row_ctas_launches(ctas), before);
    cuda_choose_force_row_ctas(-1);
  }
}

void CudaPointwise::check_choose_tokens(uint64_t salt) {
  Rng rng(salt);
  const auto check = [&](const Tensor& logits, const Tensor& dev_logits, const std::vector<TokenChoice>& choices,
                         const std::string& what) {
    const int64_t R = logits.size(0);
    Tensor c = Tensor::empty_cpu(DType::kI32, {R, kTokenChoiceWords});
    if (R > 0) std::memcpy(c.data(), choices.data(), size_t(R) * sizeof(TokenChoice));
    Tensor want = Tensor::empty_cpu(DType::kI32, {R});
    cpu().choose_tokens(logits, c, want);
    Tensor got = poisoned(DType::kI32, {R});
    cuda().choose_tokens(dev_logits, dev(c), got);
    const Tensor h = host(got);
    for (int64_t r = 0; r < R; ++r)
      ASSERT_EQ(h.as<int32_t>()[r], want.as<int32_t>()[r])
          << what << " row " << r << ": temperature " << choices[size_t(r)].temperature << " top_k "
          << choices[size_t(r)].top_k << " top_p " << choices[size_t(r)].top_p;
    Tensor want_records = Tensor::empty_cpu(DType::kI32, {R, kTokenLogprobWords});
    cpu().token_logprobs(logits, c, want, want_records);
    Tensor got_records = poisoned(DType::kI32, {R, kTokenLogprobWords});
    cuda().token_logprobs(dev_logits, dev(c), got, got_records);
    const Tensor hr = host(got_records);
    testing::expect_logprob_records_equal(reinterpret_cast<const TokenLogprobRecord*>(hr.data()),
                                          reinterpret_cast<const TokenLogprobRecord*>(want_records.data()), choices,
                                          what);
  };
  for (int64_t V : {129280, 1000, 1003, 2, 1})
    for (int64_t R : kRows) {
      const testing::TokenChoiceCase tc = testing::token_choice_case(rng, R, V);
      check(tc.logits, dev(tc.logits), tc.choices, "V=" + std::to_string(V) + " R=" + std::to_string(R));
    }
  // The 16-byte path needs an aligned row start: a view one column in takes the scalar one.
  const testing::TokenChoiceCase tc = testing::token_choice_case(rng, 20, 1025);
  Tensor d = dev(tc.logits);
  for (int64_t r = 0; r < 20; ++r) {
    const Tensor view(static_cast<float*>(d.data()) + r * 1025 + 1, DType::kF32, {1, 1024}, core::Device::kCuda,
                      d.owner());
    check(Tensor(tc.logits.as<float>() + r * 1025 + 1, DType::kF32, {1, 1024}), view, {tc.choices[size_t(r)]},
          "unaligned row " + std::to_string(r));
  }
}

TEST_F(CudaPointwise, EveryOpAcceptsZeroRows) {
  const Tensor e = cuda().empty(DType::kBF16, {0, 64});
  const Tensor w = cuda().empty(DType::kBF16, {64});
  EXPECT_NO_THROW(cuda().rms_norm(e, w, 1e-6f, e));
  EXPECT_NO_THROW(cuda().moe_output(cuda().empty(DType::kF32, {0, 64}), e, e));
  cuda().synchronize();
}

}  // namespace
}  // namespace dsv4::ops
