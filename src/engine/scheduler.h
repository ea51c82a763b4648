// Continuous batching for one rank: every step decodes one token for each
// running request and fills the remaining token budget with prefill chunks;
// state slots and pages are taken as positions advance and released on finish,
// cancel or error; when pages run out the newest running request is preempted
// (its state freed, its tokens recomputed later). The result of schedule() is a
// plain description of the step (requests, token counts, slots) that a step
// planner can split into micro-batches without touching the scheduler.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "engine/kv_pool.h"
#include "engine/request.h"
#include "engine/step_metadata.h"

namespace dsv4::engine {

struct SchedulerConfig {
  int32_t max_num_seqs = 64;             // requests in one step
  int32_t max_num_batched_tokens = 512;  // token rows in one step
  int32_t prefill_chunk = 512;           // tokens of one prompt per step
  int32_t max_model_len = 4096;          // positions per request
  // Logits rows in one step: a row for each sequence that ends its tokens, and every row of a
  // prompt being scored (RequestParams::prompt_logprobs), whose chunks take what is left after
  // a row for every other sequence the step could hold. 0: max_num_seqs (prompts are then
  // scored a row a step).
  int32_t max_logit_rows = 0;
};

struct ScheduledStep {
  std::vector<std::shared_ptr<Request>> requests;  // one per slice, same order
  std::vector<SequenceSlice> slices;
  int32_t num_tokens = 0;
  int32_t num_prefill_tokens = 0;
  int32_t num_decode_tokens = 0;
  int32_t num_logit_rows = 0;
  bool empty() const { return slices.empty(); }
};

class Scheduler {
 public:
  Scheduler(const SchedulerConfig& config, IndexPool& slots, IndexPool& pages);

  // Rejects (returns false with a reason) requests that can never run here.
  bool validate(const Request& request, std::string* reason) const;
  void add(std::shared_ptr<Request> request);
  ScheduledStep schedule();
  // After a step: the slices' tokens are in the caches.
  void commit(const ScheduledStep& step);
  // Frees the request's state and drops it from the queues.
  void release(Request& request);

  size_t num_waiting() const { return waiting_.size(); }
  size_t num_running() const { return running_.size(); }
  bool idle() const { return waiting_.empty() && running_.empty(); }
  double kv_usage() const;  // fraction of pages in use
  const SchedulerConfig& config() const { return config_; }
  int64_t num_preemptions() const { return preemptions_; }

 private:
  bool ensure_pages(Request& r, int64_t positions);
  bool preempt_one(const Request* keep);

  SchedulerConfig config_;
  IndexPool& slots_;
  IndexPool& pages_;
  std::deque<std::shared_ptr<Request>> waiting_;
  std::vector<std::shared_ptr<Request>> running_;  // admitted, in admission order
  int64_t preemptions_ = 0;
};

}  // namespace dsv4::engine
