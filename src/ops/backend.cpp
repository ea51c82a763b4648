// Contract checks shared by every backend, and the RoPE frequency table.
#include "ops/backend.h"

#include <algorithm>
#include <new>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iterator>

#include "core/random.h"

#include "core/error.h"
#include "ops/kv_format.h"
#include "ops/gemm_order.h"

namespace dsv4::ops {

using core::DType;
using core::Tensor;

namespace {

// The ops DSV4_REPEAT_OPS may name (Backend's pure ops), in bit order.
enum class RepeatOp : uint32_t {
  kLinear,
  kLinearBf16,
  kLinearPair,
  kLinearBf16Pair,
  kGroupedLinear,
  kIndexerTopk,
  kSparseAttention,
  kRouter,
  kExpertFfn,
  kRoutedExperts,
  kGroupedLinearLinear,
  kCount
};
constexpr const char* kRepeatOpNames[] = {"linear",          "linear_bf16",      "linear_pair", "linear_bf16_pair",
                                          "grouped_linear",  "indexer_topk",     "sparse_attention",
                                          "router",          "expert_ffn",       "routed_experts",
                                          "grouped_linear_linear"};
static_assert(std::size(kRepeatOpNames) == size_t(RepeatOp::kCount), "a name for every repeatable op");

uint32_t parse_repeated_ops(const std::string& names, const char* source) {
  uint32_t mask = 0;
  size_t begin = 0;
  while (begin <= names.size()) {
    size_t end = names.find(',', begin);
    if (end == std::string::npos) end = names.size();
    std::string name = names.substr(begin, end - begin);
    name.erase(0, name.find_first_not_of(" \t"));
    name.erase(name.find_last_not_of(" \t") + 1);
    if (!name.empty()) {
      size_t i = 0;
      while (i < size_t(RepeatOp::kCount) && name != kRepeatOpNames[i]) ++i;
      DSV4_CHECK(i < size_t(RepeatOp::kCount),
                 "{}: '{}' is not an op that may run twice (its outputs must depend on its inputs alone); "
                 "ops that may: {}",
                 source, name, repeatable_ops());
      mask |= 1u << i;
    }
    begin = end + 1;
  }
  return mask;
}

constexpr int64_t kRepeatFromEnv = -1;
std::atomic<int64_t> g_repeat_mask{kRepeatFromEnv};  // kRepeatFromEnv: DSV4_REPEAT_OPS decides
std::atomic<int64_t> g_repeat_runs{0};

// 2 where `op` is in the set, else 1.
int runs_of(RepeatOp op) {
  int64_t mask = g_repeat_mask.load(std::memory_order_relaxed);
  if (mask == kRepeatFromEnv) {
    static const uint32_t from_env = [] {
      const char* env = std::getenv("DSV4_REPEAT_OPS");
      const uint32_t mask = env ? parse_repeated_ops(env, "DSV4_REPEAT_OPS") : 0u;
      // Said once, where every run's log shows it: step times are not the engine's.
      if (mask != 0)
        std::fprintf(stderr, "DSV4_REPEAT_OPS=%s: these ops run twice a call (a diagnostic; outputs unchanged)\n", env);
      return mask;
    }();
    mask = from_env;
  }
  if ((mask >> uint32_t(op) & 1) == 0) return 1;
  g_repeat_runs.fetch_add(1, std::memory_order_relaxed);
  return 2;
}

// Checks dtype, rank and every dimension (-1 = any) of an op argument.
void expect(const Tensor& t, DType dtype, std::initializer_list<int64_t> dims, core::Device device, const char* op,
            const char* arg) {
  DSV4_CHECK(t.dtype() == dtype, "{}: {} has dtype {}, expected {}", op, arg, core::dtype_name(t.dtype()),
             core::dtype_name(dtype));
  DSV4_CHECK(t.ndim() == int(dims.size()), "{}: {} has shape {}, expected rank {}", op, arg, t.shape_string(),
             dims.size());
  int i = 0;
  for (int64_t d : dims) {
    DSV4_CHECK(d < 0 || t.size(i) == d, "{}: {} has shape {}, dimension {} should be {}", op, arg, t.shape_string(),
               i, d);
    ++i;
  }
  DSV4_CHECK(t.numel() == 0 || t.data() != nullptr, "{}: {} has no storage", op, arg);
  DSV4_CHECK(t.device() == device, "{}: {} lives on the wrong device", op, arg);
}

void expect_float(const Tensor& t, std::initializer_list<int64_t> dims, core::Device device, const char* op,
                  const char* arg) {
  DSV4_CHECK(t.dtype() == DType::kBF16 || t.dtype() == DType::kF32, "{}: {} must be bf16 or f32, not {}", op, arg,
             core::dtype_name(t.dtype()));
  expect(t, t.dtype(), dims, device, op, arg);
}

void expect_quant(const QuantLinear& w, core::Device device, const char* op) {
  if (w.format == QuantLinear::Format::kFp8Block128) {
    expect(w.weight, DType::kF8E4M3, {w.n, w.k}, device, op, "weight");
    expect(w.scale, DType::kF8E8M0, {(w.n + 127) / 128, (w.k + 127) / 128}, device, op, "weight scale");
  } else {
    DSV4_CHECK(w.k % 32 == 0, "{}: FP4 weight K={} is not a multiple of 32", op, w.k);
    expect(w.weight, DType::kI8, {w.n, w.k / 2}, device, op, "weight");
    expect(w.scale, DType::kF8E8M0, {w.n, w.k / 32}, device, op, "weight scale");
  }
}

void expect_batch(const BatchView& b, int64_t rows, const char* op) {
  DSV4_CHECK(b.num_tokens == rows, "{}: batch has {} token rows, tensors have {}", op, b.num_tokens, rows);
  DSV4_CHECK(b.num_tokens == 0 || (b.positions != nullptr && b.token_seq != nullptr), "{}: batch without positions",
             op);
}

class CallGraph final : public Graph {
 public:
  explicit CallGraph(std::function<void()> body) : body_(std::move(body)) {}
  void replay() override { body_(); }

