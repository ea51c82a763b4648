// In-process communicator: every collective for 1..4 ranks (0 bytes and uneven
// all_to_all included), the fixed reduction order, fail-fast on dead ranks, mismatches and
// aborts, the collective ledger, and a fuzz of random per-rank programs that must never hang.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/inprocess_communicator.h"
#include "test_seed.h"

namespace dsv4::parallel {
namespace {

using core::DType;
using core::Tensor;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

using dsv4::testing::test_seed;

CommOptions opts(int timeout_ms = 10000, bool ledger = false) {
  CommOptions o;
  o.timeout = milliseconds(timeout_ms);
  o.ledger = ledger;
  return o;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Random, never-zero f32 values (1 + a fraction) tagged by rank.
std::vector<float> values(uint64_t seed, int n) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(0.5f, 2.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng) * ((rng() & 1) ? 1.f : -1.f);
  return v;
}

Tensor f32(const std::vector<float>& v) {
  Tensor t = Tensor::empty_cpu(DType::kF32, {int64_t(v.size())});
  if (!v.empty()) std::memcpy(t.data(), v.data(), v.size() * 4);
  return t;
}

Tensor poisoned(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t = Tensor::empty_cpu(dtype, shape);
  std::memset(t.data(), 0xAB, t.nbytes());
  return t;
}

TEST(Comm, AllGatherEveryWorldSize) {
  const uint64_t seed = test_seed();
  for (int world : {1, 2, 3, 4}) {
    for (int n : {0, 1, 5}) {
      auto comms = make_inprocess_group(world, opts());
      std::vector<Tensor> recv(static_cast<size_t>(world));
      run_rank_threads_or_throw(comms, [&](Communicator& c) {
        Tensor send = f32(values(seed + uint64_t(c.rank()), n));
        recv[size_t(c.rank())] = poisoned(DType::kF32, {int64_t(world) * n});
        c.all_gather(send, recv[size_t(c.rank())]);
      });
      for (int r = 0; r < world; ++r)
        for (int p = 0; p < world; ++p) {
          auto expect = values(seed + uint64_t(p), n);
          for (int i = 0; i < n; ++i)
            ASSERT_EQ(recv[size_t(r)].as<float>()[p * n + i], expect[size_t(i)]) << world << " ranks, rank " << r;
        }
    }
  }
}

TEST(Comm, AllGatherInPlace) {
  const int world = 3, n = 4;
  auto comms = make_inprocess_group(world, opts());
  std::vector<Tensor> buf(world);
  run_rank_threads_or_throw(comms, [&](Communicator& c) {
    Tensor& b = buf[size_t(c.rank())];
    b = poisoned(DType::kF32, {world * n});
    for (int i = 0; i < n; ++i) b.as<float>()[c.rank() * n + i] = float(100 * c.rank() + i + 1);
    c.all_gather(b.rows(c.rank() * n, n), b);
  });
  for (int r = 0; r < world; ++r)
    for (int p = 0; p < world; ++p)
      for (int i = 0; i < n; ++i) EXPECT_EQ(buf[size_t(r)].as<float>()[p * n + i], float(100 * p + i + 1));
}

// Sum in rank order 0..world-1 with an f32 accumulator, one final rounding.
float rank_order(const std::vector<std::vector<float>>& in, size_t at, bool sum, bool bf16) {
  float acc = bf16 ? core::round_bf16(in[0][at]) : in[0][at];
  for (size_t r = 1; r < in.size(); ++r) {
    float v = bf16 ? core::round_bf16(in[r][at]) : in[r][at];
    acc = sum ? acc + v : std::max(acc, v);
  }
  return bf16 ? core::round_bf16(acc) : acc;
}

TEST(Comm, ReduceScatterSumAndMaxInFixedRankOrder) {
  const uint64_t seed = test_seed();
  for (int world : {1, 2, 3, 4}) {
    for (DType dt : {DType::kF32, DType::kBF16}) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
        const int n = 7;
        std::vector<std::vector<float>> in(static_cast<size_t>(world));
        for (int r = 0; r < world; ++r) {
          in[size_t(r)] = values(seed * 31 + uint64_t(r), world * n);
          // Order-sensitive in f32: (1e8 + x) - 1e8 != x. Element 0 of every block.
          for (int b = 0; b < world; ++b) in[size_t(r)][size_t(b * n)] = r == 0 ? 1e8f : (r == 1 ? 3.0f : -1e8f);
        }
        auto run_once = [&] {
          auto comms = make_inprocess_group(world, opts());
          std::vector<Tensor> out(static_cast<size_t>(world));
          run_rank_threads_or_throw(comms, [&](Communicator& c) {
            const auto& v = in[size_t(c.rank())];
            Tensor send = Tensor::empty_cpu(dt, {int64_t(world) * n});
            for (size_t i = 0; i < v.size(); ++i) {
              if (dt == DType::kF32) send.as<float>()[i] = v[i];
              else send.as<uint16_t>()[i] = core::float_to_bf16(v[i]);
            }
            out[size_t(c.rank())] = poisoned(dt, {n});
            c.reduce_scatter(send, out[size_t(c.rank())], op);
          });
          return out;
        };
        auto a = run_once(), b = run_once();
        for (int r = 0; r < world; ++r) {
          ASSERT_EQ(std::memcmp(a[size_t(r)].data(), b[size_t(r)].data(), a[size_t(r)].nbytes()), 0)
              << "not deterministic";
          for (int i = 0; i < n; ++i) {
            float got = dt == DType::kF32 ? a[size_t(r)].as<float>()[i]
                                          : core::bf16_to_float(a[size_t(r)].as<uint16_t>()[i]);
            float want = rank_order(in, size_t(r * n + i), op == ReduceOp::kSum, dt == DType::kBF16);
            ASSERT_EQ(got, want) << world << " ranks " << core::dtype_name(dt) << " " << reduce_op_name(op)
                                 << " rank " << r << " element " << i;
          }
        }
      }
    }
  }
}

