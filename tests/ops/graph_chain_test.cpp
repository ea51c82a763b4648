// The fork edge that continues a captured graph's longest chain (ops/cuda/graph_chain.h),
// on the CPU: a layer-shaped graph, ties, and random DAGs against a brute-force longest
// path.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <random>
#include <utility>
#include <vector>

#include "ops/cuda/graph_chain.h"
#include "test_seed.h"

namespace dsv4::ops {
namespace {

struct Graph {
  explicit Graph(int64_t n) : nodes(n) {}
  int64_t nodes;
  std::vector<int64_t> from, to;
  void edge(int64_t a, int64_t b) {
    from.push_back(a);
    to.push_back(b);
  }
};

// The chosen edges as (from, to) pairs.
std::vector<std::pair<int64_t, int64_t>> chosen(const Graph& g, const std::vector<int64_t>& weights = {}) {
  const std::vector<bool> chain = fork_chain_edges(g.nodes, g.from, g.to, weights);
  std::vector<std::pair<int64_t, int64_t>> r;
  for (size_t i = 0; i < chain.size(); ++i)
    if (chain[i]) r.emplace_back(g.from[i], g.to[i]);
  return r;
}

using Pairs = std::vector<std::pair<int64_t, int64_t>>;

TEST(GraphChain, ChainsWithoutForksChooseNothing) {
  Graph g(4);
  g.edge(0, 1);
  g.edge(1, 2);
  g.edge(2, 3);
  EXPECT_EQ(chosen(g), Pairs{});
  EXPECT_EQ(chosen(Graph(3)), Pairs{});  // no edges at all
}

// A layer's shape: the FFN mix (0) forks to the router (1, main lane: select 2, prep 3,
// gate/up 4, SwiGLU 5, down 6) and to the shared expert's lane (7 Sinkhorn, 8 GEMM, 9
// GEMM); both join at the next layer's mix (10), which forks to the q path (11 norm, 12
// wq_b, 13 attention, 14 combine) and the kv lane (15 norm, 16 rope), joined at wo_a (17,
// then wo_b 19); the combine also forks to window_commit (18, a sink).
TEST(GraphChain, LayerShapedGraphChoosesTheMainLane) {
  Graph g(20);
  for (int64_t v : {0, 1, 2, 3, 4, 5}) g.edge(v, v + 1);
  g.edge(6, 10);
  g.edge(0, 7);
  g.edge(7, 8);
  g.edge(8, 9);
  g.edge(9, 10);
  g.edge(10, 11);
  g.edge(11, 12);
  g.edge(12, 13);
  g.edge(13, 14);
  g.edge(14, 17);
  g.edge(10, 15);
  g.edge(15, 16);
  g.edge(16, 17);
  g.edge(14, 18);
  g.edge(17, 19);
  EXPECT_EQ(chosen(g), (Pairs{{0, 1}, {10, 11}, {14, 17}}));
}

TEST(GraphChain, TiedChildrenChooseNothing) {
  Graph g(6);
  g.edge(0, 1);  // two branches of two nodes each into 5
  g.edge(1, 2);
  g.edge(2, 5);
  g.edge(0, 3);
  g.edge(3, 4);
  g.edge(4, 5);
  EXPECT_EQ(chosen(g), Pairs{});
  g.edge(0, 5);  // a shorter third branch: still tied at the top
  EXPECT_EQ(chosen(g), Pairs{});
}

// A SWA layer at batch 1 after wq_a + wkv (0): the q path (1 rms_norm_quant, 2 wq_b of 256
// blocks, 3 q_norm_rope of 8) and the kv lane (4 rms_norm, 5 kv_rope_quant, 6 hc_sinkhorn,
// one block each) reach the attention (7) in three kernels each: a tie in nodes, broken
// by the blocks; equal blocks leave the tie.
TEST(GraphChain, NodeTiesBreakByWeight) {
  Graph g(9);
  for (const auto& [a, b] : Pairs{{0, 1}, {1, 2}, {2, 3}, {3, 7}, {0, 4}, {4, 5}, {5, 6}, {6, 7}, {7, 8}}) g.edge(a, b);
  EXPECT_EQ(chosen(g), Pairs{});
  EXPECT_EQ(chosen(g, {192, 1, 256, 8, 1, 1, 1, 4, 256}), (Pairs{{0, 1}}));
  EXPECT_EQ(chosen(g, {192, 1, 1, 8, 1, 1, 8, 4, 256}), Pairs{});
  EXPECT_EQ(chosen(g, {192, 1, 1, 1, 1, 1, 8, 4, 256}), (Pairs{{0, 4}}));
  // More nodes win over more blocks.
  Graph h(6);
  for (const auto& [a, b] : Pairs{{0, 1}, {1, 5}, {0, 2}, {2, 3}, {3, 5}, {5, 4}}) h.edge(a, b);
  EXPECT_EQ(chosen(h, {1, 1000, 1, 1, 1, 1}), (Pairs{{0, 2}}));
  EXPECT_THROW(chosen(h, {1, 2}), dsv4::core::Error);  // a weight a node
}

TEST(GraphChain, RejectsCyclesAndOutOfRangeEdges) {
  Graph g(3);
  g.edge(0, 1);
  g.edge(1, 2);
  g.edge(2, 1);
  EXPECT_THROW(chosen(g), dsv4::core::Error);
  Graph h(2);
  h.edge(0, 2);
  EXPECT_THROW(chosen(h), dsv4::core::Error);
}

// Random DAGs (edges only from lower to higher nodes, listed in a shuffled order), with and
// without weights: every chosen edge leaves a fork toward its one longest child, and every
// fork with a unique longest child has its edge chosen, longest paths (nodes, then weight)
// counted by a memoized recursion.
TEST(GraphChain, RandomDagsMatchBruteForce) {
  std::mt19937_64 rng(dsv4::testing::test_seed() ^ 0x6c);
  for (int trial = 0; trial < 500; ++trial) {
    Graph g(int64_t(rng() % 40) + 1);
    for (int64_t a = 0; a < g.nodes; ++a)
      for (int64_t b = a + 1; b < g.nodes; ++b)
        if (rng() % 8 == 0) g.edge(a, b);
    std::vector<size_t> perm(g.from.size());
    for (size_t i = 0; i < perm.size(); ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    Graph s(g.nodes);
    for (size_t i : perm) s.edge(g.from[i], g.to[i]);
    // Half the trials with weights (a few values, so that ties in both happen).
    std::vector<int64_t> weights;
    if (trial % 2) {
      for (int64_t v = 0; v < s.nodes; ++v) weights.push_back(int64_t(rng() % 3));
    }
    using Length = std::pair<int64_t, int64_t>;
    std::vector<Length> memo(size_t(s.nodes), Length{0, 0});
    std::function<Length(int64_t)> longest = [&](int64_t v) {
      if (memo[size_t(v)].first > 0) return memo[size_t(v)];
      Length tail{0, 0};
      for (size_t i = 0; i < s.from.size(); ++i)
        if (s.from[i] == v) tail = std::max(tail, longest(s.to[i]));
      return memo[size_t(v)] = Length{tail.first + 1, tail.second + (weights.empty() ? 0 : weights[size_t(v)])};
    };
    const std::vector<bool> chain = fork_chain_edges(s.nodes, s.from, s.to, weights);
    ASSERT_EQ(chain.size(), s.from.size());
    for (int64_t v = 0; v < s.nodes; ++v) {
      std::vector<size_t> outs;
      for (size_t i = 0; i < s.from.size(); ++i)
        if (s.from[i] == v) outs.push_back(i);
      Length best{0, 0};
      int64_t at_best = 0;
      for (size_t i : outs) best = std::max(best, longest(s.to[i]));
      for (size_t i : outs) at_best += longest(s.to[i]) == best;
      for (size_t i : outs) {
        const bool want = outs.size() >= 2 && at_best == 1 && longest(s.to[i]) == best;
        ASSERT_EQ(bool(chain[i]), want) << "trial " << trial << " edge " << s.from[i] << " -> " << s.to[i];
      }
    }
  }
}

}  // namespace
}  // namespace dsv4::ops
