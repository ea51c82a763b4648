#include "engine/dp_engine.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "core/error.h"

namespace dsv4::engine {

struct DpServingEngine::Rank {
  DpRank* base = nullptr;  // backend, model, MoE executor, communicator
  std::unique_ptr<ModelRunner> runner;
  std::unique_ptr<EngineCore> core;
  std::atomic<int64_t> queued{0};  // submitted, not finished (for routing)
};

DpServingEngine::DpServingEngine(const DpEngineOptions& options) : options_(options) {
  DpRanksOptions ro = options.ranks;
  ro.max_rows = options.runner.max_tokens_per_step;
  dp_ = build_dp_ranks(ro);
  config_ = dp_.config;
  for (auto& base : dp_.ranks) {
    auto rank = std::make_unique<Rank>();
    rank->base = base.get();
    base->backend->bind_to_current_thread();
    rank->runner = std::make_unique<ModelRunner>(config_, base->model->weights, *base->backend, options.runner,
                                                 base->moe.get());
    rank->core = std::make_unique<EngineCore>(*rank->runner, options.scheduler, options.eos_token_id);
    ranks_.push_back(std::move(rank));
  }
  if (options.warm_up) warm_up_ranks();
  for (auto& rank : ranks_) threads_.emplace_back([this, r = rank.get()] { run_rank(*r); });
}

void DpServingEngine::warm_up_ranks() {
  // Each rank on its own thread, as its steps run: their MoE exchanges meet. A rank that
  // fails aborts its peers' communicators, so none waits for it in a collective.
  warm_ups_.resize(ranks_.size());
  const auto warm_up = [this](size_t i) {
    Rank& rank = *ranks_[i];
    try {
      rank.base->backend->bind_to_current_thread();
      warm_ups_[i] = rank.runner->warm_up(true);
    } catch (const std::exception& e) {
      throw core::Error(fmt::format("rank {}: {}", rank.base->global_rank, e.what()));
    }
  };
  if (dp_.comms.empty()) {
    for (size_t i = 0; i < ranks_.size(); ++i) warm_up(i);
    return;
  }
  parallel::run_rank_threads_or_throw(dp_.comms, [&](parallel::Communicator& comm) {
    for (size_t i = 0; i < ranks_.size(); ++i)
      if (ranks_[i]->base->comm == &comm) return warm_up(i);
    core::fail("warming up: a communicator of no rank of this process");
  });
}

DpServingEngine::~DpServingEngine() { shutdown(false); }

int64_t DpServingEngine::submit(RequestParams params, TokenCallback on_token, std::string* error) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!accepting_) {
      return reject_request(failure_.empty() ? "the server is shutting down" : "the engine failed: " + failure_,
                            on_token, error);
    }
  }
  // The least loaded rank: fewest queued requests, then the most free cache.
  Rank* best = ranks_[0].get();
  EngineStats best_stats = best->core->stats();
  for (auto& r : ranks_) {
    const EngineStats s = r->core->stats();
    if (r->queued < best->queued || (r->queued == best->queued && s.free_pages > best_stats.free_pages)) {
      best = r.get();
      best_stats = s;
    }
  }
  Rank* rank = best;
  ++rank->queued;
  const int index = rank->base->index;
  auto wrapped = [rank, index, cb = std::move(on_token)](const TokenEvent& e) {
    TokenEvent g = e;
    g.request_id = e.request_id * kRankStride + index;
    if (e.finished) --rank->queued;
    if (cb) cb(g);
  };
  const int64_t id = rank->core->submit(std::move(params), wrapped, error);
  // Rank threads test has_work() under mutex_ before they sleep; taking it here
  // orders this submit before or after that test, so the notify is not lost.
  { std::lock_guard<std::mutex> lock(mutex_); }
  wake_.notify_all();
  return id < 0 ? -1 : id * kRankStride + index;
}

void DpServingEngine::cancel(int64_t request_id) {
  const int r = int(request_id % kRankStride);
  if (r < 0 || r >= num_ranks()) return;
  ranks_[size_t(r)]->core->cancel(request_id / kRankStride);
  wake_.notify_all();
}

