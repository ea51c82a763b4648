// Data-parallel serving: N ranks in this process (one thread each; one GPU each
// on CUDA), each with its own requests, caches and scheduler; the MoE expert-
// parallel over the ranks. Every step all ranks agree on the step's size with
// one small collective (the DP max of rows, whether any rank has work, whether
// every rank can replay a graph); a rank with no work runs a zero-row step
// padded to that size so collectives always match (DESIGN.md §3).
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/dp_ranks.h"
#include "engine/model_loader.h"
#include "engine/serving_engine.h"
#include "parallel/communicator.h"

namespace dsv4::engine {

struct DpEngineOptions {
  DpRanksOptions ranks;               // dp, MoE path, backend, model, communication, nodes
                                      // (ranks.max_rows is taken from runner.max_tokens_per_step)
  SchedulerConfig scheduler;
  RunnerOptions runner;               // per rank
  int32_t eos_token_id = 1;
  bool check_ledger = false;          // compare every step's collective ledger across ranks
  bool warm_up = false;               // every rank's ModelRunner::warm_up (with its prefill step), together
  // Tests: called by every rank before each step; returning false makes that
  // rank vanish without a word (a killed rank), so its peers must time out.
  std::function<bool(int rank, int64_t step)> rank_step_hook;
};

class DpServingEngine final : public ServingEngine {
 public:
  explicit DpServingEngine(const DpEngineOptions& options);
  ~DpServingEngine() override;

  // Routes the request to the least loaded rank (requests queued, then KV use).
  int64_t submit(RequestParams params, TokenCallback on_token, std::string* error = nullptr) override;
  void cancel(int64_t request_id) override;
  EngineStats stats() const override;
  int num_ranks() const override { return int(ranks_.size()); }
  void shutdown(bool drain) override;
  const model::ModelConfig& config() const override { return config_; }
  int32_t max_model_len() const override { return options_.scheduler.max_model_len; }
  const std::vector<WarmUpReport>& warm_ups() const override { return warm_ups_; }
  // Rank of a request (tests and generate's output order need none of this; benchmarks report it).
  int rank_of(int64_t request_id) const { return int(request_id % kRankStride); }
  // The failure that stopped the engine, if any.
  std::string failure() const;

  static constexpr int64_t kRankStride = 1024;  // global id = local id * stride + rank

 private:
  struct Rank;
  void run_rank(Rank& rank);
  void warm_up_ranks();
  void fail_all(const std::string& error);

  DpEngineOptions options_;
  model::ModelConfig config_;
  DpRanks dp_;
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::vector<WarmUpReport> warm_ups_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  bool abort_ = false;
  bool accepting_ = true;
  std::string failure_;
  std::vector<std::thread> threads_;
};

}  // namespace dsv4::engine