 private:
  std::function<void()> body_;
};

// linear_pair's contract; wb == nullptr: linear's (op: the name in the messages).
void expect_linears(const Tensor& x, const QuantLinear& wa, const Tensor& ya, const QuantLinear* wb, const Tensor* yb,
                    core::Device d, const std::string& op, const char* x_name = "x") {
  expect_quant(wa, d, (wb ? op + " (first weight)" : op).c_str());
  if (wb) {
    expect_quant(*wb, d, (op + " (second weight)").c_str());
    DSV4_CHECK(wa.k == wb->k, "{}: the weights take K={} and K={}; one input needs one K", op, wa.k, wb->k);
  }
  DSV4_CHECK(wa.k % 128 == 0, "{}: K={} is not a multiple of the 128-wide activation blocks", op, wa.k);
  expect(x, DType::kBF16, {-1, wa.k}, d, op.c_str(), x_name);
  expect(ya, DType::kBF16, {x.size(0), wa.n}, d, op.c_str(), wb ? "ya" : "y");
  if (wb) expect(*yb, DType::kBF16, {x.size(0), wb->n}, d, op.c_str(), "yb");
}
}  // namespace

namespace {
class HostTimer final : public Timer {
 public:
  void start() override { start_ = std::chrono::steady_clock::now(); }
  void stop() override { stop_ = std::chrono::steady_clock::now(); }
  double elapsed_ms() override { return std::chrono::duration<double, std::milli>(stop_ - start_).count(); }

 private:
  std::chrono::steady_clock::time_point start_, stop_;
};
}  // namespace

std::unique_ptr<Timer> Backend::make_timer() { return std::make_unique<HostTimer>(); }

void set_repeated_ops(const std::string& names) {
  g_repeat_mask.store(parse_repeated_ops(names, "set_repeated_ops"), std::memory_order_relaxed);
}

std::string repeatable_ops() {
  std::string out;
  for (const char* name : kRepeatOpNames) out += (out.empty() ? "" : ", ") + std::string(name);
  return out;
}

int64_t repeated_op_runs() { return g_repeat_runs.load(std::memory_order_relaxed); }

void Backend::set_lane(int lane) {
  DSV4_CHECK(lane >= 0 && lane < num_lanes(), "lane {} of a backend with {} lane(s)", lane, num_lanes());
}

void Backend::randomize_cache(LayerCache& cache, uint64_t seed) {
  // Host-side fill for host-format caches (bf16 rows, f32 states): N(0,1).
  DSV4_CHECK(device() == core::Device::kCpu, "randomize_cache needs a device implementation");
  uint64_t stream = 1;
  for (Tensor* t : {&cache.window, &cache.rows, &cache.index_rows, &cache.kv_state, &cache.score_state,
                    &cache.index_kv_state, &cache.index_score_state}) {
    ++stream;
    if (t->ndim() == 0) continue;
    for (int64_t i = 0; i < t->numel(); ++i) {
      const float v = core::random_normal(seed, stream, uint64_t(i));
      if (t->dtype() == DType::kBF16) t->as<uint16_t>()[i] = core::float_to_bf16(v);
      else t->as<float>()[i] = v;
    }
  }
}

std::shared_ptr<void> Backend::host_buffer(size_t bytes) {
  return std::shared_ptr<void>(::operator new(std::max<size_t>(bytes, 1), std::align_val_t(64)),
                               [](void* p) { ::operator delete(p, std::align_val_t(64)); });
}

std::unique_ptr<Graph> Backend::capture(const std::function<void()>& body, const CaptureInfo&) {
  return std::make_unique<CallGraph>(body);
}

void Backend::embed(const Tensor& table, const BatchView& batch, const Tensor& X) {
  const auto d = device();
  expect(table, DType::kBF16, {-1, -1}, d, "embed", "table");
  expect(X, DType::kBF16, {batch.num_tokens, -1, table.size(1)}, d, "embed", "X");
  do_embed(table, batch, X);
}

namespace {
// rms_norm's contract (op: the name in the messages).
void expect_rms_norm(const Tensor& x, const Tensor& weight, const Tensor& y, core::Device d, const char* op) {
  expect(x, DType::kBF16, {-1, -1}, d, op, "x");
  expect(weight, DType::kBF16, {x.size(1)}, d, op, "norm_weight");
  expect(y, DType::kBF16, {x.size(0), x.size(1)}, d, op, "xn");
}
}  // namespace

void Backend::rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& y) {
  const auto d = device();
  expect(x, DType::kBF16, {-1, -1}, d, "rms_norm", "x");
  expect(weight, DType::kBF16, {x.size(1)}, d, "rms_norm", "weight");
  expect(y, DType::kBF16, {x.size(0), x.size(1)}, d, "rms_norm", "y");
  do_rms_norm(x, weight, eps, y);
}

void Backend::q_norm_rope(const Tensor& q, const BatchView& batch, const RopeTable& rope, float eps) {
  expect(q, DType::kBF16, {-1, -1, -1}, device(), "q_norm_rope", "q");
  DSV4_CHECK(rope.rope_dim > 0 && rope.rope_dim <= q.size(2), "q_norm_rope: rope_dim {} vs head_dim {}",
             rope.rope_dim, q.size(2));
  expect_batch(batch, q.size(0), "q_norm_rope");
  do_q_norm_rope(q, batch, rope, eps);
}

void Backend::kv_rope_quant(const Tensor& kv, const BatchView& batch, const RopeTable& rope) {
  expect(kv, DType::kBF16, {-1, -1}, device(), "kv_rope_quant", "kv");
  DSV4_CHECK((kv.size(1) - rope.rope_dim) % 64 == 0, "kv_rope_quant: nope dims {} not a multiple of 64",
             kv.size(1) - rope.rope_dim);
  expect_batch(batch, kv.size(0), "kv_rope_quant");
  do_kv_rope_quant(kv, batch, rope);
}