// Row (src -> dst, i) carries the bytes of tag(src, dst, i).
uint32_t tag(int src, int dst, int64_t i) { return uint32_t(src * 1000000 + dst * 10000 + int(i) + 1); }

TEST(Comm, AllToAllUnevenCountsWithEmptyPeers) {
  std::mt19937_64 rng(test_seed() + 7);
  const int64_t row_bytes = 12;  // three u32 per row
  for (int world : {1, 2, 3, 4}) {
    for (int trial = 0; trial < 6; ++trial) {
      // counts[src][dst]; about a third of the pairs move nothing.
      std::vector<std::vector<int64_t>> counts(static_cast<size_t>(world), std::vector<int64_t>(size_t(world)));
      for (auto& row : counts)
        for (auto& c : row) c = (rng() % 3 == 0) ? 0 : int64_t(rng() % 5);
      if (trial == 0)
        for (auto& row : counts) std::fill(row.begin(), row.end(), 0);  // all empty
      auto comms = make_inprocess_group(world, opts());
      std::vector<Tensor> recv(static_cast<size_t>(world));
      run_rank_threads_or_throw(comms, [&](Communicator& c) {
        const int me = c.rank();
        std::vector<int64_t> send_rows(static_cast<size_t>(world)), recv_rows(static_cast<size_t>(world));
        int64_t total_send = 0, total_recv = 0;
        for (int p = 0; p < world; ++p) {
          send_rows[size_t(p)] = counts[size_t(me)][size_t(p)];
          recv_rows[size_t(p)] = counts[size_t(p)][size_t(me)];
          total_send += send_rows[size_t(p)];
          total_recv += recv_rows[size_t(p)];
        }
        Tensor send = Tensor::empty_cpu(DType::kU8, {total_send + 2, row_bytes});  // capacity > need
        int64_t at = 0;
        for (int p = 0; p < world; ++p)
          for (int64_t i = 0; i < send_rows[size_t(p)]; ++i, ++at)
            for (int k = 0; k < 3; ++k) {
              uint32_t t = tag(me, p, i) + uint32_t(k);
              std::memcpy(send.as<char>() + at * row_bytes + k * 4, &t, 4);
            }
        recv[size_t(me)] = poisoned(DType::kU8, {total_recv + 1, row_bytes});
        c.all_to_all(send, send_rows, recv[size_t(me)], recv_rows, row_bytes);
      });
      for (int dst = 0; dst < world; ++dst) {
        int64_t at = 0;
        for (int src = 0; src < world; ++src)
          for (int64_t i = 0; i < counts[size_t(src)][size_t(dst)]; ++i, ++at)
            for (int k = 0; k < 3; ++k) {
              uint32_t got;
              std::memcpy(&got, recv[size_t(dst)].as<char>() + at * row_bytes + k * 4, 4);
              ASSERT_EQ(got, tag(src, dst, i) + uint32_t(k)) << world << " ranks, " << src << " -> " << dst;
            }
        // The spare capacity row stays untouched.
        EXPECT_EQ(uint8_t(recv[size_t(dst)].as<char>()[at * row_bytes]), 0xAB);
      }
    }
  }
}

