#include "model/synthetic_weights.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "core/error.h"

namespace dsv4::model {

using core::DType;

// The draws run ~25 fmaf a value (core/scalar_math.h's portable log, cos and exp). On
// x86-64 without -mfma each is a call into libm; a clone built for FMA hardware, with
// every call flattened into it (so random_normal is compiled for FMA too, not called as
// the default build's copy), is picked at load time where the CPU has FMA. fmaf is
// exact either way, so the bits are the same.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__FMA__)
#define DSV4_FMA_CLONES __attribute__((target_clones("fma", "default"), flatten))
#else
#define DSV4_FMA_CLONES
#endif

DSV4_FMA_CLONES
void fill_normal(const TensorSpec& spec, uint64_t seed, int64_t begin, int64_t count, void* out) {
  const uint64_t stream = core::stream_id(spec.name);
  if (spec.dtype == DType::kBF16) {
    auto* p = static_cast<uint16_t*>(out);
    for (int64_t i = 0; i < count; ++i)
      p[i] = core::float_to_bf16(spec.mean + spec.std * core::random_normal(seed, stream, uint64_t(begin + i)));
  } else {
    DSV4_CHECK(spec.dtype == DType::kF32, "fill_normal on {} of dtype {}", spec.name, core::dtype_name(spec.dtype));
    auto* p = static_cast<float*>(out);
    for (int64_t i = 0; i < count; ++i)
      p[i] = spec.mean + spec.std * core::random_normal(seed, stream, uint64_t(begin + i));
  }
}

DSV4_FMA_CLONES
void fill_fp8_rows(const TensorSpec& w, uint64_t seed, int64_t row_begin, int64_t row_count, uint8_t* weight_out,
                   uint8_t* scale_out) {
  const int64_t N = w.logical_n, K = w.logical_k, kb = (K + 127) / 128;
  DSV4_CHECK(row_begin % 128 == 0 && (row_count % 128 == 0 || row_begin + row_count == N),
             "FP8 rows of {} must be generated in blocks of 128", w.name);
  const uint64_t stream = core::stream_id(w.name);
  std::vector<float> block(128 * 128);
  for (int64_t n0 = row_begin; n0 < row_begin + row_count; n0 += 128) {
    const int64_t rows = std::min<int64_t>(128, N - n0);
    for (int64_t b = 0; b < kb; ++b) {
      const int64_t k0 = b * 128, cols = std::min<int64_t>(128, K - k0);
      float amax = 0.0f;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          float v = core::fp8_weight_value(seed, stream, w.std, K, n0 + r, k0 + c);
          block[size_t(r * 128 + c)] = v;
          amax = std::max(amax, std::fabs(v));
        }
      const int e = core::weight_scale_exponent(amax, 1.0f / 448.0f, 1e-4f);
      const float inv = core::pow2_float(-e);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          float q = std::clamp(block[size_t(r * 128 + c)] * inv, -448.0f, 448.0f);
          weight_out[(n0 - row_begin + r) * K + k0 + c] = core::float_to_e4m3(q);
        }
      scale_out[((n0 - row_begin) / 128) * kb + b] = core::e8m0_from_exponent(e);
    }
  }
}

DSV4_FMA_CLONES
void fill_fp4_rows(const TensorSpec& w, uint64_t seed, int64_t row_begin, int64_t row_count, uint8_t* weight_out,
                   uint8_t* scale_out) {
  const int64_t K = w.logical_k, groups = K / 32;
  const uint64_t stream = core::stream_id(w.name);
  float v[32];
  for (int64_t r = 0; r < row_count; ++r) {
    const int64_t n = row_begin + r;
    for (int64_t g = 0; g < groups; ++g) {
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) {
        v[i] = core::fp4_weight_value(seed, stream, w.std, K, n, g * 32 + i);
        amax = std::max(amax, std::fabs(v[i]));
      }
      const int e = core::weight_scale_exponent(amax, 1.0f / 6.0f, 6.0f * 1.1754943508222875e-38f);
      const float inv = core::pow2_float(-e);
      uint8_t* row = weight_out + r * (K / 2) + g * 16;
      for (int i = 0; i < 32; i += 2) {
        uint8_t lo = core::float_to_e2m1(std::clamp(v[i] * inv, -6.0f, 6.0f));
        uint8_t hi = core::float_to_e2m1(std::clamp(v[i + 1] * inv, -6.0f, 6.0f));
        row[i / 2] = uint8_t(lo | (hi << 4));  // low nibble = even element (spec §2.8)
      }
      scale_out[r * groups + g] = core::e8m0_from_exponent(e);
    }
  }
}

void fill_expert_ids(const TensorSpec& spec, uint64_t seed, int64_t num_experts, int64_t row_begin, int64_t row_count,
                     int64_t* out) {
  const uint64_t stream = core::stream_id(spec.name);
  const int64_t k = spec.shape[1];
  for (int64_t r = 0; r < row_count; ++r) core::expert_ids_row(seed, stream, row_begin + r, num_experts, k, out + r * k);
}