namespace {
// hc_pre's contract, shared with hc_pre_norm (op: the name in the messages).
void expect_hc_pre(const Tensor& X, const HcWeights& w, const HcConfig& c, const Tensor& x, const Tensor& post,
                   const Tensor& comb, core::Device d, const char* op) {
  const int64_t hc = c.hc_mult, mix = (2 + hc) * hc;
  expect(X, DType::kBF16, {-1, hc, -1}, d, op, "X");
  const int64_t T = X.size(0), D = X.size(2);
  expect(w.fn, DType::kF32, {mix, hc * D}, d, op, "fn");
  expect(w.base, DType::kF32, {mix}, d, op, "base");
  expect(w.scale, DType::kF32, {3}, d, op, "scale");
  expect(x, DType::kBF16, {T, D}, d, op, "x");
  expect(post, DType::kF32, {T, hc}, d, op, "post");
  expect(comb, DType::kF32, {T, hc, hc}, d, op, "comb");
}
}  // namespace

void Backend::hc_pre(const Tensor& X, const HcWeights& w, const HcConfig& c, const Tensor& x, const Tensor& post,
                     const Tensor& comb) {
  expect_hc_pre(X, w, c, x, post, comb, device(), "hc_pre");
  do_hc_pre(X, w, c, x, post, comb);
}

namespace {
// hc_pre_norm's contract (op: the name in the messages).
void expect_hc_pre_norm(const Tensor& X, const HcWeights& w, const HcConfig& c, const Tensor& norm_weight,
                        const Tensor& x, const Tensor& xn, const Tensor& post, const Tensor& comb, core::Device d,
                        const char* op) {
  expect_hc_pre(X, w, c, x, post, comb, d, op);
  expect(norm_weight, DType::kBF16, {x.size(1)}, d, op, "norm_weight");
  expect(xn, DType::kBF16, {x.size(0), x.size(1)}, d, op, "xn");
  auto overlap = [](const Tensor& a, const Tensor& b) {
    const auto* pa = static_cast<const uint8_t*>(a.data());
    const auto* pb = static_cast<const uint8_t*>(b.data());
    return a.nbytes() > 0 && b.nbytes() > 0 && pa < pb + b.nbytes() && pb < pa + a.nbytes();
  };
  DSV4_CHECK(!overlap(x, xn) && !overlap(xn, X) && !overlap(x, X), "{}: x, xn and X must not overlap", op);
}
}  // namespace

void Backend::hc_pre_norm(const Tensor& X, const HcWeights& w, const HcConfig& c, const Tensor& norm_weight, float eps,
                          const Tensor& x, const Tensor& xn, const Tensor& post, const Tensor& comb) {
  expect_hc_pre_norm(X, w, c, norm_weight, x, xn, post, comb, device(), "hc_pre_norm");
  do_hc_pre_norm(X, w, c, norm_weight, eps, x, xn, post, comb);
}

void Backend::hc_pre_norm_linear_pair(const Tensor& X, const HcWeights& w, const HcConfig& c,
                                      const Tensor& norm_weight, float eps, const Tensor& x, const Tensor& xn,
                                      const Tensor& post, const Tensor& comb, const QuantLinear& wa, const Tensor& ya,
                                      const QuantLinear& wb, const Tensor& yb) {
  const auto d = device();
  expect_hc_pre_norm(X, w, c, norm_weight, x, xn, post, comb, d, "hc_pre_norm_linear_pair");
  expect_linears(xn, wa, ya, &wb, &yb, d, "hc_pre_norm_linear_pair", "xn");
  do_hc_pre_norm_linear_pair(X, w, c, norm_weight, eps, x, xn, post, comb, wa, ya, wb, yb);
}

void Backend::do_hc_pre_norm_linear_pair(const Tensor& X, const HcWeights& w, const HcConfig& c,
                                         const Tensor& norm_weight, float eps, const Tensor& x, const Tensor& xn,
                                         const Tensor& post, const Tensor& comb, const QuantLinear& wa,
                                         const Tensor& ya, const QuantLinear& wb, const Tensor& yb) {
  do_hc_pre_norm(X, w, c, norm_weight, eps, x, xn, post, comb);
  do_linear_pair(xn, wa, ya, wb, yb);
}

void Backend::do_hc_pre_norm(const Tensor& X, const HcWeights& w, const HcConfig& c, const Tensor& norm_weight,
                             float eps, const Tensor& x, const Tensor& xn, const Tensor& post, const Tensor& comb) {
  do_hc_pre(X, w, c, x, post, comb);
  do_rms_norm(x, norm_weight, eps, xn);
}

namespace {
// hc_post's (or moe_output_hc_post's) contract on an HcPostInput (op: the name in the messages).
void expect_hc_post_input(const HcPostInput& in, const Tensor& Y, core::Device d, const char* op) {
  expect(in.R, DType::kBF16, {-1, -1, -1}, d, op, "R");
  const int64_t T = in.R.size(0), hc = in.R.size(1), D = in.R.size(2);
  if (in.f.ndim() > 0) {
    expect(in.f, DType::kBF16, {T, D}, d, op, "f");
  } else {
    expect(in.routed, DType::kF32, {T, D}, d, op, "routed");
    expect(in.shared, DType::kBF16, {T, D}, d, op, "shared");
    expect(in.y, DType::kBF16, {T, D}, d, op, "y");
    if (in.slot_out.ndim() > 0 || in.ids.ndim() > 0) {  // of_moe_slots
      expect(in.slot_out, DType::kBF16, {T, -1, D}, d, op, "slot_out");
      expect(in.ids, DType::kI32, {T, in.slot_out.size(1)}, d, op, "ids");
    }
  }
  expect(in.post, DType::kF32, {T, hc}, d, op, "post (hc_post's)");
  expect(in.comb, DType::kF32, {T, hc, hc}, d, op, "comb (hc_post's)");
  expect(Y, DType::kBF16, {T, hc, D}, d, op, "Y");
  DSV4_CHECK(T == 0 || Y.data() != in.R.data(), "{}: Y aliases R", op);
}
}  // namespace

void Backend::hc_post_pre_norm(const HcPostInput& in, const Tensor& Y, const HcWeights& w, const HcConfig& c,
                               const Tensor& norm_weight, float eps, const Tensor& x, const Tensor& xn,
                               const Tensor& post, const Tensor& comb) {
  const auto d = device();
  expect_hc_post_input(in, Y, d, "hc_post_pre_norm");
  expect_hc_pre_norm(Y, w, c, norm_weight, x, xn, post, comb, d, "hc_post_pre_norm");
  do_hc_post_pre_norm(in, Y, w, c, norm_weight, eps, x, xn, post, comb, nullptr, nullptr, nullptr, nullptr);
}