TEST(Comm, AllToAllEqualCounts) {
  for (int world : {1, 2, 3, 4}) {
    for (int64_t rows : {0, 1, 3}) {
      const int64_t row_bytes = 8;
      auto comms = make_inprocess_group(world, opts());
      std::vector<Tensor> recv(static_cast<size_t>(world));
      run_rank_threads_or_throw(comms, [&](Communicator& c) {
        Tensor send = Tensor::empty_cpu(DType::kU8, {world * rows, row_bytes});
        for (int p = 0; p < world; ++p)
          for (int64_t i = 0; i < rows; ++i) {
            uint64_t t = tag(c.rank(), p, i);
            std::memcpy(send.as<char>() + (p * rows + i) * row_bytes, &t, 8);
          }
        recv[size_t(c.rank())] = poisoned(DType::kU8, {world * rows, row_bytes});
        c.all_to_all_equal(send, recv[size_t(c.rank())], rows, row_bytes);
      });
      for (int dst = 0; dst < world; ++dst)
        for (int src = 0; src < world; ++src)
          for (int64_t i = 0; i < rows; ++i) {
            uint64_t got;
            std::memcpy(&got, recv[size_t(dst)].as<char>() + (src * rows + i) * row_bytes, 8);
            ASSERT_EQ(got, tag(src, dst, i));
          }
    }
  }
}

TEST(Comm, HostCollectivesEveryWorldSize) {
  for (int world : {1, 2, 3, 4}) {
    auto comms = make_inprocess_group(world, opts());
    run_rank_threads_or_throw(comms, [&](Communicator& c) {
      const int me = c.rank();
      struct Row {
        int32_t rank, tokens;
      } mine{me, 10 * me + 3};
      std::vector<Row> table(static_cast<size_t>(world), Row{-1, -1});
      c.all_gather_host(&mine, sizeof(mine), table.data());
      for (int p = 0; p < world; ++p) {
        if (table[size_t(p)].rank != p || table[size_t(p)].tokens != 10 * p + 3)
          throw std::runtime_error("all_gather_host table wrong");
      }
      int64_t v[3] = {me + 1, -me, me == world - 1 ? 100 : 0};
      c.all_reduce_host(v, 3, ReduceOp::kSum);
      if (v[0] != int64_t(world) * (world + 1) / 2 || v[1] != -int64_t(world) * (world - 1) / 2 || v[2] != 100)
        throw std::runtime_error("all_reduce_host sum wrong");
      int64_t m[2] = {me, -me};
      c.all_reduce_host(m, 2, ReduceOp::kMax);
      if (m[0] != world - 1 || m[1] != 0) throw std::runtime_error("all_reduce_host max wrong");
      c.barrier();
    });
  }
}

TEST(Comm, EveryCallAcceptsZeroBytes) {
  for (int world : {1, 2, 4}) {
    auto comms = make_inprocess_group(world, opts(10000, true));
    run_rank_threads_or_throw(comms, [&](Communicator& c) {
      Tensor empty(nullptr, DType::kBF16, {0, 64});
      Tensor empty_recv(nullptr, DType::kBF16, {0, 64});
      c.all_gather(empty, empty_recv);
      c.reduce_scatter(empty, empty_recv, ReduceOp::kSum);
      std::vector<int64_t> zeros(static_cast<size_t>(world), 0);
      c.all_to_all(empty, zeros, empty_recv, zeros, 128);
      c.all_to_all_equal(empty, empty_recv, 0, 128);
      c.all_gather_host(nullptr, 0, nullptr);
      c.all_reduce_host(nullptr, 0, ReduceOp::kMax);
      c.check_ledger("zero-byte calls");
      if (c.calls_issued() < 6) throw std::runtime_error("calls not counted");
    });
  }
}

