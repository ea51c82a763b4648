#include "engine/engine_core.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"

namespace dsv4::engine {

EngineCore::EngineCore(ModelRunner& runner, const SchedulerConfig& config, int32_t eos_token_id)
    : runner_(runner),
      slots_(int32_t(runner.options().cache.num_slots)),
      pages_(int32_t(runner.options().cache.num_pages)),
      scheduler_(config, slots_, pages_),
      eos_(eos_token_id),
      vocab_(runner.model().config().vocab_size) {
  const RunnerOptions& o = runner.options();
  DSV4_CHECK(config.max_num_batched_tokens <= o.max_tokens_per_step, "token budget {} above the runner's {}",
             config.max_num_batched_tokens, o.max_tokens_per_step);
  DSV4_CHECK(config.max_num_seqs <= o.max_seqs_per_step && config.max_num_seqs <= o.max_logit_rows,
             "max_num_seqs {} above the runner's limits", config.max_num_seqs);
  DSV4_CHECK(scheduler_.config().max_logit_rows <= o.max_logit_rows, "max_logit_rows {} above the runner's {}",
             scheduler_.config().max_logit_rows, o.max_logit_rows);
  DSV4_CHECK(pages_for_positions(config.max_model_len) <= o.max_blocks_per_seq,
             "max_model_len {} needs more pages per sequence than the runner's {}", config.max_model_len,
             o.max_blocks_per_seq);
}

int64_t EngineCore::submit(RequestParams params, TokenCallback on_token, std::string* error) {
  auto r = std::make_shared<Request>();
  r->id = next_id_++;
  r->params = std::move(params);
  r->on_token = std::move(on_token);
  r->tokens = r->params.prompt;
  r->num_prompt = int32_t(r->tokens.size());
  r->arrival = Clock::now();
  std::string reason;
  for (int32_t t : r->params.prompt)
    if (t < 0 || t >= vocab_) reason = fmt::format("prompt token id {} is outside the vocabulary [0, {})", t, vocab_);
  if (reason.empty() && r->params.max_tokens < 1) reason = "max_tokens must be at least 1";
  if (reason.empty() && (r->params.logprobs < -1 || r->params.logprobs > kMaxLogprobs))
    reason = fmt::format("logprobs must be -1 (none) or 0 to {}, got {}", kMaxLogprobs, r->params.logprobs);
  if (reason.empty() && (r->params.prompt_logprobs < -1 || r->params.prompt_logprobs > kMaxLogprobs))
    reason = fmt::format("prompt_logprobs must be -1 (none) or 0 to {}, got {}", kMaxLogprobs,
                         r->params.prompt_logprobs);
  if (reason.empty()) scheduler_.validate(*r, &reason);
  if (!reason.empty()) {
    if (error) *error = reason;
    TokenEvent e;
    e.request_id = r->id;
    e.finished = true;
    e.reason = FinishReason::kError;
    e.error = reason;
    e.prompt_tokens = r->num_prompt;
    if (r->on_token) r->on_token(e);
    return -1;
  }
  ++pending_;
  std::lock_guard<std::mutex> lock(inbox_mutex_);
  inbox_.push_back(r);
  return r->id;
}

void EngineCore::cancel(int64_t request_id) {
  std::lock_guard<std::mutex> lock(inbox_mutex_);
  cancels_.push_back(request_id);
}

bool EngineCore::has_work() const { return pending_.load() > 0; }

void EngineCore::finish(Request& r, FinishReason reason, const std::string& error) {
  if (r.finished) return;
  r.finished = true;
  scheduler_.release(r);
  live_.erase(r.id);
  --pending_;
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    ++stats_.finished_requests;
  }
  TokenEvent e;
  e.request_id = r.id;
  e.finished = true;
  e.reason = reason;
  e.error = error;
  e.prompt_tokens = r.num_prompt;
  e.completion_tokens = r.num_generated();
  if (r.on_token) r.on_token(e);
}