void Backend::hc_post_pre_norm_linear_pair(const HcPostInput& in, const Tensor& Y, const HcWeights& w,
                                           const HcConfig& c, const Tensor& norm_weight, float eps, const Tensor& x,
                                           const Tensor& xn, const Tensor& post, const Tensor& comb,
                                           const QuantLinear& wa, const Tensor& ya, const QuantLinear& wb,
                                           const Tensor& yb) {
  const auto d = device();
  expect_hc_post_input(in, Y, d, "hc_post_pre_norm_linear_pair");
  expect_hc_pre_norm(Y, w, c, norm_weight, x, xn, post, comb, d, "hc_post_pre_norm_linear_pair");
  expect_linears(xn, wa, ya, &wb, &yb, d, "hc_post_pre_norm_linear_pair", "xn");
  do_hc_post_pre_norm(in, Y, w, c, norm_weight, eps, x, xn, post, comb, &wa, &ya, &wb, &yb);
}

void Backend::do_hc_post_pre_norm(const HcPostInput& in, const Tensor& Y, const HcWeights& w, const HcConfig& c,
                                  const Tensor& norm_weight, float eps, const Tensor& x, const Tensor& xn,
                                  const Tensor& post, const Tensor& comb, const QuantLinear* wa, const Tensor* ya,
                                  const QuantLinear* wb, const Tensor* yb) {
  if (in.slot_out.ndim() > 0) do_moe_reduce(in.slot_out, in.ids, in.routed);
  if (in.f.ndim() > 0) do_hc_post(in.f, in.R, in.post, in.comb, Y);
  else do_moe_output_hc_post(in.routed, in.shared, in.R, in.post, in.comb, in.y, Y);
  if (wa) do_hc_pre_norm_linear_pair(Y, w, c, norm_weight, eps, x, xn, post, comb, *wa, *ya, *wb, *yb);
  else do_hc_pre_norm(Y, w, c, norm_weight, eps, x, xn, post, comb);
}

void Backend::hc_post(const Tensor& f, const Tensor& R, const Tensor& post, const Tensor& comb, const Tensor& Y) {
  const auto d = device();
  expect(R, DType::kBF16, {-1, -1, -1}, d, "hc_post", "R");
  const int64_t T = R.size(0), hc = R.size(1), D = R.size(2);
  expect(f, DType::kBF16, {T, D}, d, "hc_post", "f");
  expect(post, DType::kF32, {T, hc}, d, "hc_post", "post");
  expect(comb, DType::kF32, {T, hc, hc}, d, "hc_post", "comb");
  expect(Y, DType::kBF16, {T, hc, D}, d, "hc_post", "Y");
  DSV4_CHECK(T == 0 || Y.data() != R.data(), "hc_post: Y aliases R");
  do_hc_post(f, R, post, comb, Y);
}

void Backend::hc_sinkhorn(const Tensor& comb, const HcConfig& c) {
  const int64_t hc = c.hc_mult;
  DSV4_CHECK(hc >= 1, "hc_sinkhorn: hc_mult {} must be >= 1", hc);
  expect(comb, DType::kF32, {-1, hc, hc}, device(), "hc_sinkhorn", "comb");
  do_hc_sinkhorn(comb, c);
}

void Backend::hc_head(const Tensor& X, const HcWeights& w, const HcConfig& c, const Tensor& y) {
  const auto d = device();
  const int64_t hc = c.hc_mult;
  expect(X, DType::kBF16, {-1, hc, -1}, d, "hc_head", "X");
  const int64_t T = X.size(0), D = X.size(2);
  expect(w.fn, DType::kF32, {hc, hc * D}, d, "hc_head", "fn");
  expect(w.base, DType::kF32, {hc}, d, "hc_head", "base");
  expect(w.scale, DType::kF32, {1}, d, "hc_head", "scale");
  expect(y, DType::kBF16, {T, D}, d, "hc_head", "y");
  do_hc_head(X, w, c, y);
}

void Backend::linear(const Tensor& x, const QuantLinear& w, const Tensor& y) {
  const auto d = device();
  expect_quant(w, d, "linear");
  DSV4_CHECK(w.k % 128 == 0, "linear: K={} is not a multiple of the 128-wide activation blocks", w.k);
  expect(x, DType::kBF16, {-1, w.k}, d, "linear", "x");
  expect(y, DType::kBF16, {x.size(0), w.n}, d, "linear", "y");
  for (int run = runs_of(RepeatOp::kLinear); run > 0; --run) do_linear(x, w, y);
}

void Backend::linear_bf16(const Tensor& x, const Tensor& w, const Tensor& y) {
  const auto d = device();
  expect(w, DType::kBF16, {-1, -1}, d, "linear_bf16", "w");
  expect_float(x, {-1, w.size(1)}, d, "linear_bf16", "x");
  expect_float(y, {x.size(0), w.size(0)}, d, "linear_bf16", "y");
  for (int run = runs_of(RepeatOp::kLinearBf16); run > 0; --run) do_linear_bf16(x, w, y);
}

void Backend::linear_pair(const Tensor& x, const QuantLinear& wa, const Tensor& ya, const QuantLinear& wb,
                          const Tensor& yb) {
  expect_linears(x, wa, ya, &wb, &yb, device(), "linear_pair");
  for (int run = runs_of(RepeatOp::kLinearPair); run > 0; --run) do_linear_pair(x, wa, ya, wb, yb);
}

void Backend::rms_norm_linear(const Tensor& x, const Tensor& norm_weight, float eps, const Tensor& xn,
                              const QuantLinear& w, const Tensor& y) {
  const auto d = device();
  expect_rms_norm(x, norm_weight, xn, d, "rms_norm_linear");
  expect_linears(xn, w, y, nullptr, nullptr, d, "rms_norm_linear", "xn");
  do_rms_norm_linear(x, norm_weight, eps, xn, w, y, nullptr, nullptr);
}