EngineStats DpServingEngine::stats() const {
  EngineStats total;
  int64_t pages = 0;
  for (const auto& r : ranks_) {
    const EngineStats s = r->core->stats();
    total.running += s.running;
    total.waiting += s.waiting;
    total.free_pages += s.free_pages;
    total.steps = std::max(total.steps, s.steps);
    total.prompt_tokens += s.prompt_tokens;
    total.generated_tokens += s.generated_tokens;
    total.finished_requests += s.finished_requests;
    total.preemptions += s.preemptions;
    total.last_step_ms = std::max(total.last_step_ms, s.last_step_ms);
    pages += r->runner->options().cache.num_pages;
  }
  total.kv_usage = pages ? 1.0 - double(total.free_pages) / double(pages) : 0.0;
  return total;
}

std::string DpServingEngine::failure() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return failure_;
}

void DpServingEngine::fail_all(const std::string& error) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failure_.empty()) failure_ = error;
    accepting_ = false;
    stopping_ = true;
  }
  for (auto& c : dp_.comms) c->abort(error);
  wake_.notify_all();
}

void DpServingEngine::run_rank(Rank& rank) {
  rank.base->backend->bind_to_current_thread();
  parallel::Communicator* comm = rank.base->comm;
  const bool lockstep = comm != nullptr && options_.ranks.moe != MoeMode::kLocal;
  // Whether the last agreement saw work anywhere in the group: then this rank
  // steps again at once, even with nothing of its own (ranks on other nodes are
  // not in ranks_ and cannot wake it).
  bool group_busy = false;
  try {
    for (int64_t iteration = 0;; ++iteration) {
      if (options_.rank_step_hook && !options_.rank_step_hook(rank.base->index, iteration)) return;
      bool stopping = false, abort = false;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait_for(lock, std::chrono::milliseconds(20), [&] {
          if (stopping_ || abort_ || group_busy) return true;
          for (auto& r : ranks_)
            if (r->core->has_work()) return true;
          return false;
        });
        stopping = stopping_;
        abort = abort_;
      }
      if (abort) rank.core->abort_all();
      ScheduledStep step = rank.core->prepare();
      if (!lockstep) {
        if (!step.empty()) rank.core->execute(step);
        if (stopping && !rank.core->has_work()) return;
        continue;
      }
      // One small collective: the step's DP max of rows, whether any rank has
      // queued work or is stopping, and whether every rank can replay a graph.
      const int32_t rows = step.num_tokens;
      // {max rows, any rank has work, any rank still running}: the group stops
      // only when every rank (on every node) is stopping and none has work left.
      int64_t agree[4] = {rows, rank.core->has_work() ? 1 : 0, stopping ? 0 : 1, 0};
      comm->all_reduce_host(agree, 3, parallel::ReduceOp::kMax);
      const int32_t dp_rows = int32_t(agree[0]);
      group_busy = dp_rows > 0 || agree[1] != 0;
      if (dp_rows == 0) {
        if (agree[2] == 0 && agree[1] == 0) return;  // every rank stopping and drained
        continue;
      }
      int64_t no_graph = rank.core->graph_eligible(step, dp_rows) ? 0 : 1;
      comm->all_reduce_host(&no_graph, 1, parallel::ReduceOp::kMax);
      MetadataPadding pad;
      pad.rows = dp_rows;
      rank.core->execute(step, pad, no_graph == 0);
      if (options_.check_ledger) comm->check_ledger("step");
    }
  } catch (const std::exception& e) {
    // Communicator errors already name the rank; others get it here.
    const std::string prefix = fmt::format("rank {}: ", rank.base->global_rank);
    const std::string what = e.what();
    const std::string msg = what.rfind(prefix, 0) == 0 ? what : prefix + what;
    std::fprintf(stderr, "dsv4: %s\n", msg.c_str());
    fail_all(msg);
    rank.core->abort_all(msg);
  }
}

void DpServingEngine::shutdown(bool drain) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    accepting_ = false;
    stopping_ = true;
    abort_ = abort_ || !drain;
  }
  wake_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
  // Every rank thread has exited, so the cores are ours: whatever is still
  // queued or running (a rank that left early, a drain cut short) gets its
  // final event rather than silence.
  const std::string why = failure();
  for (auto& rank : ranks_) rank->core->abort_all(why.empty() ? std::string() : "the engine failed: " + why);
}

}  // namespace dsv4::engine