TEST(Comm, RejectsBadArgumentsLocally) {
  auto comms = make_inprocess_group(1, opts());
  Communicator& c = *comms[0];
  Tensor a = Tensor::empty_cpu(DType::kF32, {4});
  Tensor b = Tensor::empty_cpu(DType::kF32, {5});
  EXPECT_THROW(c.all_gather(a, b), core::Error);
  Tensor i = Tensor::empty_cpu(DType::kI32, {4});
  EXPECT_THROW(c.reduce_scatter(i, i, ReduceOp::kSum), core::Error);
  EXPECT_THROW(c.all_to_all(a, {2}, a, {2}, 16), core::Error);  // 32 bytes > 16
  EXPECT_THROW(c.all_to_all(a, {1, 1}, a, {1}, 4), core::Error);
  Tensor dev(reinterpret_cast<void*>(64), DType::kF32, {4}, core::Device::kCuda);
  try {
    c.all_gather(dev, dev);
    FAIL() << "device tensor accepted";
  } catch (const core::Error& e) {
    EXPECT_TRUE(contains(e.what(), "needs host memory")) << e.what();
  }
  c.barrier();  // still healthy: bad arguments are rejected before the rendezvous
}

TEST(Comm, MismatchedCallsFailAtOnceNamingEveryRank) {
  struct Case {
    const char* name;
    std::function<void(Communicator&)> body;
    std::vector<std::string> expect;
  };
  std::vector<Case> cases = {
      {"byte count",
       [](Communicator& c) {
         Tensor s = Tensor::empty_cpu(DType::kF32, {c.rank() == 1 ? 8 : 4});
         Tensor r = Tensor::empty_cpu(DType::kF32, {2 * s.numel()});
         c.all_gather(s, r);
       },
       {"rank 0 issued all_gather #1 (16 bytes)", "rank 1 issued all_gather #1 (32 bytes)"}},
      {"op",
       [](Communicator& c) {
         if (c.rank() == 0) c.barrier();
         else c.all_reduce_host(nullptr, 0, ReduceOp::kSum);
       },
       {"collective mismatch", "rank 0 issued barrier #1", "rank 1 issued all_reduce_host #1"}},
      {"all_to_all counts",
       [](Communicator& c) {
         Tensor s = Tensor::empty_cpu(DType::kU8, {64});
         // Consistent except rank 0 expecting 3 rows from rank 1, which sends 2.
         std::vector<int64_t> send = c.rank() == 0 ? std::vector<int64_t>{1, 2} : std::vector<int64_t>{2, 1};
         std::vector<int64_t> recv = c.rank() == 0 ? std::vector<int64_t>{1, 3} : std::vector<int64_t>{2, 1};
         c.all_to_all(s, send, s, recv, 4);
       },
       {"rank 1 sends 2 rows x 4 bytes to rank 0, but rank 0 expects 3 rows"}},
  };
  for (const Case& k : cases) {
    auto comms = make_inprocess_group(2, opts(10000));
    auto t0 = Clock::now();
    auto errors = run_rank_threads(comms, k.body);
    EXPECT_LT(Clock::now() - t0, milliseconds(2000)) << k.name << ": waited for the timeout";
    for (int r = 0; r < 2; ++r) {
      ASSERT_TRUE(errors[size_t(r)]) << k.name << ": rank " << r << " did not fail";
      std::string msg = exception_message(errors[size_t(r)]);
      for (const auto& part : k.expect) EXPECT_TRUE(contains(msg, part)) << k.name << ": " << msg;
    }
  }
}

