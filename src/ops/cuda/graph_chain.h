// Which edge out of each fork of a captured step's graph continues its longest chain
// (DSV4_CUDA_PDL_LANES=chain: that edge alone of the fork's becomes programmatic).
// Host code, tested on the CPU (tests/ops/graph_chain_test.cpp).
//
// Why: a fork's edges stay plain by default, so the node after one starts ~0.5 µs after
// the fork node ends instead of launching under its tail; at batch 1 three links of every
// layer's critical chain follow a fork (the router GEMM, the q norm, wo_a; docs/design/
// decode-roofline.md, seventy-seventh session). Making every fork edge programmatic
// (`fork`, `all`) gained less in the step than in the trace, perhaps because the side
// lanes' kernels then launch early too and take SM slots the chain's next kernel wanted
// (thirty-seventh session). This picks the chain's child only. The graph holds no
// durations, so "longest" counts nodes, then the kernels' blocks: a side lane's stages
// rejoin the main lane after a few kernels, while the main lane runs the layer's chain.
// Where a side lane's path is the longer, the count follows it: in the seventy-seventh
// session's batch-1 trace a compressor layer's chain ran through its compressor's lane
// (two bf16 GEMMs and the compression) before the attention.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "core/error.h"

namespace dsv4::ops {

// Edges i = (from[i], to[i]) over nodes 0 .. num_nodes - 1, a DAG; weights: one a node
// (the CUDA backend gives a kernel node its grid's blocks, any other node 0), or empty
// (all 0). A path's length is (its nodes, the sum of its nodes' weights), compared in that
// order: nodes first, weights to break a tie. (In a SWA layer at batch 1 the q path after
// wq_a + wkv, rms_norm_quant -> wq_b -> q_norm_rope, and the kv lane's rms_norm ->
// kv_rope_quant -> hc_sinkhorn both reach the attention in three kernels; the q path's
// wq_b is 256 blocks, the kv lane's kernels one each.) Returns, per edge, whether it leaves
// a node of two or more out-edges toward the child whose longest path to a node without
// out-edges is strictly longer than every other child's; a fork whose longest children
// tie has no such edge.
inline std::vector<bool> fork_chain_edges(int64_t num_nodes, const std::vector<int64_t>& from,
                                          const std::vector<int64_t>& to, const std::vector<int64_t>& weights = {}) {
  DSV4_CHECK(from.size() == to.size(), "fork_chain_edges: {} edge sources for {} targets", from.size(), to.size());
  DSV4_CHECK(weights.empty() || int64_t(weights.size()) == num_nodes, "fork_chain_edges: {} weights for {} nodes",
             weights.size(), num_nodes);
  const size_t n = size_t(num_nodes), m = from.size();
  std::vector<std::vector<size_t>> out(n);  // edge indices by source
  std::vector<int64_t> in_degree(n, 0);
  for (size_t i = 0; i < m; ++i) {
    DSV4_CHECK(from[i] >= 0 && from[i] < num_nodes && to[i] >= 0 && to[i] < num_nodes,
               "fork_chain_edges: edge {} ({} -> {}) outside the {} nodes", i, from[i], to[i], num_nodes);
    out[size_t(from[i])].push_back(i);
    ++in_degree[size_t(to[i])];
  }
  // Kahn's order, then the longest path to a sink in reverse order.
  std::vector<size_t> order;
  order.reserve(n);
  for (size_t v = 0; v < n; ++v)
    if (in_degree[v] == 0) order.push_back(v);
  for (size_t head = 0; head < order.size(); ++head)
    for (const size_t i : out[order[head]])
      if (--in_degree[size_t(to[i])] == 0) order.push_back(size_t(to[i]));
  DSV4_CHECK(order.size() == n, "fork_chain_edges: the graph has a cycle ({} of {} nodes ordered)", order.size(), n);
  using Length = std::pair<int64_t, int64_t>;  // (nodes, weight), compared lexicographically
  std::vector<Length> longest(n);
  for (size_t j = n; j-- > 0;) {
    const size_t v = order[j];
    Length tail{0, 0};
    for (const size_t i : out[v]) tail = std::max(tail, longest[size_t(to[i])]);
    longest[v] = {tail.first + 1, tail.second + (weights.empty() ? 0 : weights[v])};
  }
  std::vector<bool> chain(m, false);
  for (size_t v = 0; v < n; ++v) {
    if (out[v].size() < 2) continue;
    Length best{-1, 0}, second{-1, 0};
    size_t best_edge = 0;
    for (const size_t i : out[v]) {
      const Length l = longest[size_t(to[i])];
      if (l > best) {
        second = best;
        best = l;
        best_edge = i;
      } else if (l > second) {
        second = l;
      }
    }
    if (best > second) chain[best_edge] = true;
  }
  return chain;
}

}  // namespace dsv4::ops