void EngineCore::abort_all(const std::string& error) {
  std::vector<std::shared_ptr<Request>> all;
  {
    std::lock_guard<std::mutex> lock(inbox_mutex_);
    for (auto& r : inbox_) all.push_back(r);
    inbox_.clear();
    cancels_.clear();
  }
  for (auto& [id, r] : live_) all.push_back(r);
  for (auto& r : all) finish(*r, error.empty() ? FinishReason::kCancelled : FinishReason::kError, error);
}

ScheduledStep EngineCore::prepare() {
  std::vector<std::shared_ptr<Request>> arrived;
  std::vector<int64_t> cancels;
  {
    std::lock_guard<std::mutex> lock(inbox_mutex_);
    arrived.swap(inbox_);
    cancels.swap(cancels_);
  }
  for (auto& r : arrived) {
    live_[r->id] = r;
    scheduler_.add(r);
  }
  for (int64_t id : cancels) {
    auto it = live_.find(id);
    if (it == live_.end()) continue;
    // finish() erases the map entry; keep the request alive past that.
    const std::shared_ptr<Request> keep = it->second;
    finish(*keep, FinishReason::kCancelled);
  }
  ScheduledStep step = scheduler_.schedule();
  publish_queue_stats();
  return step;
}

bool EngineCore::graph_eligible(const ScheduledStep& step, int32_t padded_rows) const {
  // Decode-only steps whose padded size has a bucket.
  for (const auto& s : step.slices)
    if (s.num_tokens != 1 || !s.want_logits || s.want_all_logits) return false;
  return runner_.decode_bucket(padded_rows) > 0;
}