void generate_tensor(const std::vector<TensorSpec>& specs, size_t i, int64_t num_experts, uint64_t seed,
                     const TensorPieceSink& sink, std::atomic<uint64_t>& done, int64_t piece_elements) {
  const TensorSpec& s = specs[i];
  const int64_t piece = std::max<int64_t>(1, piece_elements);
  switch (s.init) {
    case WeightInit::kNormal: {
      int64_t n = 1;
      for (int64_t d : s.shape) n *= d;
      const uint64_t esize = core::dtype_size(s.dtype);
      std::vector<uint8_t> buf(size_t(std::min(n, piece)) * esize);
      for (int64_t b = 0; b < n; b += piece) {
        const int64_t c = std::min(piece, n - b);
        fill_normal(s, seed, b, c, buf.data());
        sink(s.name, uint64_t(b) * esize, buf.data(), uint64_t(c) * esize);
        done += uint64_t(c) * esize;
      }
      break;
    }
    case WeightInit::kFp8Weight: {
      const TensorSpec& scale = specs[i + 1];
      const int64_t N = s.logical_n, K = s.logical_k, kb = (K + 127) / 128;
      const int64_t rows_per_chunk = std::max<int64_t>(128, piece / K / 128 * 128);
      std::vector<uint8_t> w(size_t(rows_per_chunk * K)), sc(size_t((rows_per_chunk / 128) * kb));
      for (int64_t r = 0; r < N; r += rows_per_chunk) {
        const int64_t rows = std::min(rows_per_chunk, N - r), scale_rows = (rows + 127) / 128;
        fill_fp8_rows(s, seed, r, rows, w.data(), sc.data());
        sink(s.name, uint64_t(r * K), w.data(), uint64_t(rows * K));
        sink(scale.name, uint64_t((r / 128) * kb), sc.data(), uint64_t(scale_rows * kb));
        done += uint64_t(rows * K + scale_rows * kb);
      }
      break;
    }
    case WeightInit::kFp4Weight: {
      const TensorSpec& scale = specs[i + 1];
      const int64_t N = s.logical_n, K = s.logical_k;
      const int64_t rows_per_chunk = std::max<int64_t>(1, piece / K);
      std::vector<uint8_t> w(size_t(rows_per_chunk * K / 2)), sc(size_t(rows_per_chunk * K / 32));
      for (int64_t r = 0; r < N; r += rows_per_chunk) {
        const int64_t rows = std::min(rows_per_chunk, N - r);
        fill_fp4_rows(s, seed, r, rows, w.data(), sc.data());
        sink(s.name, uint64_t(r * K / 2), w.data(), uint64_t(rows * K / 2));
        sink(scale.name, uint64_t(r * K / 32), sc.data(), uint64_t(rows * K / 32));
        done += uint64_t(rows * K / 2 + rows * K / 32);
      }
      break;
    }
    case WeightInit::kExpertIds: {
      const int64_t V = s.shape[0], k = s.shape[1];
      const int64_t rows_per_chunk = 1 << 16;
      std::vector<int64_t> ids(size_t(rows_per_chunk * k));
      for (int64_t r = 0; r < V; r += rows_per_chunk) {
        const int64_t rows = std::min(rows_per_chunk, V - r);
        fill_expert_ids(s, seed, num_experts, r, rows, ids.data());
        sink(s.name, uint64_t(r * k * 8), ids.data(), uint64_t(rows * k * 8));
        done += uint64_t(rows * k * 8);
      }
      break;
    }
    case WeightInit::kFp8Scale:
    case WeightInit::kFp4Scale:
      break;  // drawn with the paired weight
  }
}

void generate_tensors(const std::vector<TensorSpec>& specs, const std::vector<size_t>& indices, int64_t num_experts,
                      uint64_t seed, const TensorPieceSink& sink, int threads, std::atomic<uint64_t>& done,
                      uint64_t total, const std::function<void(uint64_t, uint64_t)>& progress,
                      int64_t piece_elements) {
  if (threads <= 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  threads = int(std::min<size_t>(size_t(threads), std::max<size_t>(1, indices.size())));
  std::atomic<size_t> next{0};
  std::mutex error_mutex;
  std::exception_ptr error;
  auto work = [&] {
    try {
      for (size_t j = next++; j < indices.size(); j = next++) {
        {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (error) return;  // another thread failed: stop early
        }
        generate_tensor(specs, indices[j], num_experts, seed, sink, done, piece_elements);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::mutex stop_mutex;
  std::condition_variable stop_cv;
  bool stop = false;
  std::thread reporter;
  if (progress)
    reporter = std::thread([&] {
      std::unique_lock<std::mutex> lock(stop_mutex);
      while (!stop_cv.wait_for(lock, std::chrono::seconds(1), [&] { return stop; })) progress(done.load(), total);
    });
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (reporter.joinable()) {
    {
      std::lock_guard<std::mutex> lock(stop_mutex);
      stop = true;
    }
    stop_cv.notify_one();
    reporter.join();
  }
  if (error) std::rethrow_exception(error);
  if (progress) progress(done.load(), total);
}

}  // namespace dsv4::model