TEST(Comm, DeadRankMakesOthersFailFast) {
  const int kTimeoutMs = 300;
  auto comms = make_inprocess_group(3, opts(kTimeoutMs));
  std::vector<double> waited_ms(3, 0);
  auto errors = run_rank_threads(comms, [&](Communicator& c) {
    c.barrier();
    if (c.rank() == 1) return;  // stops participating
    Tensor s = Tensor::empty_cpu(DType::kF32, {1024});
    Tensor r = Tensor::empty_cpu(DType::kF32, {3 * 1024});
    auto t0 = Clock::now();
    try {
      c.all_gather(s, r);
    } catch (...) {
      waited_ms[size_t(c.rank())] = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      throw;
    }
  });
  EXPECT_FALSE(errors[1]);
  for (int r : {0, 2}) {
    ASSERT_TRUE(errors[size_t(r)]) << "rank " << r << " returned";
    std::string msg = exception_message(errors[size_t(r)]);
    EXPECT_TRUE(contains(msg, "all_gather #2 (4096 bytes)")) << msg;
    EXPECT_TRUE(contains(msg, "timed out after 300 ms waiting for rank 1 (its last call: barrier #1")) << msg;
    EXPECT_GE(waited_ms[size_t(r)], kTimeoutMs * 0.5) << msg;  // one timed out, the other was woken
    EXPECT_LT(waited_ms[size_t(r)], kTimeoutMs + 1000) << msg;
  }
  // The dead rank's later calls throw the same reason at once.
  auto t0 = Clock::now();
  try {
    comms[1]->barrier();
    FAIL() << "barrier on a failed group returned";
  } catch (const core::Error& e) {
    EXPECT_TRUE(contains(e.what(), "rank 1: barrier #2")) << e.what();
    EXPECT_TRUE(contains(e.what(), "waiting for rank 1")) << e.what();
  }
  EXPECT_LT(Clock::now() - t0, milliseconds(100));
  EXPECT_FALSE(comms[0]->failure().empty());
}

TEST(Comm, ExceptionOnOneRankAbortsTheOthers) {
  auto comms = make_inprocess_group(4, opts(30000));
  auto t0 = Clock::now();
  auto errors = run_rank_threads(comms, [&](Communicator& c) {
    c.barrier();
    if (c.rank() == 2) throw std::runtime_error("boom");
    c.barrier();
  });
  EXPECT_LT(Clock::now() - t0, milliseconds(2000)) << "peers waited for the timeout";
  EXPECT_EQ(exception_message(errors[2]), "boom");
  for (int r : {0, 1, 3}) {
    std::string msg = exception_message(errors[size_t(r)]);
    EXPECT_TRUE(contains(msg, fmt::format("rank {}: barrier #2", r))) << msg;
    EXPECT_TRUE(contains(msg, "rank 2 failed: boom")) << msg;
  }
  // The helper rethrows the root cause, not a consequence.
  auto again = make_inprocess_group(3, opts(30000));
  try {
    run_rank_threads_or_throw(again, [](Communicator& c) {
      if (c.rank() == 1) throw std::runtime_error("root cause");
      c.barrier();
    });
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "root cause");
  }
}

TEST(Comm, AbortFromAnotherThreadWakesWaiters) {
  auto comms = make_inprocess_group(3, opts(30000));
  std::atomic<int> entered{0};
  std::thread stopper([&] {
    while (entered.load() < 2) std::this_thread::sleep_for(milliseconds(1));
    std::this_thread::sleep_for(milliseconds(20));
    comms[2]->abort("operator requested shutdown");
  });
  auto t0 = Clock::now();
  auto errors = run_rank_threads(comms, [&](Communicator& c) {
    if (c.rank() == 2) return;  // never arrives
    ++entered;
    c.barrier();
  });
  stopper.join();
  EXPECT_LT(Clock::now() - t0, milliseconds(2000));
  for (int r : {0, 1}) EXPECT_TRUE(contains(exception_message(errors[size_t(r)]), "operator requested shutdown"));
  EXPECT_EQ(comms[0]->failure(), "operator requested shutdown");
}

