#include "engine/model_runner.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"
#include "engine/stage_lanes.h"

namespace dsv4::engine {

using core::DType;

int64_t cache_pages_that_fit(uint64_t free, uint64_t reserve, uint64_t slot_bytes, uint64_t page_bytes, int64_t most) {
  const uint64_t taken = reserve + slot_bytes;
  if (free < taken) return 0;
  if (page_bytes == 0) return most;  // (a model without compressed layers: pages cost nothing)
  return int64_t(std::min<uint64_t>((free - taken) / page_bytes, uint64_t(std::max<int64_t>(most, 0))));
}

ModelRunner::ModelRunner(const model::ModelConfig& config, const model::ModelWeights& weights, ops::Backend& backend,
                         const RunnerOptions& options, model::MoeExecutor* moe)
    : config_(config), backend_(backend), options_(options) {
  options_.cache.window = config.sliding_window;
  options_.cache.head_dim = config.head_dim;
  options_.cache.index_head_dim = config.index_head_dim;
  options_.cache.rope_dim = config.qk_rope_head_dim;
  DSV4_CHECK(options_.cache.num_slots > 0 && options_.cache.num_pages > 0, "runner needs state slots and pages");
  model_ = std::make_unique<model::Transformer>(config, weights, backend);
  if (moe == nullptr) {
    local_moe_ = std::make_unique<model::LocalMoeExecutor>(backend);
    moe = local_moe_.get();
  }
  moe_ = moe;
  // The step's buffers, and the caches: the caches first (checked against the free memory
  // before any of it is allocated: a clear error, not an allocation failure part way through
  // or, on the host, the kernel's OOM killer), unless their pages come from what is free after
  // the buffers.
  const auto allocate_step_buffers = [&] {
    buffers_ = model_->allocate_buffers(options_.max_tokens_per_step, options_.max_logit_rows, 0);
    const int64_t cap = options_.max_tokens_per_step;
    const int64_t seqs = std::max<int64_t>(options_.max_seqs_per_step, options_.use_graphs ? cap : 0);
    mtp_input_ = backend.empty(DType::kBF16, {cap, config.hc_mult, config.hidden_size});
    // The step's metadata arrays, its logits rows and its token choices as fixed regions of one
    // buffer (graphs hold their addresses), in upload_metadata's order, so a step uploads them in
    // one copy. Each region starts 256 bytes in, as a buffer of its own would. The block table,
    // the largest, comes last: the copy ends at its last entry.
    const int64_t L = options_.max_logit_rows;
    const int64_t sizes[kMetadataRegions] = {cap,  cap,  cap, seqs, seqs, seqs, seqs,
                                             L, L * ops::kTokenChoiceWords, seqs * options_.max_blocks_per_seq};
    int64_t end = 0;
    for (int i = 0; i < kMetadataRegions; ++i) {
      metadata_offset_[i] = end;
      end += (sizes[i] + 63) / 64 * 64;
    }
    // DSV4_SEPARATE_METADATA=1 (memcheck runs): each array in a buffer of its own, exactly its
    // size, uploaded on its own, so compute-sanitizer sees a kernel read past one array (as
    // regions, it reads the next one's bytes).
    separate_metadata_ = [] {
      const char* v = std::getenv("DSV4_SEPARATE_METADATA");
      return v != nullptr && std::string(v) == "1";
    }();
    if (!separate_metadata_) metadata_ = backend.empty(DType::kI32, {end});
    const auto region = [&](int i, std::initializer_list<int64_t> shape) {
      if (separate_metadata_) return backend.empty(DType::kI32, shape);
      return core::Tensor(metadata_.as<int32_t>() + metadata_offset_[i], DType::kI32, shape, backend.device(),
                          metadata_.owner());
    };
    const auto arrays = metadata_arrays();
    for (int i = 0; i < kMetadataRegions; ++i)
      *arrays[size_t(i)] = i == kChoicesRegion ? region(i, {L, ops::kTokenChoiceWords}) : region(i, {sizes[i]});
    token_ids_out_ = backend.empty(DType::kI32, {L});
    token_logprob_records_ = backend.empty(DType::kI32, {L, ops::kTokenLogprobWords});
  };
  if (options_.cache_pages_from_free_memory) allocate_step_buffers();

  // One extra state slot that padded graph steps point their empty sequences at.
  ops::CacheGeometry geometry = options_.cache;
  geometry.num_slots += 1;
  const std::optional<uint64_t> free = backend.memory_available();
  const char* where = backend.device() == core::Device::kCuda ? "GPU" : "host";
  if (options_.cache_pages_from_free_memory) {
    if (!free) core::fail("--kv-cache-memory auto: the {} backend does not report its free memory", backend.name());
    ops::CacheGeometry one_page = geometry, slots_only = geometry;
    one_page.num_slots = 0;
    one_page.num_pages = 1;
    slots_only.num_pages = 0;
    const uint64_t slots = model_->cache_bytes(slots_only);
    const int64_t fit = cache_pages_that_fit(*free, options_.cache_memory_reserve, slots,
                                             model_->cache_bytes(one_page), geometry.num_pages);
    if (fit < options_.max_blocks_per_seq)
      core::fail(
          "--kv-cache-memory auto: {:.2f} GB are free on the {} after the weights and the step's buffers; less the "
          "reserve of {:.2f} GB (--kv-cache-reserve) and {:.2f} GB for {} state slots, that leaves room for {} pages "
          "of {} tokens, fewer than one sequence of --max-model-len takes ({} pages); lower --max-model-len, "
          "--max-num-seqs or --kv-cache-reserve",
          double(*free) / 1e9, where, double(options_.cache_memory_reserve) / 1e9, double(slots) / 1e9,
          geometry.num_slots, fit, ops::kPageTokens, options_.max_blocks_per_seq);
    geometry.num_pages = options_.cache.num_pages = fit;
  }
  const uint64_t cache = model_->cache_bytes(geometry);
  if (free && cache > *free)
    core::fail(
        "the KV cache ({} pages of {} tokens, {} state slots, {} layers) takes {:.2f} GB and {:.2f} GB are free on the "
        "{}; give it fewer pages or sequences (serve: --kv-cache-memory, --kv-cache-pages, --max-num-seqs, "
        "--max-model-len; bench decode: --batch, --context)",
        geometry.num_pages, ops::kPageTokens, geometry.num_slots, model_->num_cache_layers(), double(cache) / 1e9,
        double(*free) / 1e9, where);
  caches_ = model_->allocate_caches(geometry);
  if (!options_.cache_pages_from_free_memory) allocate_step_buffers();
}

std::array<core::Tensor*, ModelRunner::kMetadataRegions> ModelRunner::metadata_arrays() {
  return {&token_ids_, &positions_,     &token_seq_, &seq_begin_,           &seq_len_,
          &seq_start_pos_, &seq_slot_, &buffers_->logit_rows, &token_choices_, &block_table_};
}

ops::BatchView ModelRunner::upload_metadata(const StepMetadata& m, const std::vector<ops::TokenChoice>* choices) {
  const int32_t T = m.num_tokens(), S = m.num_seqs();
  DSV4_CHECK(T <= options_.max_tokens_per_step, "step has {} tokens, the runner holds {}", T,
             options_.max_tokens_per_step);
  DSV4_CHECK(S <= seq_begin_.size(0), "step has {} sequences, the runner holds {}", S, seq_begin_.size(0));
  DSV4_CHECK(m.max_blocks <= options_.max_blocks_per_seq, "step needs {} pages per sequence, the runner holds {}",
             m.max_blocks, options_.max_blocks_per_seq);
  DSV4_CHECK(int64_t(m.logit_rows.size()) <= options_.max_logit_rows, "step wants {} logits rows, the runner holds {}",
             m.logit_rows.size(), options_.max_logit_rows);
  DSV4_CHECK(choices == nullptr || choices->size() <= m.logit_rows.size(),
             "step has {} token choices for {} logits rows", choices ? choices->size() : 0, m.logit_rows.size());
  // One host copy of the regions up to the block table's last entry, one upload: ten small
  // copies each cost a host call and a DMA the step's first kernel waits behind.
  DSV4_CHECK(int64_t(m.block_table.size()) <= block_table_.size(0), "step has {} block-table entries, the runner holds {}",
             m.block_table.size(), block_table_.size(0));
  const size_t used = size_t(metadata_offset_[kBlockTableRegion]) + m.block_table.size();
  metadata_host_.resize(used);
  int32_t* h = metadata_host_.data();
  const auto put = [&](int region, const std::vector<int32_t>& v, size_t n) {
    std::copy(v.begin(), v.begin() + int64_t(n), h + metadata_offset_[region]);
  };
  put(0, m.token_ids, size_t(T));
  put(1, m.positions, size_t(T));
  put(2, m.token_seq, size_t(T));
  put(3, m.seq_begin, size_t(S));
  put(4, m.seq_len, size_t(S));
  put(5, m.seq_start_pos, size_t(S));
  put(6, m.seq_slot, size_t(S));
  put(kLogitRowsRegion, m.logit_rows, m.logit_rows.size());
  if (choices != nullptr && !choices->empty())
    std::memcpy(h + metadata_offset_[kChoicesRegion], choices->data(), choices->size() * sizeof(ops::TokenChoice));
  put(kBlockTableRegion, m.block_table, m.block_table.size());
  if (separate_metadata_) {
    const auto arrays = metadata_arrays();
    const size_t n[kMetadataRegions] = {size_t(T), size_t(T), size_t(T), size_t(S), size_t(S), size_t(S), size_t(S),
                                        m.logit_rows.size(),
                                        choices ? choices->size() * size_t(ops::kTokenChoiceWords) : 0,
                                        m.block_table.size()};
    for (int i = 0; i < kMetadataRegions; ++i)
      if (n[i] > 0) backend_.upload(*arrays[size_t(i)], h + metadata_offset_[i], n[i] * 4);
  } else {
    backend_.upload(metadata_, h, used * 4);
  }
  ops::BatchView v;
  v.num_tokens = T;
  v.num_seqs = S;
  v.max_blocks = m.max_blocks;
  v.max_seq_len = m.max_seq_len();
  v.token_ids = token_ids_.as<int32_t>();
  v.positions = positions_.as<int32_t>();
  v.token_seq = token_seq_.as<int32_t>();
  v.seq_begin = seq_begin_.as<int32_t>();
  v.seq_len = seq_len_.as<int32_t>();
  v.seq_start_pos = seq_start_pos_.as<int32_t>();
  v.seq_slot = seq_slot_.as<int32_t>();
  v.block_table = block_table_.as<int32_t>();
  return v;
}

void ModelRunner::download_logits(int64_t rows, std::vector<float>* logits) {
  if (logits == nullptr) return;
  logits->resize(size_t(rows * config_.vocab_size));
  backend_.download(logits->data(), buffers_->logits.rows(0, rows), logits->size() * sizeof(float));
}

int32_t ModelRunner::decode_bucket(int32_t rows) const {
  if (!options_.use_graphs || !moe_->graph_capturable() || rows <= 0) return 0;
  for (int32_t b : options_.graph_buckets)
    if (b >= rows && b <= options_.max_tokens_per_step && b <= options_.max_logit_rows) return b;
  return 0;
}

int32_t ModelRunner::graph_bucket(const StepMetadata& meta, int32_t min_rows) const {
  const int32_t T = meta.num_tokens();
  if (meta.num_seqs() != T || int32_t(meta.logit_rows.size()) != T) return 0;  // decode steps only
  return decode_bucket(std::max(T, min_rows));
}

void ModelRunner::step(const StepMetadata& meta, std::vector<float>* logits, std::vector<uint16_t>* hidden,
                       bool allow_graph, int32_t min_graph_rows) {
  const int64_t R = launch_step(meta, hidden != nullptr, allow_graph, min_graph_rows);
  download_logits(R, logits);
  if (hidden != nullptr) {
    const core::Tensor X = buffers_->X.rows(0, meta.num_tokens());
    hidden->resize(X.nbytes() / 2);
    backend_.download(hidden->data(), X, X.nbytes());
  }
  backend_.synchronize();
}

const float* ModelRunner::step_tokens(const StepMetadata& meta, const std::vector<ops::TokenChoice>& choices,
                                      std::vector<int32_t>* tokens, const std::vector<int32_t>& full_rows,
                                      bool allow_graph, int32_t min_graph_rows,
                                      std::vector<ops::TokenLogprobRecord>* logprob_records,
                                      const std::vector<ops::LogitPenalty>* penalties) {
  const int64_t R = int64_t(meta.logit_rows.size());
  DSV4_CHECK(int64_t(choices.size()) == R, "step_tokens: {} token choices for {} logits rows", choices.size(), R);
  const bool logprobs =
      std::any_of(choices.begin(), choices.end(), [](const ops::TokenChoice& c) { return c.logprobs >= 0; });
  DSV4_CHECK(!logprobs || logprob_records, "step_tokens: choices ask for log-probabilities and no records are taken");
  for (const ops::TokenChoice& c : choices)
    DSV4_CHECK(c.given_token < config_.vocab_size, "step_tokens: a given token {} outside the vocabulary of {}",
               c.given_token, config_.vocab_size);
  const int64_t E = penalties ? int64_t(penalties->size()) : 0;
  for (int64_t e = 0; e < E; ++e) {
    const ops::LogitPenalty& p = (*penalties)[size_t(e)];
    DSV4_CHECK(p.row >= 0 && p.row < R && p.token >= 0 && p.token < config_.vocab_size,
               "step_tokens: a penalty for token {} of logits row {} ({} rows of {} tokens)", p.token, p.row, R,
               config_.vocab_size);
  }
  launch_step(meta, false, allow_graph, min_graph_rows, &choices);  // the choices go up with the metadata
  tokens->resize(size_t(R));
  if (E > 0) {
    if (logit_penalties_.numel() < E * ops::kLogitPenaltyWords)  // (grown by doubling; not in any graph)
      logit_penalties_ = backend_.empty(core::DType::kI32,
                                        {std::max<int64_t>(E, logit_penalties_.numel() / ops::kLogitPenaltyWords * 2),
                                         ops::kLogitPenaltyWords});
    backend_.upload(logit_penalties_, penalties->data(), size_t(E) * sizeof(ops::LogitPenalty));
    backend_.penalize_logits(buffers_->logits.rows(0, R), logit_penalties_.rows(0, E));
  }
  if (R > 0) {
    backend_.choose_tokens(buffers_->logits.rows(0, R), token_choices_.rows(0, R), token_ids_out_.rows(0, R));
    if (logprobs)
      backend_.token_logprobs(buffers_->logits.rows(0, R), token_choices_.rows(0, R), token_ids_out_.rows(0, R),
                              token_logprob_records_.rows(0, R));
    backend_.download(tokens->data(), token_ids_out_, size_t(R) * 4);
    if (logprobs) {
      logprob_records->resize(size_t(R));
      backend_.download(logprob_records->data(), token_logprob_records_, size_t(R) * sizeof(ops::TokenLogprobRecord));
    }
  }
  // The whole rows asked for, a copy per run of consecutive rows.
  const size_t V = size_t(config_.vocab_size);
  float* logits = full_rows.empty() ? nullptr : whole_rows_buffer();
  DSV4_CHECK(int64_t(full_rows.size()) <= R, "step_tokens: {} whole rows of {}", full_rows.size(), R);
  for (size_t k = 0; k < full_rows.size();) {
    size_t n = 1;
    while (k + n < full_rows.size() && full_rows[k + n] == full_rows[k] + int32_t(n)) ++n;
    DSV4_CHECK(full_rows[k] >= 0 && full_rows[k] + int64_t(n) <= R, "step_tokens: logits rows {}..{} of {}",
               full_rows[k], full_rows[k] + int64_t(n), R);
    backend_.download(logits + k * V, buffers_->logits.rows(full_rows[k], int64_t(n)), n * V * sizeof(float));
    k += n;
  }
  backend_.synchronize();
  return logits;
}

float* ModelRunner::whole_rows_buffer() {
  if (!logits_host_)
    logits_host_ = backend_.host_buffer(size_t(options_.max_logit_rows) * size_t(config_.vocab_size) * sizeof(float));
  return static_cast<float*>(logits_host_.get());
}

int64_t ModelRunner::launch_step(const StepMetadata& meta, bool keep_hidden, bool allow_graph,
                                 int32_t min_graph_rows, const std::vector<ops::TokenChoice>* choices) {
  const int64_t R = int64_t(meta.logit_rows.size());
  const int32_t bucket = !keep_hidden && allow_graph && !observer_ ? graph_bucket(meta, min_graph_rows) : 0;
  if (bucket > 0) {
    // Pad to the bucket: pad rows and empty sequences at the reserved slot,
    // a fixed block-table stride, logits rows for every row.
    StepMetadata padded = meta;
    while (padded.num_tokens() < bucket) {
      padded.token_ids.push_back(0);
      padded.positions.push_back(-1);
      padded.token_seq.push_back(-1);
    }
    std::vector<int32_t> table;
    for (int32_t s = 0; s < meta.num_seqs(); ++s)
      for (int32_t b = 0; b < options_.max_blocks_per_seq; ++b)
        table.push_back(b < meta.max_blocks ? meta.block_table[size_t(s * meta.max_blocks + b)] : -1);
    padded.max_blocks = options_.max_blocks_per_seq;
    while (padded.num_seqs() < bucket) {
      padded.seq_begin.push_back(padded.num_tokens());
      padded.seq_len.push_back(0);
      padded.seq_start_pos.push_back(0);
      padded.seq_slot.push_back(pad_slot());
      for (int32_t b = 0; b < options_.max_blocks_per_seq; ++b) table.push_back(-1);
    }
    padded.block_table = std::move(table);
    while (int32_t(padded.logit_rows.size()) < bucket) padded.logit_rows.push_back(0);
    const ops::BatchView batch = upload_metadata(padded, choices);
    // A graph replays the host values of its capture's view; graph_bucket takes decode
    // steps only, so every replay of a bucket has sequences of at most one token.
    DSV4_CHECK(batch.max_seq_len <= 1, "a graph step holds a sequence of {} tokens", batch.max_seq_len);
    auto it = graphs_.find(bucket);
    if (it == graphs_.end()) {
      // First step of this bucket: run it eagerly (also sizes every scratch
      // buffer), then record the same program for the next ones.
      model::StageProgram program = model_->step_program(*buffers_, batch, bucket, caches_, *moe_);
      run_on_lanes(program, backend_);
      const ops::Backend::CaptureInfo info{.rows = bucket};
      graphs_[bucket] = backend_.capture([this, program] { run_on_lanes(program, backend_); }, info);
    } else {
      it->second->replay();
    }
    return R;
  }
  const ops::BatchView batch = upload_metadata(meta, choices);
  model::StageProgram program = model_->step_program(*buffers_, batch, R, caches_, *moe_);
  if (observer_) model::run_in_order(program, [&](const model::Stage& s, bool after) { observer_(meta, s, after); });
  else run_on_lanes(program, backend_);
  return R;
}

void ModelRunner::step_eager_with_hook(const StepMetadata& meta,
                                       const std::function<void(const model::Stage&, bool)>& on_stage) {
  const ops::BatchView batch = upload_metadata(meta);
  const int64_t R = int64_t(meta.logit_rows.size());
  model::StageProgram program = model_->step_program(*buffers_, batch, R, caches_, *moe_);
  model::run_in_order(program, on_stage);
  backend_.synchronize();
}

WarmUpReport ModelRunner::warm_up(bool prefill) {
  WarmUpReport report;
  report.free_before = backend_.memory_available();
  const auto start = std::chrono::steady_clock::now();
  // Each step under its name: an allocation that fails here is the reserve's shortfall.
  const auto run = [&](const std::string& what, const std::function<void()>& body) {
    try {
      body();
    } catch (const std::exception& e) {
      const std::string hint =
          options_.cache_pages_from_free_memory
              ? fmt::format(" (--kv-cache-memory auto left {:.2f} GB beside the KV cache for the step's scratch and "
                            "graphs: raise --kv-cache-reserve)",
                            double(options_.cache_memory_reserve) / 1e9)
              : std::string();
      core::fail("warming up the engine, {}: {}{}", what, e.what(), hint);
    }
  };
  const int32_t slot = pad_slot();
  if (prefill) {
    // One sequence as long as a step, the pages and the positions allow.
    const int64_t most = std::min<int64_t>({int64_t(options_.max_tokens_per_step),
                                            int64_t(options_.max_blocks_per_seq) * ops::kPageTokens,
                                            options_.cache.num_pages * ops::kPageTokens,
                                            config_.max_position_embeddings});
    const int32_t T = int32_t(std::max<int64_t>(most, 0));
    if (T > 0) {
      std::vector<int32_t> tokens(static_cast<size_t>(T)), pages;
      for (int32_t i = 0; i < T; ++i) tokens[size_t(i)] = int32_t((int64_t(i) * 7919) % config_.vocab_size);
      for (int64_t p = 0; p * ops::kPageTokens < T; ++p) pages.push_back(int32_t(p));
      SequenceSlice s;
      s.state_slot = slot;
      s.tokens = tokens.data();
      s.num_tokens = T;
      s.block_table = &pages;
      s.want_logits = true;
      run(fmt::format("a prefill step of {} tokens", T), [&] { step(build_step_metadata({s}), nullptr, nullptr, false); });
      report.prefill_tokens = T;
    }
  }
  std::vector<int32_t> buckets;
  for (int32_t b : options_.graph_buckets)
    if (decode_bucket(b) == b) buckets.push_back(b);
  std::sort(buckets.rbegin(), buckets.rend());
  buckets.erase(std::unique(buckets.begin(), buckets.end()), buckets.end());
  const std::vector<int32_t> first_page = {0};
  const int32_t token = 0;
  for (int32_t b : buckets) {
    // One sequence at position 0 (it emits no compressed row into its page), padded to
    // the bucket: the same shapes and host values as every replay.
    SequenceSlice s;
    s.state_slot = slot;
    s.tokens = &token;
    s.num_tokens = 1;
    s.block_table = &first_page;
    s.want_logits = true;
    run(fmt::format("recording the decode graph of {} rows", b),
        [&] { step(build_step_metadata({s}), nullptr, nullptr, true, b); });
    report.graph_buckets.push_back(b);
  }
  // Loads choose_tokens' and token_logprobs' kernels (CUDA loads a module at its first launch)
  // on the last step's first logits row, by every path a sampled row takes.
  ops::TokenChoice sampled;
  sampled.temperature = 1.0f;
  sampled.top_k = 2;
  sampled.top_p = 0.5f;
  sampled.logprobs = 2;
  int32_t chosen = 0;
  run("choosing a token", [&] {
    backend_.upload(token_choices_, &sampled, sizeof(sampled));
    backend_.choose_tokens(buffers_->logits.rows(0, 1), token_choices_.rows(0, 1), token_ids_out_.rows(0, 1));
    backend_.token_logprobs(buffers_->logits.rows(0, 1), token_choices_.rows(0, 1), token_ids_out_.rows(0, 1),
                            token_logprob_records_.rows(0, 1));
    backend_.download(&chosen, token_ids_out_, 4);
    backend_.synchronize();
  });
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  report.free_after = backend_.memory_available();
  return report;
}

std::vector<double> ModelRunner::time_graph_replays(const StepMetadata& meta, int warmup, int iters) {
  const int32_t bucket = graph_bucket(meta, 0);
  DSV4_CHECK(bucket == meta.num_tokens(), "time_graph_replays needs a decode step of exactly a bucket's size "
             "({} rows) with graphs enabled", meta.num_tokens());
  step(meta, nullptr);  // records the graph if this bucket has none yet
  auto& graph = *graphs_.at(bucket);
  for (int i = 0; i < warmup; ++i) graph.replay();
  auto timer = backend_.make_timer();
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    timer->start();
    graph.replay();
    timer->stop();
    ms.push_back(timer->elapsed_ms());
  }
  return ms;
}

