#include "engine/serving_engine.h"

#include <chrono>
#include <cstdio>

namespace dsv4::engine {

LocalServingEngine::LocalServingEngine(std::shared_ptr<ModelRunner> runner, const SchedulerConfig& config,
                                       int32_t eos_token_id)
    : runner_(std::move(runner)), core_(*runner_, config, eos_token_id), max_model_len_(config.max_model_len) {
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
