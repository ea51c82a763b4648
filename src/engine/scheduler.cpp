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
  if (config_.max_logit_rows == 0) config_.max_logit_rows = config_.max_num_seqs;
  DSV4_CHECK(config_.max_logit_rows >= config_.max_num_seqs, "max_logit_rows {} below max_num_seqs {}",
             config_.max_logit_rows, config_.max_num_seqs);
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
  // The logits rows a slice takes: every row where it scores a prompt, else its last where it
  // ends its request's tokens.
  const auto logit_rows = [](const SequenceSlice& s) {
    return s.want_all_logits ? s.num_tokens : s.want_logits ? 1 : 0;
  };
  // n tokens of r cut to the logits rows left: a scoring slice takes what is left less a row for
  // each sequence the step may still take (so it never crowds one out, and gets at least one
  // row); any other needs at most one row, which is always kept for it.
  auto fit_logit_rows = [&](const Request& r, int32_t n) {
    const int32_t left = config_.max_logit_rows - step.num_logit_rows;
    if (r.slice_scores_prompt(n)) return std::min(n, left - (config_.max_num_seqs - int32_t(step.slices.size()) - 1));
    return r.num_computed + n < int32_t(r.tokens.size()) || left >= 1 ? n : 0;
  };
  auto add_slice = [&](const std::shared_ptr<Request>& r, int32_t n) {
    SequenceSlice s;
    s.state_slot = r->slot;
    s.start_pos = r->num_computed;
    s.tokens = r->tokens.data() + r->num_computed;
    s.num_tokens = n;
    s.block_table = &r->pages;
    s.want_logits = r->num_computed + n == int32_t(r->tokens.size());
    s.want_all_logits = r->slice_scores_prompt(n);
    step.slices.push_back(s);
    step.requests.push_back(r);
    step.num_tokens += n;
    step.num_logit_rows += logit_rows(s);
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
      const int32_t n = fit_logit_rows(*r, std::min({r->num_pending(), config_.prefill_chunk, budget}));
      if (n == 0) continue;  // (not reached: a row is kept for every sequence)
      bool ok = ensure_pages(*r, int64_t(r->num_computed) + n);
      while (!ok && preempt_one(r.get())) {
        // Preemption may have removed requests already placed in this step: drop them.
        for (size_t k = 0; k < step.requests.size();) {
          if (step.requests[k]->slot < 0) {
            const SequenceSlice& dropped = step.slices[k];
            step.num_tokens -= dropped.num_tokens;
            budget += dropped.num_tokens;
            step.num_logit_rows -= logit_rows(dropped);
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
    const int32_t n = fit_logit_rows(*r, std::min({prompt, config_.prefill_chunk, budget}));
    if (n == 0) break;  // (not reached: a row is kept for every sequence)
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
