#include "ops/cpu/primitives.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "core/dtype.h"
#include "core/error.h"
#include "ops/cpu/cpu_kernels.h"

namespace dsv4::ops::ref {

using core::bf16_to_float;
using core::float_to_bf16;

namespace {
float block_amax(const float* x, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  return amax;
}
// The reference multiplies by fp32(1/format_max), it does not divide.
constexpr float kFp8MaxInv = 1.0f / 448.0f;
constexpr float kFp4MaxInv = 1.0f / 6.0f;
constexpr float kFp4AmaxFloor = 6.0f * 1.1754943508222875e-38f;  // 6 * 2^-126
}  // namespace

int fp8_block_exponent(const float* x, int64_t n) {
  return core::ceil_log2_bits(std::max(block_amax(x, n), 1e-4f) * kFp8MaxInv);
}

int fp4_block_exponent(const float* x, int64_t n) {
  return core::ceil_log2_bits(std::max(block_amax(x, n), kFp4AmaxFloor) * kFp4MaxInv);
}

void act_quant_fp8(const float* x, int64_t n, int64_t block, uint8_t* q, int* exponents) {
  for (int64_t b = 0; b * block < n; ++b) {
    const float* xb = x + b * block;
    const int e = fp8_block_exponent(xb, block);
    const float inv = core::pow2_float(-e);
    for (int64_t i = 0; i < block; ++i) q[b * block + i] = core::float_to_e4m3(std::clamp(xb[i] * inv, -448.0f, 448.0f));
    exponents[b] = e;
  }
}

void fp8_sim_bf16(uint16_t* x, int64_t n, int64_t block) {
  float v[128];
  for (int64_t b = 0; b < n; b += block) {
    for (int64_t i = 0; i < block; ++i) v[i] = bf16_to_float(x[b + i]);
    const int e = fp8_block_exponent(v, block);
    const float inv = core::pow2_float(-e), s = core::pow2_float(e);
    for (int64_t i = 0; i < block; ++i) {
      float q = core::e4m3_to_float(core::float_to_e4m3(std::clamp(v[i] * inv, -448.0f, 448.0f)));
      x[b + i] = float_to_bf16(q * s);
    }
  }
}

void fp4_sim_bf16(uint16_t* x, int64_t n, int64_t block) {
  float v[128];
  for (int64_t b = 0; b < n; b += block) {
    for (int64_t i = 0; i < block; ++i) v[i] = bf16_to_float(x[b + i]);
    const int e = fp4_block_exponent(v, block);
    const float inv = core::pow2_float(-e), s = core::pow2_float(e);
    for (int64_t i = 0; i < block; ++i) {
      float q = core::e2m1_to_float(core::float_to_e2m1(std::clamp(v[i] * inv, -6.0f, 6.0f)));
      x[b + i] = float_to_bf16(q * s);
    }
  }
}

float sum_squares_as_cuda_rows(const float* v, int64_t n) {
  constexpr int kThreads = 256, kLanes = 32;
  const int64_t vec = n % 8 == 0 ? 8 : 1, chunks = n / vec;
  float total = 0.0f;
  for (int w = 0; w < kThreads / kLanes; ++w) {
    float lane[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      float ss = 0.0f;
      for (int64_t c = w * kLanes + l; c < chunks; c += kThreads)
        for (int64_t i = 0; i < vec; ++i) ss = std::fma(v[c * vec + i], v[c * vec + i], ss);
      lane[l] = ss;
    }
    for (int o = kLanes / 2; o > 0; o /= 2) {
      float next[kLanes];
      for (int l = 0; l < kLanes; ++l) next[l] = lane[l] + lane[l ^ o];
      std::copy(next, next + kLanes, lane);
    }
    total += lane[0];
  }
  return total;
}

void rms_norm_bf16(const uint16_t* x, const uint16_t* w, int64_t n, float eps, uint16_t* y) {
  std::vector<float> v(static_cast<size_t>(n));
  cpu::bf16_row_to_float(x, n, v.data());
  const float r = 1.0f / std::sqrt(sum_squares_as_cuda_rows(v.data(), n) / float(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(bf16_to_float(w[i]) * (v[size_t(i)] * r));
}

float sum_bf16_squares_lanes32(const uint16_t* x, int64_t n) {
  float p[32] = {};
  for (int64_t i = 0; i < n; ++i) {
    const float a = bf16_to_float(x[i]);
    p[i % 32] += core::round_bf16(a * a);
  }
  for (int off = 16; off >= 1; off /= 2)
    for (int l = 0; l < off; ++l) p[l] += p[l + off];
  return p[0];
}

void rope_bf16(uint16_t* slice, int64_t half, const float* inv_freq, int64_t pos, bool inverse) {
  for (int64_t i = 0; i < half; ++i) {
    // torch.outer(t, freqs) in fp32, then polar(): cos/sin of the fp32 angle.
    const float angle = float(pos) * inv_freq[i];
    const float c = float(std::cos(double(angle)));
    float s = float(std::sin(double(angle)));
    if (inverse) s = -s;
    const float a = bf16_to_float(slice[2 * i]), b = bf16_to_float(slice[2 * i + 1]);
    slice[2 * i] = float_to_bf16(a * c - b * s);
    slice[2 * i + 1] = float_to_bf16(a * s + b * c);
  }
}

void hadamard_bf16(uint16_t* x, int64_t n) {
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = bf16_to_float(x[i]);
  // Sylvester order: butterflies over strides 1, 2, 4, ... give H_n x.
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        double a = v[size_t(j)], b = v[size_t(j + h)];
        v[size_t(j)] = a + b;
        v[size_t(j + h)] = a - b;
      }
  const double scale = 1.0 / std::sqrt(double(n));
  for (int64_t i = 0; i < n; ++i) x[i] = float_to_bf16(float(v[size_t(i)] * scale));
}

float hopper_e4m3_dot32(const uint8_t* a, const uint8_t* b) { return hopper_e4m3_step(0.0f, a, b); }

float hopper_e4m3_step(float c, const uint8_t* a, const uint8_t* b) {
  // An e4m3 code as sig * 2^(ne - 3): ne the exponent the tensor core aligns on
  // (-6 for subnormals), sig the integer significand. NaN codes are not modelled.
  const auto decode = [](uint8_t x, int* sig, int* ne) {
    const int e = (x >> 3) & 15, m = x & 7;
    *sig = e == 0 ? m : 8 + m;
    *ne = (e == 0 ? 1 : e) - 7;
  };
  // (Loops without data-dependent branches: the CPU's Hopper model runs this per 32
  // products, and mispredicted branches on the codes were most of its time.)
  int sig[32], ne[32];
  int64_t neg[32];  // 0 or -1
  int e_max = INT32_MIN;
  for (int k = 0; k < 32; ++k) {
    int sa, ea, sb, eb;
    decode(a[k], &sa, &ea);
    decode(b[k], &sb, &eb);
    sig[k] = sa * sb;  // product = sig * 2^(ne - 6), sig < 2^8
    ne[k] = ea + eb;
    neg[k] = -int64_t(((a[k] ^ b[k]) >> 7) & 1);
    e_max = std::max(e_max, sig[k] != 0 ? ne[k] : INT32_MIN);
  }
  // c = c_sig * 2^(ec - 23) (ec = -126 for subnormals).
  const uint32_t cu = core::float_bits(c);
  const int field = int((cu >> 23) & 0xff);
  const int64_t c_sig = field == 0 ? int64_t(cu & 0x7fffff) : int64_t((cu & 0x7fffff) | 0x800000);
  const int ec = (field == 0 ? 1 : field) - 127;
  if (c_sig != 0) e_max = std::max(e_max, ec);
  if (e_max == INT32_MIN) return 0.0f;
  // Terms in units of 2^(e_max - 13), each truncated toward zero: a product's sig
  // shifted by ne - e_max + 7, c's by ec - e_max - 10 (always to the right).
  // A zero product adds 0 whatever its shift (clamped to stay defined); a shift right by
  // 8 or more leaves nothing of sig < 2^8.
  int64_t sum = 0;
  for (int k = 0; k < 32; ++k) {
    const int shift = ne[k] - e_max + 7;  // <= 7 where sig != 0
    const int64_t left = int64_t(sig[k]) << std::clamp(shift, 0, 7);
    const int64_t right = int64_t(sig[k]) >> std::clamp(-shift, 0, 31);
    const int64_t t = shift >= 0 ? left : right;
    sum += (t ^ neg[k]) - neg[k];  // t or -t
  }
  if (c_sig != 0) {
    const int shift = e_max - ec + 10;
    const int64_t t = shift < 63 ? c_sig >> shift : 0;
    sum += (cu & 0x80000000u) ? -t : t;
  }
  if (sum == 0) return 0.0f;
  uint64_t mag = sum < 0 ? uint64_t(-sum) : uint64_t(sum);
  const int bits = 64 - __builtin_clzll(mag);
  if (bits > 14) mag = (mag >> (bits - 14)) << (bits - 14);  // 14 significant bits, toward zero
  // mag * 2^(e_max - 13), rounded once: a product by a normal power of two, or ldexp beyond.
  const int e = e_max - 13;
  const float v = e >= -126 && e <= 127 ? float(mag) * core::pow2_float(e) : std::ldexp(float(mag), e);
  return sum < 0 ? -v : v;
}

float hopper_bf16_mma16(float c, const uint16_t* a, const uint16_t* b) {
  // A finite value as sig * 2^(e - shift): e its unbiased exponent (-126 for
  // subnormals and zero, as the tensor core aligns them), sig the integer significand.
  bool finite = std::isfinite(c);
  for (int k = 0; k < 16 && finite; ++k)
    finite = std::isfinite(core::bf16_to_float(a[k])) && std::isfinite(core::bf16_to_float(b[k]));
  if (!finite) {
    float s = c;
    for (int k = 0; k < 16; ++k) s += core::bf16_to_float(a[k]) * core::bf16_to_float(b[k]);
    return std::isnan(s) ? core::bits_float(0x7fffffffu) : s;
  }
  const auto bf16_parts = [](uint16_t x, int* sig, int* e) {  // x = sig * 2^(e - 7)
    const int field = (x >> 7) & 0xff, m = x & 0x7f;
    *sig = field == 0 ? m : 128 + m;
    *e = (field == 0 ? 1 : field) - 127;
  };
  const uint32_t cu = core::float_bits(c);
  const int c_field = int((cu >> 23) & 0xff);
  const int64_t c_sig = c_field == 0 ? int64_t(cu & 0x7fffff) : int64_t((cu & 0x7fffff) | 0x800000);  // * 2^(e_c - 23)
  const int e_c = (c_field == 0 ? 1 : c_field) - 127;
  int sig[16], ep[16];
  int e_max = c_sig == 0 ? -126 : e_c;
  for (int k = 0; k < 16; ++k) {
    int sa, ea, sb, eb;
    bf16_parts(a[k], &sa, &ea);
    bf16_parts(b[k], &sb, &eb);
    sig[k] = sa * sb;  // the product is sig * 2^(ep - 14), sig < 2^16
    ep[k] = ea + eb;
    e_max = std::max(e_max, sig[k] == 0 ? -126 : ep[k]);
  }
  // Terms in units of 2^(e_max - 25), truncated toward zero (on the magnitude).
  const auto aligned = [](int64_t magnitude, int shift) -> int64_t {  // magnitude * 2^shift, toward zero
    if (shift >= 0) return magnitude << shift;
    return -shift >= 63 ? 0 : magnitude >> -shift;
  };
  int64_t sum = 0;
  for (int k = 0; k < 16; ++k) {
    if (sig[k] == 0) continue;
    const int64_t t = aligned(sig[k], ep[k] - e_max + 11);
    sum += ((a[k] ^ b[k]) & 0x8000) ? -t : t;
  }
  if (c_sig != 0) {
    const int64_t t = aligned(c_sig, e_c - e_max + 2);
    sum += (cu & 0x80000000u) ? -t : t;
  }
  if (sum == 0) return 0.0f;
  uint64_t mag = sum < 0 ? uint64_t(-sum) : uint64_t(sum);
  int unit = e_max - 25;  // mag * 2^unit
  const int bits = 64 - __builtin_clzll(mag);  // (mag != 0)
  // Toward zero to 24 significant bits, or to fp32's subnormal spacing 2^-149.
  const int drop = std::max(bits - 24, -149 - unit);
  if (drop > 0) {
    mag = drop >= 64 ? 0 : mag >> drop;
    unit += drop;
  }
  // mag * 2^unit is exact in fp32 (mag < 2^24, on the subnormal grid) unless beyond its
  // range: a product by a normal power of two (inf past the top), or in double beyond.
  float f;
  if (unit >= -126 && unit <= 127) {
    f = float(mag) * core::pow2_float(unit);
  } else {
    const double v = std::ldexp(double(mag), unit);
    f = v >= 0x1p128 ? INFINITY : float(v);
  }
  return sum < 0 ? -f : f;
}

float hopper_bf16_dot(float c, const uint16_t* a, const uint16_t* b, int64_t k) {
  DSV4_CHECK(k % 16 == 0, "hopper_bf16_dot: k={} is not a multiple of 16", k);
  for (int64_t i = 0; i < k; i += 16) c = hopper_bf16_mma16(c, a + i, b + i);
  return c;
}

void sinkhorn(float* comb, int64_t hc, int64_t iters, float eps) {
  for (int64_t i = 0; i < hc; ++i) {  // softmax over j of each row, + eps
    float* row = comb + i * hc;
    float m = row[0];
    for (int64_t j = 1; j < hc; ++j) m = std::max(m, row[j]);
    float sum = 0.0f;
    for (int64_t j = 0; j < hc; ++j) {
      row[j] = core::exp_f32_via_f64(row[j] - m);
      sum += row[j];
    }
    for (int64_t j = 0; j < hc; ++j) row[j] = row[j] / sum + eps;
  }
  auto normalize_columns = [&] {
    for (int64_t j = 0; j < hc; ++j) {
      float sum = 0.0f;
      for (int64_t i = 0; i < hc; ++i) sum += comb[i * hc + j];
      for (int64_t i = 0; i < hc; ++i) comb[i * hc + j] /= (sum + eps);
    }
  };
  normalize_columns();
  for (int64_t it = 1; it < iters; ++it) {
    for (int64_t i = 0; i < hc; ++i) {
      float sum = 0.0f;
      for (int64_t j = 0; j < hc; ++j) sum += comb[i * hc + j];
      for (int64_t j = 0; j < hc; ++j) comb[i * hc + j] /= (sum + eps);
    }
    normalize_columns();
  }
}

int32_t argmax_lowest(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return int32_t(best);
}

}  // namespace dsv4::ops::ref
