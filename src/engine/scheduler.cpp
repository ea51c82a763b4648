#include "engine/scheduler.h"

#include <algorithm>

#include <fmt/format.h>

#include "core/error.h"

namespace dsv4::engine {

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
    case FinishReason::kNone: break;
  }
  return "none";
}

Scheduler::Scheduler(const SchedulerConfig& config, IndexPool& slots, IndexPool& pages)
    : config_(config), slots_(slots), pages_(pages) {
  DSV4_CHECK(config.max_num_seqs > 0 && config.max_num_batched_tokens > 0 && config.prefill_chunk > 0,
             "scheduler limits must be positive");
}

bool Scheduler::validate(const Request& r, std::string* reason) const {
  const int64_t total = int64_t(r.params.prompt.size()) + r.params.max_tokens;
  if (r.params.prompt.empty()) {
    *reason = "the prompt is empty";
    return false;
  }
  if (total > config_.max_model_len) {
    *reason = fmt::format("prompt ({} tokens) + max_tokens ({}) = {} exceeds the maximum model length {}",
                          r.params.prompt.size(), r.params.max_tokens, total, config_.max_model_len);
    return false;
  }
  if (pages_for_positions(total) > pages_.capacity()) {
    *reason = fmt::format("{} tokens need {} cache pages; this rank has {}", total, pages_for_positions(total),
                          pages_.capacity());
    return false;
  }
  return true;
}

void Scheduler::add(std::shared_ptr<Request> request) { waiting_.push_back(std::move(request)); }

double Scheduler::kv_usage() const {
  return pages_.capacity() ? double(pages_.num_used()) / double(pages_.capacity()) : 0.0;
}

bool Scheduler::ensure_pages(Request& r, int64_t positions) {
  const int32_t need = pages_for_positions(positions) - int32_t(r.pages.size());
  return need <= 0 || pages_.allocate(need, &r.pages);
}

bool Scheduler::preempt_one(const Request* keep) {
  // The newest running request that is not in the step being built.
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
    Request& victim = **it;
    if (&victim == keep) continue;
    slots_.release(victim.slot);
    victim.slot = -1;
    pages_.release(victim.pages);
    victim.pages.clear();
    victim.num_computed = 0;  // recompute prompt and generated tokens later
    ++victim.num_preemptions;
    ++preemptions_;
    waiting_.push_front(*it);
    running_.erase(std::next(it).base());
    return true;
  }
  return false;
}

ScheduledStep Scheduler::schedule() {
  ScheduledStep step;
  int32_t budget = config_.max_num_batched_tokens;
  auto add_slice = [&](const std::shared_ptr<Request>& r, int32_t n) {
    SequenceSlice s;
    s.state_slot = r->slot;
    s.start_pos = r->num_computed;
    s.tokens = r->tokens.data() + r->num_computed;
    s.num_tokens = n;
    s.block_table = &r->pages;
    s.want_logits = r->num_computed + n == int32_t(r->tokens.size());
    step.slices.push_back(s);
    step.requests.push_back(r);
    step.num_tokens += n;
    (r->num_pending() == 1 ? step.num_decode_tokens : step.num_prefill_tokens) += n;
    budget -= n;
  };
  auto in_step = [&](const Request* r) {
    for (const auto& q : step.requests)
      if (q.get() == r) return true;
    return false;
  };
  // Decodes first (one token each), then unfinished prefills, in admission order.
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < running_.size(); ++i) {
      std::shared_ptr<Request> r = running_[i];
      const bool decode = r->num_pending() == 1;
      if (decode != (pass == 0) || in_step(r.get())) continue;
      if (budget == 0 || int32_t(step.slices.size()) >= config_.max_num_seqs) break;
      const int32_t n = std::min({r->num_pending(), config_.prefill_chunk, budget});
      bool ok = ensure_pages(*r, int64_t(r->num_computed) + n);
      while (!ok && preempt_one(r.get())) {
        // Preemption may have removed requests already placed in this step: drop them.
        for (size_t k = 0; k < step.requests.size();) {
          if (step.requests[k]->slot < 0) {
            step.num_tokens -= step.slices[k].num_tokens;
            budget += step.slices[k].num_tokens;
            step.requests.erase(step.requests.begin() + int64_t(k));
            step.slices.erase(step.slices.begin() + int64_t(k));
          } else {
            ++k;
          }
        }
        ok = ensure_pages(*r, int64_t(r->num_computed) + n);
      }
      if (!ok) break;
      // running_ may have shrunk; find r's index again next iteration.
      add_slice(r, n);
      i = size_t(std::find(running_.begin(), running_.end(), r) - running_.begin());
    }
  }
  // Admit waiting requests in arrival order while their whole prompt fits.
  while (!waiting_.empty() && budget > 0 && int32_t(step.slices.size()) < config_.max_num_seqs) {
    std::shared_ptr<Request> r = waiting_.front();
    const int32_t prompt = int32_t(r->tokens.size());
    if (slots_.num_free() == 0 || pages_for_positions(prompt + 1) > pages_.num_free()) break;
    const int32_t n = std::min({prompt, config_.prefill_chunk, budget});
    r->slot = slots_.allocate();
    DSV4_CHECK(ensure_pages(*r, int64_t(n)), "pages vanished during admission");
    waiting_.pop_front();
    running_.push_back(r);
    add_slice(r, n);
  }
  // Recount in case preemption dropped slices.
  step.num_prefill_tokens = step.num_decode_tokens = 0;
  for (size_t k = 0; k < step.slices.size(); ++k)
    (step.slices[k].num_tokens == 1 && step.requests[k]->num_pending() == 1 ? step.num_decode_tokens
                                                                             : step.num_prefill_tokens) +=
        step.slices[k].num_tokens;
  return step;
}

void Scheduler::commit(const ScheduledStep& step) {
  for (size_t k = 0; k < step.slices.size(); ++k) step.requests[k]->num_computed += step.slices[k].num_tokens;
}

void Scheduler::release(Request& r) {
  if (r.slot >= 0) slots_.release(r.slot);
  r.slot = -1;
  pages_.release(r.pages);
  r.pages.clear();
  auto drop = [&](auto& queue) {
    queue.erase(std::remove_if(queue.begin(), queue.end(), [&](const auto& q) { return q.get() == &r; }),
                queue.end());
  };
  drop(running_);
  drop(waiting_);
}

}  // namespace dsv4::engine