TEST(Comm, LedgerMismatchListsEveryRanksEntries) {
  auto comms = make_inprocess_group(2, opts(10000, true));
  auto errors = run_rank_threads(comms, [&](Communicator& c) {
    // Step 1 agrees everywhere and clears the ledger.
    Tensor a = Tensor::empty_cpu(DType::kF32, {4});
    Tensor ar = Tensor::empty_cpu(DType::kF32, {8});
    c.all_gather(a, ar);
    c.barrier();
    c.check_ledger("step 1");
    if (!c.ledger_entries().empty()) throw std::runtime_error("ledger not cleared");
    // Step 2: rank 1 issues a different count (same bytes, so the transport moves it, as
    // NCCL would, and the rows silently misalign: exactly what the ledger is for).
    Tensor s = c.rank() == 1 ? Tensor::empty_cpu(DType::kBF16, {8}) : Tensor::empty_cpu(DType::kF32, {4});
    Tensor r = c.rank() == 1 ? Tensor::empty_cpu(DType::kBF16, {16}) : Tensor::empty_cpu(DType::kF32, {8});
    c.all_gather(s, r);
    c.check_ledger("step 2");
  });
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(errors[size_t(r)]) << "rank " << r << " passed the ledger check";
    std::string msg = exception_message(errors[size_t(r)]);
    EXPECT_TRUE(contains(msg, fmt::format("rank {}: collective ledger mismatch at 'step 2'", r))) << msg;
    EXPECT_TRUE(contains(msg, "all_gather #4 f32 x 4 (16 bytes)")) << msg;
    EXPECT_TRUE(contains(msg, "all_gather #4 bf16 x 8 (16 bytes)")) << msg;
    EXPECT_TRUE(contains(msg, "rank 0 (1 entries")) << msg;
    EXPECT_TRUE(contains(msg, "rank 1 (1 entries")) << msg;
    EXPECT_TRUE(contains(msg, "first difference at entry 1")) << msg;
  }
  // The group is failed afterwards.
  EXPECT_THROW(comms[0]->barrier(), core::Error);
}

TEST(Comm, LedgerAcceptsUnevenAllToAll) {
  auto comms = make_inprocess_group(3, opts(10000, true));
  run_rank_threads_or_throw(comms, [&](Communicator& c) {
    std::vector<int64_t> send(3), recv(3);
    for (int p = 0; p < 3; ++p) {
      send[size_t(p)] = (c.rank() + p) % 3;  // rank r sends (r+p)%3 rows to p
      recv[size_t(p)] = (p + c.rank()) % 3;
    }
    Tensor s = Tensor::empty_cpu(DType::kBF16, {8, 4});
    Tensor r = Tensor::empty_cpu(DType::kBF16, {8, 4});
    c.all_to_all(s, send, r, recv, 8);
    c.check_ledger("uneven step");
  });
}

