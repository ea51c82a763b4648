#include "engine/serving_engine.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace dsv4::engine {

std::string describe_warm_ups(const std::vector<WarmUpReport>& reports) {
  if (reports.empty()) return "no warm-up";
  double seconds = 0;
  const WarmUpReport* tightest = &reports[0];
  for (const WarmUpReport& r : reports) {
    seconds = std::max(seconds, r.seconds);
    if (r.free_after && (!tightest->free_after || *r.free_after < *tightest->free_after)) tightest = &r;
  }
  std::vector<std::string> steps;
  if (tightest->prefill_tokens > 0) steps.push_back(fmt::format("a prefill step of {} tokens", tightest->prefill_tokens));
  if (!tightest->graph_buckets.empty())
    steps.push_back(fmt::format("the decode graphs of {} rows", fmt::join(tightest->graph_buckets, ", ")));
  std::string line = fmt::format("warmed up in {:.1f} s: {}", seconds,
                                 steps.empty() ? std::string("nothing to run") : fmt::format("{}", fmt::join(steps, " and ")));
  const char* rank = reports.size() > 1 ? " (the rank with the least)" : "";
  if (tightest->free_before && tightest->free_after) {
    const double taken = double(*tightest->free_before) - double(*tightest->free_after);
    line += fmt::format("; they took {:.2f} GB, {:.2f} GB are free after{}", std::max(taken, 0.0) / 1e9,
                        double(*tightest->free_after) / 1e9, rank);
  }
  return line;
}

LocalServingEngine::LocalServingEngine(std::shared_ptr<ModelRunner> runner, const SchedulerConfig& config,
                                       int32_t eos_token_id, bool warm_up)
    : runner_(std::move(runner)), core_(*runner_, config, eos_token_id), max_model_len_(config.max_model_len) {
  if (warm_up) warm_ups_.push_back(runner_->warm_up(true));
  thread_ = std::thread([this] { loop(); });
}

int64_t reject_request(const std::string& why, const TokenCallback& on_token, std::string* error) {
  if (error) *error = why;
  TokenEvent e;
  e.finished = true;
  e.reason = FinishReason::kError;
  e.error = why;
  if (on_token) on_token(e);
  return -1;
}

LocalServingEngine::~LocalServingEngine() { shutdown(false); }

int64_t LocalServingEngine::submit(RequestParams params, TokenCallback on_token, std::string* error) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!accepting_) {
      return reject_request(fatal_.empty() ? "the server is shutting down" : "the engine failed: " + fatal_,
                            on_token, error);
    }
  }
  const int64_t id = core_.submit(std::move(params), std::move(on_token), error);
  wake_.notify_one();
  return id;
}

void LocalServingEngine::cancel(int64_t request_id) {
  core_.cancel(request_id);
  wake_.notify_one();
}

void LocalServingEngine::loop() {
  for (;;) {
    bool abort = false;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait_for(lock, std::chrono::milliseconds(50), [&] { return stopping_ || core_.has_work(); });
      abort = abort_;
      abort_ = false;
    }
    // Requests are only touched on this thread, so the abort happens here.
    if (abort) core_.abort_all();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_ && !core_.has_work()) return;
    }
    try {
      core_.step();
    } catch (const std::exception& e) {
      // A failed step (device error, lost peer) ends every request with the error.
      std::fprintf(stderr, "dsv4: engine step failed: %s\n", e.what());
      {
        std::lock_guard<std::mutex> lock(mutex_);
        accepting_ = false;
        fatal_ = e.what();
      }
      core_.abort_all(e.what());
    }
  }
}

void LocalServingEngine::shutdown(bool drain) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    accepting_ = false;
    if (!thread_.joinable()) return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    abort_ = !drain;
  }
  wake_.notify_all();
  thread_.join();
}

}  // namespace dsv4::engine