void EngineCore::execute(ScheduledStep& step, const MetadataPadding& padding, bool allow_graph) {
  const auto start = Clock::now();
  // Every row's token is chosen on the backend (greedy or sampled, ops/token_choice.h), or
  // given where the row scores a prompt token; only the rows that return their logits bring
  // the whole row (V floats) to the host.
  std::vector<ops::TokenChoice> choices;  // a logits row each, in the metadata's order
  std::vector<int32_t> first_row(step.slices.size(), -1);   // slice -> its first logits row
  std::vector<int32_t> full_rows;                           // logits rows wanted whole
  std::vector<int32_t> full_index(step.slices.size(), -1);  // slice -> its index among the whole rows
  std::vector<ops::LogitPenalty> penalties;  // the penalized rows' seen tokens
  for (size_t k = 0; k < step.slices.size(); ++k) {
    const SequenceSlice& s = step.slices[k];
    Request& r = *step.requests[k];
    if (s.want_all_logits) {
      first_row[k] = int32_t(choices.size());
      // Rows before the slice's last (or all, where it does not end the tokens): each scores
      // the token after it where that is a prompt token not yet scored; others are dropped.
      const int32_t scored = s.want_logits ? s.num_tokens - 1 : s.num_tokens;
      for (int32_t t = 0; t < scored; ++t) {
        const int32_t p = s.start_pos + t;
        ops::TokenChoice c;
        if (!r.finished && p >= r.num_prompt_scored && p < r.num_prompt - 1) {
          c.given_token = r.tokens[size_t(p) + 1];
          c.logprobs = r.params.prompt_logprobs;
        } else {
          c.given_token = 0;  // (nothing to choose)
        }
        choices.push_back(c);
      }
      if (!s.want_logits) continue;
    } else if (!s.want_logits) {
      continue;
    }
    if (first_row[k] < 0) first_row[k] = int32_t(choices.size());
    if (!r.finished && r.params.return_logits) {
      full_index[k] = int32_t(full_rows.size());
      full_rows.push_back(int32_t(choices.size()));
    }
    // A finished request's row (cancelled while scheduled) is taken greedily and dropped.
    ops::TokenChoice c;
    if (!r.finished) {
      c = token_choice(r.params.sampling, int64_t(r.tokens.size()));
      c.logprobs = r.params.logprobs;  // their records come back, not their rows
      const bool hold_stops = r.num_generated() < r.params.min_tokens;
      if (r.params.sampling.penalized() || hold_stops)
        add_penalties(r, int32_t(choices.size()), hold_stops, &penalties);
    }
    choices.push_back(c);
  }
  const float* full_logits = nullptr;  // the whole rows, in full_rows' order (the runner's buffer)
  if (allow_graph && graph_eligible(step, std::max(step.num_tokens, padding.rows))) {
    // The runner pads a graph step to its bucket itself.
    full_logits = runner_.step_tokens(build_step_metadata(step.slices), choices, &tokens_, full_rows, true,
                                      padding.rows, &logprob_records_, &penalties);
  } else {
    full_logits = runner_.step_tokens(build_step_metadata(step.slices, padding), choices, &tokens_, full_rows, false,
                                      0, &logprob_records_, &penalties);
  }
  scheduler_.commit(step);
  int64_t generated = 0;
  for (size_t k = 0; k < step.slices.size(); ++k) {
    const SequenceSlice& s = step.slices[k];
    if (first_row[k] < 0) continue;
    Request& r = *step.requests[k];
    if (r.finished) continue;
    if (s.want_all_logits) {  // the prompt tokens this slice scored (the rows whose choice asked), in order
      const int32_t scored = s.want_logits ? s.num_tokens - 1 : s.num_tokens;
      for (int32_t t = 0; t < scored; ++t) {
        const int32_t p = s.start_pos + t;
        if (choices[size_t(first_row[k] + t)].logprobs < 0) continue;
        const ops::TokenLogprobRecord& lr = logprob_records_[size_t(first_row[k] + t)];
        PromptTokenLogprob pl;
        pl.token = r.tokens[size_t(p) + 1];
        pl.top.resize(size_t(lr.count));
        pl.logprob = ops::token_law::logprobs_from(lr, pl.top.data());
        r.prompt_logprobs.push_back(std::move(pl));
        r.num_prompt_scored = p + 1;
      }
    }
    if (!s.want_logits) continue;
    const size_t choice_row = size_t(first_row[k]) + (s.want_all_logits ? size_t(s.num_tokens - 1) : 0);
    const int32_t token = tokens_[choice_row];
    const float* logits = full_index[k] >= 0 ? full_logits + size_t(full_index[k]) * size_t(vocab_) : nullptr;
    r.tokens.push_back(token);
    ++generated;
    const auto now = Clock::now();
    if (r.num_generated() == 1) r.first_token = now;
    r.last_token = now;
    FinishReason reason = FinishReason::kNone;
    if ((!r.params.ignore_eos && token == eos_) ||
        std::find(r.params.stop_token_ids.begin(), r.params.stop_token_ids.end(), token) !=
            r.params.stop_token_ids.end())
      reason = FinishReason::kStop;
    else if (r.num_generated() >= r.params.max_tokens)
      reason = FinishReason::kLength;
    TokenEvent e;
    e.request_id = r.id;
    e.token = token;
    e.prompt_tokens = r.num_prompt;
    e.completion_tokens = r.num_generated();
    if (r.params.return_logits) {
      e.logits = logits;
      e.vocab = vocab_;
    }
    if (r.params.logprobs >= 0) {  // the record the backend made of the row (ops/token_choice.h)
      const ops::TokenLogprobRecord& lr = logprob_records_[choice_row];
      e.top_logprobs.resize(size_t(lr.count));
      e.logprob = ops::token_law::logprobs_from(lr, e.top_logprobs.data());
    }
    if (r.params.prompt_logprobs >= 0 && r.num_generated() == 1) {
      DSV4_CHECK(r.num_prompt_scored == std::max(r.num_prompt - 1, 0), "request {}: {} of {} prompt tokens scored",
                 r.id, r.num_prompt_scored, r.num_prompt - 1);
      e.prompt_logprobs = std::move(r.prompt_logprobs);
      r.prompt_logprobs.clear();
    }
    if (reason != FinishReason::kNone) {
      // The last token travels with the finish event.
      r.finished = true;
      scheduler_.release(r);
      live_.erase(r.id);
      --pending_;
      e.finished = true;
      e.reason = reason;
      {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        ++stats_.finished_requests;
      }
    }
    if (r.on_token) r.on_token(e);
  }
  publish_queue_stats();
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  std::lock_guard<std::mutex> lock(stats_mutex_);
  ++stats_.steps;
  stats_.prompt_tokens += step.num_prefill_tokens;
  stats_.generated_tokens += generated;
  stats_.last_step_ms = ms;
}