void ModelRunner::replay_graph(const StepMetadata& meta) {
  const int32_t bucket = graph_bucket(meta, 0);
  const auto it = graphs_.find(bucket);
  DSV4_CHECK(it != graphs_.end() && it->second != nullptr,
             "replay_graph: no graph recorded for the {}-row bucket (time_graph_replays records it)", bucket);
  it->second->replay();
}

std::vector<double> ModelRunner::time_eager_steps(const StepMetadata& meta, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) step(meta, nullptr, nullptr, false);
  auto timer = backend_.make_timer();
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    timer->start();
    step(meta, nullptr, nullptr, false);
    timer->stop();
    ms.push_back(timer->elapsed_ms());
  }
  return ms;
}

void ModelRunner::mtp_step(const StepMetadata& meta, const std::vector<uint16_t>& hidden, std::vector<float>* logits) {
  const ops::BatchView batch = upload_metadata(meta);
  const int64_t R = int64_t(meta.logit_rows.size());
  const core::Tensor X_main = mtp_input_.rows(0, batch.num_tokens);
  DSV4_CHECK(hidden.size() * 2 == X_main.nbytes(), "MTP input of {} values for {} rows", hidden.size(),
             batch.num_tokens);
  backend_.upload(X_main, hidden.data(), X_main.nbytes());
  model::StageProgram program = model_->mtp_program(*buffers_, X_main, batch, R, caches_, *moe_);
  run_on_lanes(program, backend_);
  download_logits(R, logits);
  backend_.synchronize();
}

}  // namespace dsv4::engine
