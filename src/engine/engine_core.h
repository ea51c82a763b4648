// One rank's serving engine: requests in, tokens out. Each step drains the
// inbox (new requests, cancels), schedules, runs the model, samples, emits
// token events and releases finished requests' state. Thread-safe submit and
// cancel; step() runs on one engine thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "engine/kv_pool.h"
#include "engine/model_runner.h"
#include "engine/request.h"
#include "engine/scheduler.h"

namespace dsv4::engine {

struct EngineStats {
  int64_t running = 0;
  int64_t waiting = 0;
  double kv_usage = 0.0;          // fraction of cache pages in use
  int64_t free_pages = 0;
  int64_t steps = 0;
  int64_t prompt_tokens = 0;      // computed prompt tokens (recomputation included)
  int64_t generated_tokens = 0;
  int64_t finished_requests = 0;
  int64_t preemptions = 0;
  double last_step_ms = 0.0;
};

class EngineCore {
 public:
  EngineCore(ModelRunner& runner, const SchedulerConfig& config, int32_t eos_token_id);

  // Thread-safe. Returns the request id; invalid requests finish at once with an
  // error event (and submit returns -1 with `error` set).
  int64_t submit(RequestParams params, TokenCallback on_token, std::string* error = nullptr);
  void cancel(int64_t request_id);  // thread-safe; the request ends with reason "cancelled"
  // Ends every request (reason "cancelled" or the given error) and frees all state.
  void abort_all(const std::string& error = "");

  // Split step for data-parallel lockstep: prepare() drains the inbox and
  // schedules; execute() runs it (also with an empty step, which every op and
  // collective accepts) and emits tokens.
  ScheduledStep prepare();
  // `padding` pads the step (data-parallel ranks run the step's DP-max rows);
  // `allow_graph` must be agreed by all ranks.
  void execute(ScheduledStep& step, const MetadataPadding& padding = {}, bool allow_graph = true);
  // Whether this rank's part of the step could replay a graph.
  bool graph_eligible(const ScheduledStep& step, int32_t padded_rows) const;
  // prepare + execute; false when there was nothing to do.
  bool step();

  bool has_work() const;  // thread-safe
  EngineStats stats() const;  // thread-safe snapshot, updated by the engine thread
  ModelRunner& runner() { return runner_; }

 private:
  void finish(Request& r, FinishReason reason, const std::string& error = "");
  // The penalties of r's logits row `row`: an entry a token seen where SamplingParams::penalized,
  // and with `hold_stops` (fewer than RequestParams::min_tokens generated) EOS (unless ignore_eos)
  // and the stop_token_ids at -inf; an entry a (row, token).
  void add_penalties(Request& r, int32_t row, bool hold_stops, std::vector<ops::LogitPenalty>* out) const;
  // SamplingParams::penalized's entries of r's row: a token seen (its counts), a token biased.
  static void penalty_entries(Request& r, int32_t row, std::vector<ops::LogitPenalty>* out);
  // Copies the scheduler's queue state into stats_ (engine thread only).
  void publish_queue_stats();

  ModelRunner& runner_;
  IndexPool slots_;
  IndexPool pages_;
  Scheduler scheduler_;
  int32_t eos_;
  int64_t vocab_;
  mutable std::mutex inbox_mutex_;
  std::vector<std::shared_ptr<Request>> inbox_;
  std::vector<int64_t> cancels_;
  std::unordered_map<int64_t, std::shared_ptr<Request>> live_;
  std::atomic<int64_t> next_id_{1};
  std::atomic<int64_t> pending_{0};  // submitted, not finished
  mutable std::mutex stats_mutex_;
  EngineStats stats_;
  std::vector<int32_t> tokens_;  // the step's tokens, a logits row each
  std::vector<ops::TokenLogprobRecord> logprob_records_;  // the step's, where a row asked
};

}  // namespace dsv4::engine