// Random per-rank programs of collectives: identical programs must complete with correct
// results; perturbed ones must fail on some rank, and nothing may hang.
TEST(Comm, FuzzRandomProgramsNeverHang) {
  std::mt19937_64 rng(test_seed() + 99);
  const int kTimeoutMs = 100;
  struct Op {
    int kind;  // 0 all_gather_host, 1 all_reduce_host, 2 barrier, 3 all_gather, 4 all_to_all
    int size;
    ReduceOp reduce;
  };
  int completed = 0, failed = 0;
  for (int iter = 0; iter < 40; ++iter) {
    const int world = 1 + int(rng() % 4);
    std::vector<Op> base;
    const int len = 1 + int(rng() % 6);
    for (int i = 0; i < len; ++i)
      base.push_back(Op{int(rng() % 5), int(rng() % 4), (rng() & 1) ? ReduceOp::kSum : ReduceOp::kMax});
    std::vector<std::vector<Op>> program(static_cast<size_t>(world), base);
    const int perturb = world > 1 ? int(rng() % 5) : 0;  // 0 none, 1 size, 2 kind, 3 drop tail, 4 extra call
    const int victim = int(rng() % uint64_t(world));
    const size_t at = size_t(rng() % uint64_t(len));
    auto& vp = program[size_t(victim)];
    if (perturb == 1) vp[at].size += 1;
    if (perturb == 2) vp[at].kind = (vp[at].kind + 1) % 5;
    if (perturb == 3) vp.resize(at);
    if (perturb == 4) vp.push_back(Op{2, 0, ReduceOp::kSum});

    auto comms = make_inprocess_group(world, opts(kTimeoutMs));
    std::atomic<int> wrong{0};
    auto t0 = Clock::now();
    auto errors = run_rank_threads(comms, [&](Communicator& c) {
      const int me = c.rank();
      for (const Op& op : program[size_t(me)]) {
        if (op.kind == 0) {
          std::vector<int16_t> mine(static_cast<size_t>(op.size), int16_t(me * 7 + 1)), all(static_cast<size_t>(op.size * world), -1);
          c.all_gather_host(mine.data(), mine.size() * 2, all.data());
          for (int p = 0; p < world; ++p)
            for (int i = 0; i < op.size; ++i)
              if (all[size_t(p * op.size + i)] != int16_t(p * 7 + 1)) ++wrong;
        } else if (op.kind == 1) {
          std::vector<int64_t> v(static_cast<size_t>(op.size), me + 1);
          c.all_reduce_host(v.data(), op.size, op.reduce);
          for (int64_t x : v)
            if (x != (op.reduce == ReduceOp::kSum ? int64_t(world) * (world + 1) / 2 : world)) ++wrong;
        } else if (op.kind == 2) {
          c.barrier();
        } else if (op.kind == 3) {
          Tensor s = Tensor::zeros_cpu(DType::kF32, {op.size});
          Tensor r = Tensor::zeros_cpu(DType::kF32, {int64_t(world) * op.size});
          for (int i = 0; i < op.size; ++i) s.as<float>()[i] = float(me);
          c.all_gather(s, r);
          for (int p = 0; p < world; ++p)
            for (int i = 0; i < op.size; ++i)
              if (r.as<float>()[p * op.size + i] != float(p)) ++wrong;
        } else {
          std::vector<int64_t> rows(static_cast<size_t>(world), op.size);
          Tensor s = Tensor::zeros_cpu(DType::kU8, {int64_t(world) * op.size, 4});
          Tensor r = Tensor::zeros_cpu(DType::kU8, {int64_t(world) * op.size, 4});
          c.all_to_all(s, rows, r, rows, 4);
        }
      }
    });
    const auto took = Clock::now() - t0;
    ASSERT_LT(took, milliseconds(kTimeoutMs + 5000)) << "iteration " << iter << " took too long";
    int n_err = 0;
    for (const auto& e : errors)
      if (e) {
        ++n_err;
        try {
          std::rethrow_exception(e);
        } catch (const core::Error&) {
        } catch (...) {
          ADD_FAILURE() << "iteration " << iter << ": not a core::Error: " << exception_message(e);
        }
      }
    bool identical = std::all_of(program.begin(), program.end(), [&](const auto& p) {
      return p.size() == base.size() && std::equal(p.begin(), p.end(), base.begin(), [](const Op& a, const Op& b) {
               return a.kind == b.kind && a.size == b.size && a.reduce == b.reduce;
             });
    });
    if (identical) {
      EXPECT_EQ(n_err, 0) << "iteration " << iter << ": " << exception_message(errors[0]);
      EXPECT_EQ(wrong.load(), 0) << "iteration " << iter;
      ++completed;
    } else {
      ++failed;
      // A perturbation may be benign (a size change on a 0-op, a reduce op on a barrier...);
      // what matters is that it never hangs. Real divergence must fail some rank.
      bool diverged = false;
      for (int r = 0; r < world && !diverged; ++r) {
        const auto& p = program[size_t(r)];
        if (p.size() != base.size()) diverged = true;
        for (size_t i = 0; i < std::min(p.size(), base.size()) && !diverged; ++i) {
          const Op &a = p[i], &b = base[i];
          if (a.kind != b.kind) diverged = true;
          else if (a.kind == 0 || a.kind == 3 || a.kind == 4) diverged = a.size != b.size;
          else if (a.kind == 1) diverged = a.size != b.size || a.reduce != b.reduce;
        }
      }
      if (diverged) {
        EXPECT_GT(n_err, 0) << "iteration " << iter << ": divergent programs all succeeded";
      }
    }
  }
  std::fprintf(stderr, "[fuzz: %d identical programs completed, %d perturbed programs]\n", completed, failed);
}

}  // namespace
}  // namespace dsv4::parallel
