// NCCL communicator, two ranks as threads of this process (one GPU each): every
// collective against expected values, CUDA-graph capture, fail-fast on a dead rank and on
// an exception, and the collective ledger. Skips visibly with fewer than 2 GPUs.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops/cuda/cuda_check.h"
#include "parallel/nccl_communicator.h"

namespace dsv4::parallel {
namespace {

using core::DType;
using core::Tensor;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

int gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

#define DSV4_REQUIRE_GPUS(n)                                                                        \
  do {                                                                                              \
    if (gpu_count() < (n)) GTEST_SKIP() << "needs " << (n) << " GPUs, this machine has " << gpu_count(); \
  } while (0)

std::vector<std::unique_ptr<NcclCommunicator>> make_group(int world, int timeout_ms, bool ledger = false) {
  ClusterPlan plan;
  plan.world_size = world;
  for (int r = 0; r < world; ++r) plan.local.push_back(LocalRank{r, r});
  plan.unique_id = nccl_unique_id();
  NcclOptions options;
  options.comm.timeout = milliseconds(timeout_ms);
  options.comm.ledger = ledger;
  return create_nccl_communicators(plan, options);
}

std::vector<Communicator*> raw(const std::vector<std::unique_ptr<NcclCommunicator>>& comms) {
  std::vector<Communicator*> out;
  for (const auto& c : comms) out.push_back(c.get());
  return out;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// A device allocation on the calling thread's current device, as a tensor.
struct DeviceTensor {
  std::shared_ptr<void> storage;
  Tensor t;
  DeviceTensor(DType dtype, std::initializer_list<int64_t> shape) {
    Tensor shape_only(nullptr, dtype, shape, core::Device::kCuda);
    void* p = nullptr;
    size_t bytes = std::max<size_t>(shape_only.nbytes(), 1);
    DSV4_CUDA_CHECK(cudaMalloc(&p, bytes));
    DSV4_CUDA_CHECK(cudaMemset(p, 0xAB, bytes));  // poison; finished before any collective writes it:
    DSV4_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));  // the comm stream does not wait for stream 0
    storage = std::shared_ptr<void>(p, [](void* q) { (void)cudaFree(q); });
    t = Tensor(p, dtype, shape, core::Device::kCuda, storage);
  }
  template <typename T>
  void upload(const std::vector<T>& v) {
    DSV4_CUDA_CHECK(cudaMemcpy(t.data(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  template <typename T>
  std::vector<T> download() const {
    std::vector<T> v(t.nbytes() / sizeof(T));
    DSV4_CUDA_CHECK(cudaMemcpy(v.data(), t.data(), v.size() * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
};

void expect_true(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error(what);
}

TEST(Nccl, CollectivesMatchExpectedTwoRanks) {
  DSV4_REQUIRE_GPUS(2);
  std::fprintf(stderr, "[NCCL %s]\n", nccl_version_string().c_str());
  const int W = 2;
  auto comms = make_group(W, 30000, /*ledger=*/true);
  auto errors = run_rank_threads(raw(comms), [&](Communicator& base) {
    auto& c = static_cast<NcclCommunicator&>(base);
    DSV4_CUDA_CHECK(cudaSetDevice(c.device()));
    const int me = c.rank();

    // all_gather, f32
    const int n = 1000;
    DeviceTensor x(DType::kF32, {n}), g(DType::kF32, {W * n});
    std::vector<float> xv(n);
    for (int i = 0; i < n; ++i) xv[size_t(i)] = float(me * 100000 + i + 1);
    x.upload(xv);
    c.all_gather(x.t, g.t);
    // reduce_scatter f32 sum and bf16 max (small integers: exact in any order)
    DeviceTensor y(DType::kF32, {W * n}), z(DType::kF32, {n});
    std::vector<float> yv(size_t(W * n));
    for (int i = 0; i < W * n; ++i) yv[size_t(i)] = float((me + 1) * (i % 97));
    y.upload(yv);
    c.reduce_scatter(y.t, z.t, ReduceOp::kSum);
    DeviceTensor yb(DType::kBF16, {W * 64}), zb(DType::kBF16, {64});
    std::vector<uint16_t> ybv(size_t(W * 64));
    for (int i = 0; i < W * 64; ++i) ybv[size_t(i)] = core::float_to_bf16(float(((i * 7 + me * 13) % 50) - 25));
    yb.upload(ybv);
    c.reduce_scatter(yb.t, zb.t, ReduceOp::kMax);
    // all_to_all, uneven with an empty pair: counts[src][dst]
    const int64_t counts[2][2] = {{3, 0}, {2, 5}};
    const int64_t row_bytes = 16;
    std::vector<int64_t> send_rows = {counts[me][0], counts[me][1]}, recv_rows = {counts[0][me], counts[1][me]};
    DeviceTensor s(DType::kU8, {8, row_bytes}), r(DType::kU8, {8, row_bytes});
    std::vector<uint32_t> sv(8 * 4, 0);
    int64_t at = 0;
    for (int p = 0; p < W; ++p)
      for (int64_t i = 0; i < send_rows[size_t(p)]; ++i, ++at)
        for (int k = 0; k < 4; ++k) sv[size_t(at * 4 + k)] = uint32_t(me * 1000 + p * 100 + i * 10 + k + 1);
    s.upload(sv);
    c.all_to_all(s.t, send_rows, r.t, recv_rows, row_bytes);
    // all_to_all_equal
    DeviceTensor es(DType::kU8, {W * 3, 8}), er(DType::kU8, {W * 3, 8});
    std::vector<uint64_t> esv(size_t(W * 3));
    for (int p = 0; p < W; ++p)
      for (int i = 0; i < 3; ++i) esv[size_t(p * 3 + i)] = uint64_t(me * 1000 + p * 100 + i + 1);
    es.upload(esv);
    c.all_to_all_equal(es.t, er.t, 3, 8);
    // 0-byte data collectives
    Tensor empty(nullptr, DType::kBF16, {0, 32}, core::Device::kCuda);
    c.all_gather(empty, empty);
    c.reduce_scatter(empty, empty, ReduceOp::kSum);
    c.all_to_all(empty, {0, 0}, empty, {0, 0}, 64);
    c.all_to_all_equal(empty, empty, 0, 64);
    c.synchronize();

    auto gv = g.download<float>();
    for (int p = 0; p < W; ++p)
      for (int i = 0; i < n; ++i)
        expect_true(gv[size_t(p * n + i)] == float(p * 100000 + i + 1), "all_gather value");
    auto zv = z.download<float>();
    for (int i = 0; i < n; ++i) {
      float want = 0;
      for (int p = 0; p < W; ++p) want += float((p + 1) * ((me * n + i) % 97));
      expect_true(zv[size_t(i)] == want, "reduce_scatter f32 sum");
    }
    auto zbv = zb.download<uint16_t>();
    for (int i = 0; i < 64; ++i) {
      float want = -1e9f;
      for (int p = 0; p < W; ++p) want = std::max(want, float((((me * 64 + i) * 7 + p * 13) % 50) - 25));
      expect_true(core::bf16_to_float(zbv[size_t(i)]) == want, "reduce_scatter bf16 max");
    }
    auto rv = r.download<uint32_t>();
    at = 0;
    for (int src = 0; src < W; ++src)
      for (int64_t i = 0; i < recv_rows[size_t(src)]; ++i, ++at)
        for (int k = 0; k < 4; ++k)
          expect_true(rv[size_t(at * 4 + k)] == uint32_t(src * 1000 + me * 100 + i * 10 + k + 1), "all_to_all row");
    auto erv = er.download<uint64_t>();
    for (int src = 0; src < W; ++src)
      for (int i = 0; i < 3; ++i)
        expect_true(erv[size_t(src * 3 + i)] == uint64_t(src * 1000 + me * 100 + i + 1), "all_to_all_equal row");

    // host collectives
    struct Row {
      int32_t rank, tokens;
    } mine{me, 7 * me + 1};
    std::vector<Row> table(W, Row{-1, -1});
    c.all_gather_host(&mine, sizeof(mine), table.data());
    for (int p = 0; p < W; ++p) expect_true(table[size_t(p)].rank == p && table[size_t(p)].tokens == 7 * p + 1, "host gather");
    int64_t v[2] = {me + 1, -me};
    c.all_reduce_host(v, 2, ReduceOp::kSum);
    expect_true(v[0] == 3 && v[1] == -1, "host sum");
    int64_t m[2] = {me, -me};
    c.all_reduce_host(m, 2, ReduceOp::kMax);
    expect_true(m[0] == 1 && m[1] == 0, "host max");
    c.all_gather_host(nullptr, 0, nullptr);
    c.barrier();
    // A large host gather grows the staging buffers.
    std::vector<char> big(200000, char('a' + me)), all(size_t(W) * big.size());
    c.all_gather_host(big.data(), big.size(), all.data());
    expect_true(all[0] == 'a' && all[big.size()] == 'b', "large host gather");
    c.check_ledger("collectives");
  });
  for (int r = 0; r < W; ++r) EXPECT_FALSE(errors[size_t(r)]) << "rank " << r << ": " << exception_message(errors[size_t(r)]);
}

TEST(Nccl, GraphCaptureOfAllGatherAndReduceScatter) {
  DSV4_REQUIRE_GPUS(2);
  const int W = 2, n = 4096;
  auto comms = make_group(W, 30000);
  auto errors = run_rank_threads(raw(comms), [&](Communicator& base) {
    auto& c = static_cast<NcclCommunicator&>(base);
    DSV4_CUDA_CHECK(cudaSetDevice(c.device()));
    const int me = c.rank();
    DeviceTensor x(DType::kBF16, {n}), g(DType::kBF16, {W * n}), y(DType::kF32, {W * n}), z(DType::kF32, {n});
    cudaStream_t s = c.stream();
    // Eager warm-up first: NCCL connects peers lazily on first use, which is not capturable.
    c.all_gather(x.t, g.t);
    c.reduce_scatter(y.t, z.t, ReduceOp::kSum);
    c.synchronize();
    cudaGraph_t graph = nullptr;
    // Thread-local capture: the other rank's thread keeps issuing NCCL calls meanwhile.
    DSV4_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    c.all_gather(x.t, g.t);
    c.reduce_scatter(y.t, z.t, ReduceOp::kSum);
    DSV4_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
    cudaGraphExec_t exec = nullptr;
    DSV4_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 3; ++replay) {
      std::vector<uint16_t> xv(n);
      std::vector<float> yv(size_t(W * n));
      for (int i = 0; i < n; ++i) xv[size_t(i)] = core::float_to_bf16(float((replay * 7 + me * 3 + i) % 200));
      for (int i = 0; i < W * n; ++i) yv[size_t(i)] = float((replay + 1) * (me + 1) + i % 31);
      DSV4_CUDA_CHECK(cudaMemcpyAsync(x.t.data(), xv.data(), xv.size() * 2, cudaMemcpyHostToDevice, s));
      DSV4_CUDA_CHECK(cudaMemcpyAsync(y.t.data(), yv.data(), yv.size() * 4, cudaMemcpyHostToDevice, s));
      DSV4_CUDA_CHECK(cudaGraphLaunch(exec, s));
      c.watch(fmt::format("graph replay {}", replay));
      c.synchronize();
      auto gv = g.download<uint16_t>();
      for (int p = 0; p < W; ++p)
        for (int i = 0; i < n; ++i)
          expect_true(core::bf16_to_float(gv[size_t(p * n + i)]) == float((replay * 7 + p * 3 + i) % 200),
                      "graph all_gather");
      auto zv = z.download<float>();
      for (int i = 0; i < n; ++i) {
        float want = 0;
        for (int p = 0; p < W; ++p) want += float((replay + 1) * (p + 1) + (me * n + i) % 31);
        expect_true(zv[size_t(i)] == want, "graph reduce_scatter");
      }
    }
    DSV4_CUDA_CHECK(cudaGraphExecDestroy(exec));
    DSV4_CUDA_CHECK(cudaGraphDestroy(graph));
  });
  for (int r = 0; r < W; ++r) EXPECT_FALSE(errors[size_t(r)]) << "rank " << r << ": " << exception_message(errors[size_t(r)]);
}

TEST(Nccl, DeadRankFailsFastWithClearError) {
  DSV4_REQUIRE_GPUS(2);
  const int kTimeoutMs = 2000;
  auto comms = make_group(2, kTimeoutMs);
  double waited_ms = 0;
  auto errors = run_rank_threads(raw(comms), [&](Communicator& base) {
    auto& c = static_cast<NcclCommunicator&>(base);
    DSV4_CUDA_CHECK(cudaSetDevice(c.device()));
    c.barrier();
    if (c.rank() == 1) return;  // stops issuing collectives
    DeviceTensor x(DType::kF32, {1024}), g(DType::kF32, {2048});
    auto t0 = Clock::now();
    try {
      c.all_gather(x.t, g.t);
      c.synchronize();
    } catch (...) {
      waited_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      throw;
    }
  });
  EXPECT_FALSE(errors[1]) << exception_message(errors[1]);
  ASSERT_TRUE(errors[0]) << "rank 0 did not fail";
  const std::string msg = exception_message(errors[0]);
  std::fprintf(stderr, "[rank 0 failed after %.0f ms: %s]\n", waited_ms, msg.c_str());
  EXPECT_TRUE(contains(msg, "rank 0: all_gather #2 (4096 bytes) timed out after 2000 ms")) << msg;
  EXPECT_TRUE(contains(msg, "waiting for rank 1 (its last call: barrier #1")) << msg;
  EXPECT_GE(waited_ms, kTimeoutMs * 0.9);
  EXPECT_LT(waited_ms, kTimeoutMs + 2000);
  // The idle rank's communicator failed with it: its next call throws at once.
  auto t0 = Clock::now();
  try {
    DSV4_CUDA_CHECK(cudaSetDevice(comms[1]->device()));
    comms[1]->barrier();
    FAIL() << "barrier on a failed communicator returned";
  } catch (const core::Error& e) {
    EXPECT_TRUE(contains(e.what(), "rank 1: barrier #2 (8 bytes): communicator has failed: rank 0: all_gather #2"))
        << e.what();
  }
  EXPECT_LT(Clock::now() - t0, milliseconds(500));
}

TEST(Nccl, ExceptionOnOneRankUnblocksTheOther) {
  DSV4_REQUIRE_GPUS(2);
  auto comms = make_group(2, 60000);
  auto t0 = Clock::now();
  auto errors = run_rank_threads(raw(comms), [&](Communicator& base) {
    auto& c = static_cast<NcclCommunicator&>(base);
    DSV4_CUDA_CHECK(cudaSetDevice(c.device()));
    c.barrier();
    if (c.rank() == 1) {
      std::this_thread::sleep_for(milliseconds(100));
      throw std::runtime_error("boom");
    }
    c.barrier();  // would wait for the 60 s timeout without the abort
  });
  EXPECT_LT(Clock::now() - t0, milliseconds(10000));
  EXPECT_EQ(exception_message(errors[1]), "boom");
  const std::string msg = exception_message(errors[0]);
  EXPECT_TRUE(contains(msg, "rank 0: barrier #2")) << msg;
  EXPECT_TRUE(contains(msg, "rank 1 failed: boom")) << msg;
}

TEST(Nccl, LedgerMismatchIsReportedOnBothRanks) {
  DSV4_REQUIRE_GPUS(2);
  auto comms = make_group(2, 30000, /*ledger=*/true);
  auto errors = run_rank_threads(raw(comms), [&](Communicator& base) {
    auto& c = static_cast<NcclCommunicator&>(base);
    DSV4_CUDA_CHECK(cudaSetDevice(c.device()));
    // Same bytes, different element count: NCCL moves it; the ledger catches it.
    DType dt = c.rank() == 0 ? DType::kF32 : DType::kBF16;
    int64_t n = c.rank() == 0 ? 4 : 8;
    DeviceTensor x(dt, {n}), g(dt, {2 * n});
    c.all_gather(x.t, g.t);
    c.check_ledger("step 7");
  });
  for (int r = 0; r < 2; ++r) {
    const std::string msg = exception_message(errors[size_t(r)]);
    EXPECT_TRUE(contains(msg, "collective ledger mismatch at 'step 7'")) << msg;
    EXPECT_TRUE(contains(msg, "all_gather #1 f32 x 4 (16 bytes)")) << msg;
    EXPECT_TRUE(contains(msg, "all_gather #1 bf16 x 8 (16 bytes)")) << msg;
  }
}

}  // namespace
}  // namespace dsv4::parallel
