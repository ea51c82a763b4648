// What the server talks to: submit, cancel, stats, shutdown. One rank runs one
// engine thread; data-parallel engines (engine/dp_engine.h) route requests to
// ranks and present the same interface.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine_core.h"
#include "model/config.h"

namespace dsv4::engine {

// What submit() does with a request it cannot take: `error` set, the callback
// given a finished event carrying it, -1 returned.
int64_t reject_request(const std::string& why, const TokenCallback& on_token, std::string* error);

// One line on what the ranks' warm-ups ran and took (serve's start-up log): the longest
// time, the buckets, and the memory taken and left free on the rank with the least free.
std::string describe_warm_ups(const std::vector<WarmUpReport>& reports);

class ServingEngine {
 public:
  virtual ~ServingEngine() = default;
  // Thread-safe. -1 and `error` for requests that can never run (the callback
  // also receives a finished event with the error).
  virtual int64_t submit(RequestParams params, TokenCallback on_token, std::string* error = nullptr) = 0;
  virtual void cancel(int64_t request_id) = 0;
  virtual EngineStats stats() const = 0;  // summed over ranks
  virtual int num_ranks() const = 0;
  // drain: finish in-flight requests first; otherwise they end as cancelled.
  // New submits are rejected from the moment shutdown starts.
  virtual void shutdown(bool drain) = 0;
  virtual const model::ModelConfig& config() const = 0;
  virtual int32_t max_model_len() const = 0;
  // What each rank of this process ran before serving (ModelRunner::warm_up; empty if it did not).
  virtual const std::vector<WarmUpReport>& warm_ups() const = 0;
};

// One rank, one engine thread.
class LocalServingEngine final : public ServingEngine {
 public:
  // `warm_up`: runs the runner's warm-up (with its prefill step) before the engine thread starts.
  LocalServingEngine(std::shared_ptr<ModelRunner> runner, const SchedulerConfig& config, int32_t eos_token_id,
                     bool warm_up = false);
  ~LocalServingEngine() override;

  int64_t submit(RequestParams params, TokenCallback on_token, std::string* error = nullptr) override;
  void cancel(int64_t request_id) override;
  EngineStats stats() const override { return core_.stats(); }
  int num_ranks() const override { return 1; }
  void shutdown(bool drain) override;
  const model::ModelConfig& config() const override { return runner_->model().config(); }
  int32_t max_model_len() const override { return max_model_len_; }
  const std::vector<WarmUpReport>& warm_ups() const override { return warm_ups_; }

 private:
  void loop();

  std::shared_ptr<ModelRunner> runner_;
  EngineCore core_;
  int32_t max_model_len_;
  std::vector<WarmUpReport> warm_ups_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  bool abort_ = false;
  bool accepting_ = true;
  std::string fatal_;
  std::thread thread_;
};

}  // namespace dsv4::engine