void Backend::rms_norm_linear_pair(const Tensor& x, const Tensor& norm_weight, float eps, const Tensor& xn,
                                   const QuantLinear& wa, const Tensor& ya, const QuantLinear& wb, const Tensor& yb) {
  const auto d = device();
  expect_rms_norm(x, norm_weight, xn, d, "rms_norm_linear_pair");
  expect_linears(xn, wa, ya, &wb, &yb, d, "rms_norm_linear_pair", "xn");
  do_rms_norm_linear(x, norm_weight, eps, xn, wa, ya, &wb, &yb);
}

void Backend::do_rms_norm_linear(const Tensor& x, const Tensor& norm_weight, float eps, const Tensor& xn,
                                 const QuantLinear& wa, const Tensor& ya, const QuantLinear* wb, const Tensor* yb) {
  do_rms_norm(x, norm_weight, eps, xn);
  if (wb) do_linear_pair(xn, wa, ya, *wb, *yb);
  else do_linear(xn, wa, ya);
}

void Backend::linear_bf16_pair(const Tensor& x, const Tensor& wa, const Tensor& ya, const Tensor& wb,
                               const Tensor& yb) {
  const auto d = device();
  expect(wa, DType::kBF16, {-1, -1}, d, "linear_bf16_pair", "wa");
  expect(wb, DType::kBF16, {-1, wa.size(1)}, d, "linear_bf16_pair", "wb");
  expect_float(x, {-1, wa.size(1)}, d, "linear_bf16_pair", "x");
  expect_float(ya, {x.size(0), wa.size(0)}, d, "linear_bf16_pair", "ya");
  expect_float(yb, {x.size(0), wb.size(0)}, d, "linear_bf16_pair", "yb");
  for (int run = runs_of(RepeatOp::kLinearBf16Pair); run > 0; --run) do_linear_bf16_pair(x, wa, ya, wb, yb);
}

void Backend::do_linear_pair(const Tensor& x, const QuantLinear& wa, const Tensor& ya, const QuantLinear& wb,
                             const Tensor& yb) {
  do_linear(x, wa, ya);
  do_linear(x, wb, yb);
}

void Backend::do_linear_bf16_pair(const Tensor& x, const Tensor& wa, const Tensor& ya, const Tensor& wb,
                                  const Tensor& yb) {
  do_linear_bf16(x, wa, ya);
  do_linear_bf16(x, wb, yb);
}

void Backend::grouped_linear(const Tensor& x, const QuantLinear& w, int64_t groups, const Tensor& y) {
  const auto d = device();
  expect_quant(w, d, "grouped_linear");
  DSV4_CHECK(w.format == QuantLinear::Format::kFp8Block128, "grouped_linear: weight must be FP8");
  DSV4_CHECK(groups > 0 && w.n % groups == 0, "grouped_linear: {} rows not divisible into {} groups", w.n, groups);
  expect(x, DType::kBF16, {-1, groups * w.k}, d, "grouped_linear", "x");
  expect(y, DType::kBF16, {x.size(0), w.n}, d, "grouped_linear", "y");
  for (int run = runs_of(RepeatOp::kGroupedLinear); run > 0; --run) do_grouped_linear(x, w, groups, y);
}

void Backend::grouped_linear_linear(const Tensor& x, const QuantLinear& wa, int64_t groups, const Tensor& z,
                                    const QuantLinear& wb, const Tensor& y) {
  const auto d = device();
  expect_quant(wa, d, "grouped_linear_linear (first weight)");
  DSV4_CHECK(wa.format == QuantLinear::Format::kFp8Block128, "grouped_linear_linear: the first weight must be FP8");
  DSV4_CHECK(groups > 0 && wa.n % groups == 0, "grouped_linear_linear: {} rows not divisible into {} groups", wa.n,
             groups);
  expect(x, DType::kBF16, {-1, groups * wa.k}, d, "grouped_linear_linear", "x");
  expect_linears(z, wb, y, nullptr, nullptr, d, "grouped_linear_linear (second weight)", "z");
  DSV4_CHECK(wb.k == wa.n, "grouped_linear_linear: the second weight takes K={}, the first gives {} columns", wb.k,
             wa.n);
  expect(z, DType::kBF16, {x.size(0), wa.n}, d, "grouped_linear_linear", "z");
  for (int run = runs_of(RepeatOp::kGroupedLinearLinear); run > 0; --run)
    do_grouped_linear_linear(x, wa, groups, z, wb, y);
}

void Backend::do_grouped_linear_linear(const Tensor& x, const QuantLinear& wa, int64_t groups, const Tensor& z,
                                       const QuantLinear& wb, const Tensor& y) {
  do_grouped_linear(x, wa, groups, z);
  do_linear(z, wb, y);
}

void Backend::compress(const Tensor& a, const Tensor& g, const CompressorWeights& w, const BatchView& batch,
                       const RopeTable& rope, float norm_eps, LayerCache& cache) {
  const auto d = device();
  DSV4_CHECK(w.ratio == 4 || w.ratio == 128, "compress: ratio {} must be 4 or 128", w.ratio);
  DSV4_CHECK(!w.rotate || w.ratio == 4, "compress: the indexer compressor has ratio 4");
  expect(a, DType::kF32, {batch.num_tokens, w.width()}, d, "compress", "a");
  expect(g, DType::kF32, {batch.num_tokens, w.width()}, d, "compress", "g");
  expect(w.ape, DType::kF32, {w.ratio, w.width()}, d, "compress", "ape");
  expect(w.norm, DType::kBF16, {w.head_dim}, d, "compress", "norm");
  const Tensor& rows = w.rotate ? cache.index_rows : cache.rows;
  const Tensor& kv_state = w.rotate ? cache.index_kv_state : cache.kv_state;
  DSV4_CHECK(rows.ndim() >= 2 && kv_state.ndim() == 3, "compress: cache has no {} storage",
             w.rotate ? "indexer" : "compressor");
  expect_batch(batch, a.size(0), "compress");
  do_compress(a, g, w, batch, rope, norm_eps, cache);
}

