// Cluster bootstrap: the single-node plan and the TCP rendezvous on 127.0.0.1 (nodes are
// threads here), including every failure it must report clearly instead of hanging.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "parallel/bootstrap.h"
#include "parallel/communicator.h"

namespace dsv4::parallel {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

// A port that was free a moment ago.
int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

UniqueIdBytes fake_id(uint8_t seed) {
  UniqueIdBytes id;
  for (size_t i = 0; i < id.size(); ++i) id[i] = uint8_t(seed + i * 7);
  return id;
}

struct NodeResult {
  ClusterPlan plan;
  std::exception_ptr error;
};

// Runs one bootstrap_cluster per spec, each on its own thread (optionally delayed).
std::vector<NodeResult> run_nodes(const std::vector<ClusterSpec>& specs, std::vector<int> timeout_ms,
                                  const std::vector<int>& delay_ms = {}, std::atomic<int>* ids_made = nullptr) {
  timeout_ms.resize(specs.size(), timeout_ms.back());
  std::vector<NodeResult> out(specs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < specs.size(); ++i) {
    threads.emplace_back([&, i] {
      if (i < delay_ms.size()) std::this_thread::sleep_for(milliseconds(delay_ms[i]));
      try {
        out[i].plan = bootstrap_cluster(specs[i], [&] {
          if (ids_made) ++*ids_made;
          return fake_id(42);
        }, milliseconds(timeout_ms[i]));
      } catch (...) {
        out[i].error = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  return out;
}

ClusterSpec node(int nnodes, int node_rank, int gpus, int port) {
  ClusterSpec s;
  s.nnodes = nnodes;
  s.node_rank = node_rank;
  s.gpus_per_node = gpus;
  s.master_addr = "127.0.0.1";
  s.master_port = port;
  return s;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST(Bootstrap, SingleNodeNeedsNoNetwork) {
  int made = 0;
  ClusterSpec spec;
  spec.gpus_per_node = 4;
  spec.master_port = 0;  // unused on one node
  ClusterPlan plan = bootstrap_cluster(spec, [&] {
    ++made;
    return fake_id(1);
  });
  EXPECT_EQ(made, 1);
  EXPECT_EQ(plan.world_size, 4);
  ASSERT_EQ(plan.local.size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(plan.local[size_t(i)].rank, i);
    EXPECT_EQ(plan.local[size_t(i)].device, i);
  }
  EXPECT_EQ(plan.unique_id, fake_id(1));
  EXPECT_EQ(describe(spec, plan), "node 0 of 1 (4 GPUs, ranks 0..3 of 4)");
}

TEST(Bootstrap, TcpRendezvousAssignsRankOffsetsInNodeOrder) {
  const int port = free_port();
  std::atomic<int> made{0};
  // Nodes join out of order and with different GPU counts.
  auto res = run_nodes({node(3, 0, 2, port), node(3, 2, 3, port), node(3, 1, 1, port)}, {10000},
                       {0, 0, 50}, &made);
  for (const auto& r : res) ASSERT_FALSE(r.error) << exception_message(r.error);
  EXPECT_EQ(made.load(), 1);  // only node 0 makes the id
  const int offsets[] = {0, 3, 2};
  const int gpus[] = {2, 3, 1};
  for (size_t i = 0; i < res.size(); ++i) {
    EXPECT_EQ(res[i].plan.world_size, 6);
    EXPECT_EQ(res[i].plan.rank_offset, offsets[i]);
    EXPECT_EQ(res[i].plan.unique_id, fake_id(42));
    ASSERT_EQ(int(res[i].plan.local.size()), gpus[i]);
    for (int g = 0; g < gpus[i]; ++g) {
      EXPECT_EQ(res[i].plan.local[size_t(g)].rank, offsets[i] + g);
      EXPECT_EQ(res[i].plan.local[size_t(g)].device, g);
    }
  }
}

TEST(Bootstrap, WorkerMayStartBeforeMaster) {
  const int port = free_port();
  auto res = run_nodes({node(2, 1, 1, port), node(2, 0, 1, port)}, {10000}, {0, 300});
  for (const auto& r : res) ASSERT_FALSE(r.error) << exception_message(r.error);
  EXPECT_EQ(res[0].plan.rank_offset, 1);
  EXPECT_EQ(res[1].plan.rank_offset, 0);
}

TEST(Bootstrap, DuplicateNodeRankFailsEveryNode) {
  const int port = free_port();
  auto res = run_nodes({node(3, 0, 1, port), node(3, 1, 1, port), node(3, 1, 1, port)}, {10000},
                       {0, 0, 100});
  for (size_t i = 0; i < res.size(); ++i) {
    ASSERT_TRUE(res[i].error) << "node " << i << " succeeded";
    std::string msg = exception_message(res[i].error);
    EXPECT_TRUE(contains(msg, "duplicate node rank 1")) << msg;
  }
}

TEST(Bootstrap, WrongNodeCountFailsBothSides) {
  const int port = free_port();
  auto res = run_nodes({node(2, 0, 1, port), node(3, 1, 1, port)}, {10000});
  for (size_t i = 0; i < res.size(); ++i) {
    ASSERT_TRUE(res[i].error) << "node " << i << " succeeded";
    std::string msg = exception_message(res[i].error);
    EXPECT_TRUE(contains(msg, "wrong node count: node 1 at 127.0.0.1:")) << msg;
    EXPECT_TRUE(contains(msg, "--nnodes 3, node 0 with --nnodes 2")) << msg;
  }
}

TEST(Bootstrap, CannotConnectTimesOutClearly) {
  const int port = free_port();
  auto t0 = Clock::now();
  auto res = run_nodes({node(2, 1, 1, port)}, {300});
  EXPECT_LT(Clock::now() - t0, milliseconds(2500));
  ASSERT_TRUE(res[0].error);
  std::string msg = exception_message(res[0].error);
  EXPECT_TRUE(contains(msg, fmt::format("node 1: cannot connect to master 127.0.0.1:{} within 300 ms", port))) << msg;
}

TEST(Bootstrap, MasterTimeoutNamesMissingNodes) {
  const int port = free_port();
  auto t0 = Clock::now();
  auto res = run_nodes({node(4, 0, 1, port), node(4, 2, 1, port)}, {500, 5000});
  EXPECT_LT(Clock::now() - t0, milliseconds(3000));
  ASSERT_TRUE(res[0].error);
  std::string msg = exception_message(res[0].error);
  EXPECT_TRUE(contains(msg, "timed out after 500 ms waiting for node(s) 1, 3 of 4 to connect (joined: 0, 2)")) << msg;
  // The node that did join hears why instead of waiting for its own timeout.
  ASSERT_TRUE(res[1].error);
  EXPECT_TRUE(contains(exception_message(res[1].error), "waiting for node(s) 1, 3")) << exception_message(res[1].error);
}

TEST(Bootstrap, RejectsBadSpecs) {
  auto id = [] { return fake_id(0); };
  EXPECT_THROW(bootstrap_cluster(node(2, 2, 1, 1234), id), core::Error);
  EXPECT_THROW(bootstrap_cluster(node(0, 0, 1, 1234), id), core::Error);
  EXPECT_THROW(bootstrap_cluster(node(1, 0, 0, 1234), id), core::Error);
  EXPECT_THROW(bootstrap_cluster(node(2, 1, 1, 70000), id), core::Error);
}

}  // namespace
}  // namespace dsv4::parallel