void EngineCore::add_penalties(Request& r, int32_t row, bool hold_stops, std::vector<ops::LogitPenalty>* out) const {
  const SamplingParams& sp = r.params.sampling;
  const size_t first = out->size();
  if (sp.penalized()) penalty_entries(r, row, out);
  if (!hold_stops) return;
  // min_tokens: the tokens that would end the request weigh nothing yet (-inf), in the row's
  // own entry where it has one.
  const auto hold = [&](int32_t token) {
    if (token < 0) return;
    for (size_t i = first; i < out->size(); ++i)
      if ((*out)[i].token == token) {
        (*out)[i].bias = -INFINITY;
        return;
      }
    ops::LogitPenalty p;
    p.row = row;
    p.token = token;
    p.bias = -INFINITY;
    out->push_back(p);
  };
  if (!r.params.ignore_eos) hold(eos_);
  for (int32_t token : r.params.stop_token_ids) hold(token);
}

void EngineCore::penalty_entries(Request& r, int32_t row, std::vector<ops::LogitPenalty>* out) {
  // The tokens since the last penalized step into the request's counts (a recompute after
  // preemption changes no token, so the counts stay right).
  for (; r.num_seen < int32_t(r.tokens.size()); ++r.num_seen) {
    auto& [generated, in_prompt] = r.seen_tokens[r.tokens[size_t(r.num_seen)]];
    if (r.num_seen < r.num_prompt) in_prompt = true;
    else ++generated;
  }
  const SamplingParams& sp = r.params.sampling;
  const auto bias_of = [&](int32_t token) {  // (logit_bias is sorted by token)
    const auto it = std::lower_bound(sp.logit_bias.begin(), sp.logit_bias.end(), std::make_pair(token, -INFINITY));
    return it != sp.logit_bias.end() && it->first == token ? it->second : 0.0f;
  };
  const auto entry = [&](int32_t token) {
    ops::LogitPenalty p;
    p.row = row;
    p.token = token;
    p.presence = sp.presence_penalty;
    p.frequency = sp.frequency_penalty;
    p.repetition = sp.repetition_penalty;
    p.bias = bias_of(token);
    return p;
  };
  // A seen token nothing penalizes: a prompt token without a repetition penalty.
  const auto inert = [&](const std::pair<int32_t, bool>& seen) {
    return seen.first == 0 && sp.repetition_penalty == 1.0f;
  };
  for (const auto& [token, seen] : r.seen_tokens) {
    if (inert(seen)) continue;
    ops::LogitPenalty p = entry(token);
    p.output_count = seen.first;
    p.in_prompt = seen.second ? 1 : 0;
    out->push_back(p);
  }
  // The biased tokens without an entry above (an entry a (row, token)).
  for (const auto& [token, bias] : sp.logit_bias) {
    const auto it = r.seen_tokens.find(token);
    if (it == r.seen_tokens.end() || inert(it->second)) out->push_back(entry(token));
  }
}

bool EngineCore::step() {
  ScheduledStep s = prepare();
  if (s.empty()) return false;
  execute(s);
  return true;
}

EngineStats EngineCore::stats() const {
  EngineStats s;
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    s = stats_;
  }
  std::lock_guard<std::mutex> lock(inbox_mutex_);
  s.waiting += int64_t(inbox_.size());
  return s;
}

void EngineCore::publish_queue_stats() {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  stats_.running = int64_t(scheduler_.num_running());
  stats_.waiting = int64_t(scheduler_.num_waiting());
  stats_.kv_usage = scheduler_.kv_usage();
  stats_.free_pages = pages_.num_free();
  stats_.preemptions = scheduler_.num_preemptions();
}

}  // namespace dsv4::engine