void Backend::indexer_q(const Tensor& q, const BatchView& batch, const RopeTable& rope) {
  expect(q, DType::kBF16, {-1, -1, -1}, device(), "indexer_q", "q");
  const int64_t Di = q.size(2);
  DSV4_CHECK((Di & (Di - 1)) == 0 && Di % 32 == 0, "indexer_q: head dim {} must be a power of two >= 32", Di);
  expect_batch(batch, q.size(0), "indexer_q");
  do_indexer_q(q, batch, rope);
}

void Backend::indexer_topk(const Tensor& q, const Tensor& weights, float weight_scale, const LayerCache& cache,
                           const BatchView& batch, const Tensor& topk) {
  const auto d = device();
  expect(q, DType::kBF16, {-1, -1, -1}, d, "indexer_topk", "q");
  expect(weights, DType::kBF16, {q.size(0), q.size(1)}, d, "indexer_topk", "weights");
  expect(topk, DType::kI32, {q.size(0), -1}, d, "indexer_topk", "topk");
  DSV4_CHECK(cache.index_rows.ndim() >= 2, "indexer_topk: cache has no indexer rows");
  expect_batch(batch, q.size(0), "indexer_topk");
  for (int run = runs_of(RepeatOp::kIndexerTopk); run > 0; --run)
    do_indexer_topk(q, weights, weight_scale, cache, batch, topk);
}

void Backend::sparse_attention(const Tensor& q, const Tensor& kv, const LayerCache& cache, const BatchView& batch,
                               const Tensor& topk, const Tensor& sink, float softmax_scale, const RopeTable& rope,
                               const Tensor& o) {
  const auto d = device();
  expect(q, DType::kBF16, {-1, -1, -1}, d, "sparse_attention", "q");
  const int64_t T = q.size(0), H = q.size(1), Dh = q.size(2);
  expect(kv, DType::kBF16, {T, Dh}, d, "sparse_attention", "kv");
  expect(sink, DType::kF32, {H}, d, "sparse_attention", "sink");
  expect(o, DType::kBF16, {T, H, Dh}, d, "sparse_attention", "o");
  if (cache.ratio == 4) expect(topk, DType::kI32, {T, -1}, d, "sparse_attention", "topk");
  DSV4_CHECK(cache.window.ndim() >= 2, "sparse_attention: cache has no window ring");
  expect_batch(batch, T, "sparse_attention");
  for (int run = runs_of(RepeatOp::kSparseAttention); run > 0; --run)
    do_sparse_attention(q, kv, cache, batch, topk, sink, softmax_scale, rope, o);
}

void Backend::window_commit(const Tensor& kv, const BatchView& batch, LayerCache& cache) {
  expect(kv, DType::kBF16, {-1, -1}, device(), "window_commit", "kv");
  expect_batch(batch, kv.size(0), "window_commit");
  do_window_commit(kv, batch, cache);
}

void Backend::router(const Tensor& x, const Tensor& gate, const Tensor& bias, const Tensor& tid2eid,
                     const BatchView& batch, const RouterConfig& config, const Tensor& weights, const Tensor& ids) {
  const auto d = device();
  expect(gate, DType::kBF16, {-1, -1}, d, "router", "gate");
  const int64_t E = gate.size(0), D = gate.size(1), k = config.topk;
  expect(x, DType::kBF16, {-1, D}, d, "router", "x");
  const int64_t T = x.size(0);
  const bool hash = tid2eid.ndim() > 0;
  DSV4_CHECK(hash != (bias.ndim() > 0), "router: exactly one of bias and tid2eid must be given");
  if (hash) expect(tid2eid, DType::kI64, {-1, k}, d, "router", "tid2eid");
  else expect(bias, DType::kF32, {E}, d, "router", "bias");
  DSV4_CHECK(k > 0 && k <= E, "router: topk {} with {} experts", k, E);
  expect(weights, DType::kF32, {T, k}, d, "router", "weights");
  expect(ids, DType::kI32, {T, k}, d, "router", "ids");
  expect_batch(batch, T, "router");
  for (int run = runs_of(RepeatOp::kRouter); run > 0; --run)
    do_router(x, gate, bias, tid2eid, batch, config, weights, ids);
}

void Backend::expert_ffn(const Tensor& x, const ExpertWeights& w, const Tensor& row_weight, float swiglu_limit,
                         const Tensor& y) {
  const auto d = device();
  expect_quant(w.w1, d, "expert_ffn w1");
  expect_quant(w.w3, d, "expert_ffn w3");
  expect_quant(w.w2, d, "expert_ffn w2");
  expect(x, DType::kBF16, {-1, w.w1.k}, d, "expert_ffn", "x");
  DSV4_CHECK(w.w2.k == w.w1.n && w.w3.n == w.w1.n && w.w2.n == w.w1.k, "expert_ffn: inconsistent expert shapes");
  if (row_weight.ndim() > 0) expect(row_weight, DType::kF32, {x.size(0)}, d, "expert_ffn", "row_weight");
  expect(y, DType::kBF16, {x.size(0), w.w2.n}, d, "expert_ffn", "y");
  for (int run = runs_of(RepeatOp::kExpertFfn); run > 0; --run) do_expert_ffn(x, w, row_weight, swiglu_limit, y);
}

void Backend::routed_experts(const Tensor& x, const Tensor& ids, const Tensor& weights,
                             const std::vector<ExpertWeights>& experts, int64_t expert_begin, int64_t expert_end,
                             float swiglu_limit, const Tensor& out) {
  const auto d = device();
  expect(x, DType::kBF16, {-1, -1}, d, "routed_experts", "x");
  const int64_t R = x.size(0), D = x.size(1);
  expect(ids, DType::kI32, {R, -1}, d, "routed_experts", "ids");
  const int64_t k = ids.size(1);
  expect(weights, DType::kF32, {R, k}, d, "routed_experts", "weights");
  expect(out, DType::kBF16, {R, k, D}, d, "routed_experts", "out");
  DSV4_CHECK(0 <= expert_begin && expert_begin <= expert_end && expert_end <= int64_t(experts.size()),
             "routed_experts: expert range [{}, {}) outside {} experts", expert_begin, expert_end, experts.size());
  for (int64_t e = expert_begin; e < expert_end; ++e)
    DSV4_CHECK(experts[size_t(e)].w1.weight.data() != nullptr, "routed_experts: local expert {} is not bound", e);
  for (int run = runs_of(RepeatOp::kRoutedExperts); run > 0; --run)
    do_routed_experts(x, ids, weights, experts, expert_begin, expert_end, swiglu_limit, out);
}

