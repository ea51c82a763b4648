#include "engine/model_runner.h"

#include "core/error.h"

namespace dsv4::engine {

using core::DType;

ModelRunner::ModelRunner(const model::ModelConfig& config, const model::ModelWeights& weights, ops::Backend& backend,
                         const RunnerOptions& options, model::MoeExecutor* moe)
    : config_(config), backend_(backend), options_(options) {
  options_.cache.window = config.sliding_window;
  options_.cache.head_dim = config.head_dim;
  options_.cache.index_head_dim = config.index_head_dim;
  DSV4_CHECK(options_.cache.num_slots > 0 && options_.cache.num_pages > 0, "runner needs state slots and pages");
  model_ = std::make_unique<model::Transformer>(config, weights, backend);
  if (moe == nullptr) {
    local_moe_ = std::make_unique<model::LocalMoeExecutor>(backend);
    moe = local_moe_.get();
  }
  moe_ = moe;
  caches_ = model_->allocate_caches(options_.cache);
  buffers_ = model_->allocate_buffers(options_.max_tokens_per_step, options_.max_logit_rows, 0);
  const int64_t cap = options_.max_tokens_per_step, seqs = options_.max_seqs_per_step;
  mtp_input_ = backend.empty(DType::kBF16, {cap, config.hc_mult, config.hidden_size});
  token_ids_ = backend.empty(DType::kI32, {cap});
  positions_ = backend.empty(DType::kI32, {cap});
  token_seq_ = backend.empty(DType::kI32, {cap});
  seq_begin_ = backend.empty(DType::kI32, {seqs});
  seq_len_ = backend.empty(DType::kI32, {seqs});
  seq_start_pos_ = backend.empty(DType::kI32, {seqs});
  seq_slot_ = backend.empty(DType::kI32, {seqs});
  block_table_ = backend.empty(DType::kI32, {seqs * options_.max_blocks_per_seq});
}

ops::BatchView ModelRunner::upload_metadata(const StepMetadata& m) {
  const int32_t T = m.num_tokens(), S = m.num_seqs();
  DSV4_CHECK(T <= options_.max_tokens_per_step, "step has {} tokens, the runner holds {}", T,
             options_.max_tokens_per_step);
  DSV4_CHECK(S <= options_.max_seqs_per_step, "step has {} sequences, the runner holds {}", S,
             options_.max_seqs_per_step);
  DSV4_CHECK(m.max_blocks <= options_.max_blocks_per_seq, "step needs {} pages per sequence, the runner holds {}",
             m.max_blocks, options_.max_blocks_per_seq);
  DSV4_CHECK(int64_t(m.logit_rows.size()) <= options_.max_logit_rows, "step wants {} logits rows, the runner holds {}",
             m.logit_rows.size(), options_.max_logit_rows);
  backend_.upload(token_ids_, m.token_ids.data(), size_t(T) * 4);
  backend_.upload(positions_, m.positions.data(), size_t(T) * 4);
  backend_.upload(token_seq_, m.token_seq.data(), size_t(T) * 4);
  backend_.upload(seq_begin_, m.seq_begin.data(), size_t(S) * 4);
  backend_.upload(seq_len_, m.seq_len.data(), size_t(S) * 4);
  backend_.upload(seq_start_pos_, m.seq_start_pos.data(), size_t(S) * 4);
  backend_.upload(seq_slot_, m.seq_slot.data(), size_t(S) * 4);
  backend_.upload(block_table_, m.block_table.data(), m.block_table.size() * 4);
  backend_.upload(buffers_->logit_rows, m.logit_rows.data(), m.logit_rows.size() * 4);
  ops::BatchView v;
  v.num_tokens = T;
  v.num_seqs = S;
  v.max_blocks = m.max_blocks;
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

void ModelRunner::step(const StepMetadata& meta, std::vector<float>* logits, std::vector<uint16_t>* hidden) {
  const ops::BatchView batch = upload_metadata(meta);
  const int64_t R = int64_t(meta.logit_rows.size());
  model::StageProgram program = model_->step_program(*buffers_, batch, R, caches_, *moe_);
  model::run_in_order(program);
  download_logits(R, logits);
  if (hidden != nullptr) {
    const core::Tensor X = buffers_->X.rows(0, batch.num_tokens);
    hidden->resize(X.nbytes() / 2);
    backend_.download(hidden->data(), X, X.nbytes());
  }
  backend_.synchronize();
}

void ModelRunner::mtp_step(const StepMetadata& meta, const std::vector<uint16_t>& hidden, std::vector<float>* logits) {
  const ops::BatchView batch = upload_metadata(meta);
  const int64_t R = int64_t(meta.logit_rows.size());
  const core::Tensor X_main = mtp_input_.rows(0, batch.num_tokens);
  DSV4_CHECK(hidden.size() * 2 == X_main.nbytes(), "MTP input of {} values for {} rows", hidden.size(),
             batch.num_tokens);
  backend_.upload(X_main, hidden.data(), X_main.nbytes());
  model::StageProgram program = model_->mtp_program(*buffers_, X_main, batch, R, caches_, *moe_);
  model::run_in_order(program);
  download_logits(R, logits);
  backend_.synchronize();
}

}  // namespace dsv4::engine