void Backend::moe_reduce(const Tensor& slot_out, const Tensor& ids, const Tensor& routed) {
  const auto d = device();
  expect(slot_out, DType::kBF16, {-1, -1, -1}, d, "moe_reduce", "slot_out");
  const int64_t T = slot_out.size(0), k = slot_out.size(1), D = slot_out.size(2);
  expect(ids, DType::kI32, {T, k}, d, "moe_reduce", "ids");
  expect(routed, DType::kF32, {T, D}, d, "moe_reduce", "routed");
  do_moe_reduce(slot_out, ids, routed);
}

void Backend::moe_output(const Tensor& routed, const Tensor& shared, const Tensor& y) {
  const auto d = device();
  expect(routed, DType::kF32, {-1, -1}, d, "moe_output", "routed");
  expect(shared, DType::kBF16, {routed.size(0), routed.size(1)}, d, "moe_output", "shared");
  expect(y, DType::kBF16, {routed.size(0), routed.size(1)}, d, "moe_output", "y");
  do_moe_output(routed, shared, y);
}

void Backend::moe_output_hc_post(const Tensor& routed, const Tensor& shared, const Tensor& R, const Tensor& post,
                                 const Tensor& comb, const Tensor& y, const Tensor& Y) {
  const auto d = device();
  expect(R, DType::kBF16, {-1, -1, -1}, d, "moe_output_hc_post", "R");
  const int64_t T = R.size(0), hc = R.size(1), D = R.size(2);
  expect(routed, DType::kF32, {T, D}, d, "moe_output_hc_post", "routed");
  expect(shared, DType::kBF16, {T, D}, d, "moe_output_hc_post", "shared");
  expect(y, DType::kBF16, {T, D}, d, "moe_output_hc_post", "y");
  expect(post, DType::kF32, {T, hc}, d, "moe_output_hc_post", "post");
  expect(comb, DType::kF32, {T, hc, hc}, d, "moe_output_hc_post", "comb");
  expect(Y, DType::kBF16, {T, hc, D}, d, "moe_output_hc_post", "Y");
  DSV4_CHECK(T == 0 || Y.data() != R.data(), "moe_output_hc_post: Y aliases R");
  do_moe_output_hc_post(routed, shared, R, post, comb, y, Y);
}

void Backend::do_moe_output_hc_post(const Tensor& routed, const Tensor& shared, const Tensor& R, const Tensor& post,
                                    const Tensor& comb, const Tensor& y, const Tensor& Y) {
  do_moe_output(routed, shared, y);
  do_hc_post(y, R, post, comb, Y);
}

void Backend::add_broadcast(const Tensor& e, const Tensor& h, const Tensor& X) {
  const auto d = device();
  expect(h, DType::kBF16, {-1, -1, -1}, d, "add_broadcast", "h");
  expect(e, DType::kBF16, {h.size(0), h.size(2)}, d, "add_broadcast", "e");
  expect(X, DType::kBF16, {h.size(0), h.size(1), h.size(2)}, d, "add_broadcast", "X");
  do_add_broadcast(e, h, X);
}

void Backend::gather_rows(const Tensor& src, const Tensor& rows, const Tensor& dst) {
  const auto d = device();
  expect(rows, DType::kI32, {-1}, d, "gather_rows", "rows");
  DSV4_CHECK(src.dtype() == dst.dtype() && src.ndim() == dst.ndim() && dst.size(0) == rows.size(0),
             "gather_rows: src {} / dst {} / rows {} mismatch", src.shape_string(), dst.shape_string(),
             rows.shape_string());
  DSV4_CHECK(src.device() == d && dst.device() == d, "gather_rows: tensors on the wrong device");
  do_gather_rows(src, rows, dst);
}

void Backend::gather_slots(const Tensor& src, const Tensor& index, const Tensor& dst) {
  const auto d = device();
  expect(src, DType::kBF16, {-1, -1, -1}, d, "gather_slots", "src");
  expect(index, DType::kI32, {-1, src.size(1)}, d, "gather_slots", "index");
  expect(dst, DType::kBF16, {index.size(0), src.size(1), src.size(2)}, d, "gather_slots", "dst");
  do_gather_slots(src, index, dst);
}

void Backend::argmax_rows(const Tensor& logits, const Tensor& ids) {
  const auto d = device();
  expect(logits, DType::kF32, {-1, -1}, d, "argmax_rows", "logits");
  expect(ids, DType::kI32, {logits.size(0)}, d, "argmax_rows", "ids");
  DSV4_CHECK(logits.size(1) >= 1 || logits.size(0) == 0, "argmax_rows: rows of 0 columns have no argmax");
  do_argmax_rows(logits, ids);
}

void Backend::choose_tokens(const Tensor& logits, const Tensor& choices, const Tensor& ids) {
  const auto d = device();
  expect(logits, DType::kF32, {-1, -1}, d, "choose_tokens", "logits");
  expect(choices, DType::kI32, {logits.size(0), kTokenChoiceWords}, d, "choose_tokens", "choices");
  expect(ids, DType::kI32, {logits.size(0)}, d, "choose_tokens", "ids");
  DSV4_CHECK(logits.size(0) == 0 || (logits.size(1) >= 1 && logits.size(1) <= token_law::kMaxVocab),
             "choose_tokens: rows of {} columns (1 to {} can be chosen from)", logits.size(1), token_law::kMaxVocab);
  do_choose_tokens(logits, choices, ids);
}

void Backend::token_logprobs(const Tensor& logits, const Tensor& choices, const Tensor& ids, const Tensor& records) {
  const auto d = device();
  expect(logits, DType::kF32, {-1, -1}, d, "token_logprobs", "logits");
  expect(choices, DType::kI32, {logits.size(0), kTokenChoiceWords}, d, "token_logprobs", "choices");
  expect(ids, DType::kI32, {logits.size(0)}, d, "token_logprobs", "ids");
  expect(records, DType::kI32, {logits.size(0), kTokenLogprobWords}, d, "token_logprobs", "records");
  DSV4_CHECK(logits.size(0) == 0 || (logits.size(1) >= 1 && logits.size(1) <= token_law::kMaxVocab),
             "token_logprobs: rows of {} columns (1 to {})", logits.size(1), token_law::kMaxVocab);
  do_token_logprobs(logits, choices, ids, records);
}

void Backend::penalize_logits(const Tensor& logits, const Tensor& penalties) {
  const auto d = device();
  expect(logits, DType::kF32, {-1, -1}, d, "penalize_logits", "logits");
  expect(penalties, DType::kI32, {-1, kLogitPenaltyWords}, d, "penalize_logits", "penalties");
  if (penalties.size(0) > 0 && logits.size(0) > 0) do_penalize_logits(logits, penalties);
}

void Backend::copy(const Tensor& dst, const Tensor& src) {
  DSV4_CHECK(dst.nbytes() >= src.nbytes(), "copy: {} bytes into a tensor of {}", src.nbytes(), dst.nbytes());
  DSV4_CHECK(src.device() == device() && dst.device() == device(), "copy: tensors on the wrong device");
  do_copy(dst, src);
}

std::vector<float> rope_inv_freq(int64_t rope_dim, double base, bool yarn, double factor, int64_t original_seq_len,
                                 double beta_fast, double beta_slow) {
  // Reference arithmetic (spec §2.2): fp32 exponents and pow, the YaRN ramp in fp32.
  const int64_t half = rope_dim / 2;
  std::vector<float> freqs(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    float exponent = float(2 * i) / float(rope_dim);
    freqs[size_t(i)] = 1.0f / std::pow(float(base), exponent);
  }
  if (!yarn) return freqs;
  auto correction_dim = [&](double rotations) {
    return double(rope_dim) * std::log(double(original_seq_len) / (rotations * 2.0 * M_PI)) / (2.0 * std::log(base));
  };
  double low = std::max(std::floor(correction_dim(beta_fast)), 0.0);
  double high = std::min(std::ceil(correction_dim(beta_slow)), double(rope_dim - 1));
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < half; ++i) {
    float ramp = (float(i) - float(low)) / float(high - low);
    ramp = std::min(std::max(ramp, 0.0f), 1.0f);
    float smooth = 1.0f - ramp;
    float f = freqs[size_t(i)];
    freqs[size_t(i)] = f / float(factor) * (1.0f - smooth) + f * smooth;
  }
  return freqs;
}

namespace {
std::atomic<int> g_forced_min_slice_stages{0};
}  // namespace

void gemm_force_min_slice_stages(int n) { g_forced_min_slice_stages.store(std::max(n, 0)); }

namespace {
// A slice floor from the environment variable `name` (1, 2, 4 or 8), or `fallback`.
int slice_floor_from_env(const char* name, const char* launches, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const std::string t(v);
  DSV4_CHECK(t == "1" || t == "2" || t == "4" || t == "8", "{}='{}': expected 1, 2, 4 or 8", name, t);
  std::fprintf(stderr, "%s=%s: %s K slices keep at least %s stages\n", name, v, launches, v);
  return std::atoi(v);
}
}  // namespace

int gemm_min_slice_stages() {
  const int forced = g_forced_min_slice_stages.load(std::memory_order_relaxed);
  if (forced > 0) return forced;
  static const int from_env = slice_floor_from_env("DSV4_GEMM_MIN_SLICE_STAGES", "every GEMM's", 2);
  return from_env;
}

int gemm_min_quant_slice_stages() {
  const int forced = g_forced_min_slice_stages.load(std::memory_order_relaxed);
  if (forced > 0) return forced;
  static const int from_env =
      slice_floor_from_env("DSV4_GEMM_MIN_QUANT_SLICE_STAGES", "the quantized GEMMs'", gemm_min_slice_stages());
  return from_env;
}

namespace {
// A layer's cache of KV rows of kv_row bytes and index rows of index_row bytes: per slot the
// window ring and the f32 compressor states (kv and score; the indexer's at ratio 4), per
// page the compressed rows (and the index rows at ratio 4). Both backends' allocate_cache.
CacheCost cache_cost_of_rows(const CacheGeometry& g, int64_t ratio, int64_t kv_row, int64_t index_row) {
  CacheCost c;
  c.per_slot = g.window * kv_row;
  if (ratio > 0) {
    const int64_t coff = ratio == 4 ? 2 : 1;  // (ratio 4 compresses overlapping windows: twice the state)
    c.per_page = kPageTokens / ratio * kv_row;
    c.per_slot += 2 * coff * ratio * coff * g.head_dim * 4;
  }
  if (ratio == 4) {
    c.per_page += kPageTokens / 4 * index_row;
    c.per_slot += 2 * 8 * 2 * g.index_head_dim * 4;
  }
  return c;
}
}  // namespace

CacheCost fp8_cache_cost(const CacheGeometry& g, int64_t ratio) {
  if (g.rope_dim != kFp8KvRopeDim)
    core::fail("qk_rope_head_dim {}: the CUDA backend's FP8 KV rows hold {} rope dims (V4's); the CPU backend takes "
               "other values (--backend cpu)",
               g.rope_dim, kFp8KvRopeDim);
  return cache_cost_of_rows(g, ratio, kv_row_bytes(g.head_dim, g.rope_dim), index_row_bytes(g.index_head_dim));
}

CacheCost bf16_cache_cost(const CacheGeometry& g, int64_t ratio) {
  return cache_cost_of_rows(g, ratio, g.head_dim * 2, g.index_head_dim * 2);
}

LayerCacheCost cache_cost_of_backend(const std::string& backend_name) {
  return backend_name == "cuda" ? &fp8_cache_cost : &bf16_cache_cost;
}

}  // namespace dsv4::ops
