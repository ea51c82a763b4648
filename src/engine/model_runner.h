// Runs steps of the model on one rank: owns the layer caches, one micro-batch's
// buffers and the device copy of the step metadata (at fixed addresses).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "engine/step_metadata.h"
#include "model/moe_executor.h"
#include "model/transformer.h"
#include "ops/backend.h"

namespace dsv4::engine {

struct RunnerOptions {
  int32_t max_tokens_per_step = 512;
  int32_t max_seqs_per_step = 64;
  int32_t max_logit_rows = 64;
  int32_t max_blocks_per_seq = 16;   // pages per sequence: max context = 256 * this
  ops::CacheGeometry cache;          // num_slots, num_pages (window/dims filled from the config)
  // Pages from the memory free once the weights and the step's buffers are allocated
  // (serve --kv-cache-memory auto): as many as fit in it less `cache_memory_reserve` (the
  // step's scratch and graphs) and the state slots, at most cache.num_pages; fails if that
  // is less than one sequence of max_blocks_per_seq pages. options() then holds the count.
  bool cache_pages_from_free_memory = false;
  uint64_t cache_memory_reserve = 0;
  // Decode steps (one token per sequence) replay one captured graph per bucket
  // of padded batch size (ascending); other steps run eagerly. Pad rows route to no
  // expert and attend nothing, but run the dense GEMMs and the LM head, which are
  // compute-bound from ~64 rows: above 32 the buckets are at most 25% apart (129 rows
  // ran 256 with powers of two only; now 160), below it powers of two.
  bool use_graphs = false;
  std::vector<int32_t> graph_buckets = {1,   2,   4,   8,   16,  32,  48,  64,  80,  96,  112,
                                        128, 160, 192, 224, 256, 320, 384, 448, 512};
};

// What ModelRunner::warm_up ran before the first request, and the memory it took.
struct WarmUpReport {
  int32_t prefill_tokens = 0;          // the eager prefill step's tokens (0: none ran)
  std::vector<int32_t> graph_buckets;  // decode graphs recorded, largest first
  double seconds = 0;
  std::optional<uint64_t> free_before, free_after;  // the backend's free memory around it
};

// The pages of `page_bytes` that fit in `free` bytes less `reserve` and `slot_bytes` (the
// state slots), at most `most` (RunnerOptions::cache_pages_from_free_memory); 0 if none do.
int64_t cache_pages_that_fit(uint64_t free, uint64_t reserve, uint64_t slot_bytes, uint64_t page_bytes, int64_t most);

class ModelRunner {
 public:
  // `moe` may be null: every expert is local.
  ModelRunner(const model::ModelConfig& config, const model::ModelWeights& weights, ops::Backend& backend,
              const RunnerOptions& options, model::MoeExecutor* moe = nullptr);

  const RunnerOptions& options() const { return options_; }
  model::Transformer& model() { return *model_; }
  ops::Backend& backend() { return backend_; }

  // One main-model step. `logits` receives [meta.logit_rows.size(), V] floats;
  // `hidden`, if given, the final hyper-streams of every row (bf16 bits, [T, hc, D]).
  // allow_graph = false forces the eager path (data-parallel ranks must agree on
  // graph vs eager: whether a collective is captured must be uniform).
  // min_graph_rows: replay a bucket of at least this many rows (data-parallel
  // ranks replay the bucket of the step's DP max, also with 0 rows of their own).
  void step(const StepMetadata& meta, std::vector<float>* logits, std::vector<uint16_t>* hidden = nullptr,
            bool allow_graph = true, int32_t min_graph_rows = 0);
  // A step for serving: the token of every logits row, chosen on the backend
  // (Backend::choose_tokens: `choices` holds a row's TokenChoice each, in meta.logit_rows'
  // order; only the ids cross to the host) into `tokens`, and only the whole rows listed in
  // `full_rows` (indices into meta.logit_rows, ascending; the rows that return their logits),
  // in that order, into the runner's host buffer (Backend::host_buffer: page-locked on CUDA),
  // which the next step overwrites: the returned pointer (null without full rows). Where a
  // choice asks for log-probabilities (TokenChoice::logprobs >= 0), its row's record
  // (Backend::token_logprobs) into (*logprob_records)[row], the other rows' records undefined.
  // `penalties` (rows: indices into meta.logit_rows) are applied to the logits first
  // (Backend::penalize_logits), so the tokens, records and whole rows are of the penalized rows.
  // Otherwise as step().
  const float* step_tokens(const StepMetadata& meta, const std::vector<ops::TokenChoice>& choices,
                           std::vector<int32_t>* tokens, const std::vector<int32_t>& full_rows,
                           bool allow_graph = true, int32_t min_graph_rows = 0,
                           std::vector<ops::TokenLogprobRecord>* logprob_records = nullptr,
                           const std::vector<ops::LogitPenalty>* penalties = nullptr);
  // Runs, before the first request, the steps whose first run would otherwise come in the
  // middle of serving: with `prefill`, one eager step of the most tokens a step holds (one
  // sequence: it grows the step's scratch before any graph is recorded); then, with graphs,
  // one decode step of each bucket, largest first, which records the bucket's graph (a
  // recording holds up every sequence of its step), and one choice of a token.
  // The steps write only the padding slot and the first pages of the pool, which no sequence
  // holds yet and a sequence reads only after writing. Data-parallel ranks whose steps
  // exchange call it together, like a step. Fails naming the step (and, with
  // cache_pages_from_free_memory, the reserve it outgrew).
  WarmUpReport warm_up(bool prefill);
  // The bucket step() would replay for a decode-only step of `rows` rows (0: none).
  int32_t decode_bucket(int32_t rows) const;
  // Runs every stage of one step eagerly, calling `on_stage(stage, after)` before
  // (after = false) and after (after = true) each (benchmark breakdowns). No
  // logits are downloaded.
  void step_eager_with_hook(const StepMetadata& meta,
                            const std::function<void(const model::Stage&, bool after)>& on_stage);
  // Debugging (tests that locate where two backends part): while an observer is
  // set, every step() runs eagerly and calls it before and after each stage.
  using StageObserver = std::function<void(const StepMetadata&, const model::Stage&, bool after)>;
  void set_stage_observer(StageObserver observer) { observer_ = std::move(observer); }
  // Benchmarks: the step's graph (recorded on first use, like step()) replayed
  // `warmup` times, then `iters` times with each replay timed on the device.
  std::vector<double> time_graph_replays(const StepMetadata& meta, int warmup, int iters);
  // One more replay of the graph time_graph_replays recorded for meta's bucket, on the
  // inputs it left (probes that look inside a replay); fails if there is none.
  void replay_graph(const StepMetadata& meta);
  // Buffers of the micro-batch (benchmarks read router ids from them).
  model::MicroBatchBuffers& buffers() { return *buffers_; }
  std::vector<ops::LayerCache>& caches() { return caches_; }
  int32_t pad_slot() const { return int32_t(options_.cache.num_slots); }
  size_t num_graphs() const { return graphs_.size(); }

  // One MTP-block step: meta.token_ids are the NEXT tokens, `hidden` the main
  // model's final hyper-streams at meta's rows.
  // Benchmarks of steps that cannot be recorded (host-sized MoE exchange):
  // `warmup` eager steps, then `iters` eager steps, each timed on the device.
  std::vector<double> time_eager_steps(const StepMetadata& meta, int warmup, int iters);
  void mtp_step(const StepMetadata& meta, const std::vector<uint16_t>& hidden, std::vector<float>* logits);

 private:
  // The step's metadata, logits rows and (where given) token choices to the device, one copy.
  ops::BatchView upload_metadata(const StepMetadata& meta, const std::vector<ops::TokenChoice>* choices = nullptr);
  // Issues one step (a graph replay or the eager stages) and returns its logits rows; the
  // caller downloads what it needs, then synchronizes. keep_hidden: eager (X stays readable).
  int64_t launch_step(const StepMetadata& meta, bool keep_hidden, bool allow_graph, int32_t min_graph_rows,
                      const std::vector<ops::TokenChoice>* choices = nullptr);
  // step_tokens' host buffer for whole logits rows, allocated on first use.
  float* whole_rows_buffer();
  // The bucket a decode-only step replays, or 0 to run eagerly.
  int32_t graph_bucket(const StepMetadata& meta, int32_t min_rows) const;
  void download_logits(int64_t rows, std::vector<float>* logits);

  model::ModelConfig config_;
  ops::Backend& backend_;
  RunnerOptions options_;
  std::unique_ptr<model::Transformer> model_;
  std::unique_ptr<model::LocalMoeExecutor> local_moe_;
  model::MoeExecutor* moe_;
  std::vector<ops::LayerCache> caches_;
  std::unique_ptr<model::MicroBatchBuffers> buffers_;
  core::Tensor mtp_input_;
  // Step metadata on the device: regions of metadata_ (one upload a step from metadata_host_).
  core::Tensor metadata_;
  // Regions of metadata_, in order: token_ids_ ... seq_slot_ (0-6), then these, each 64-aligned.
  static constexpr int kLogitRowsRegion = 7, kChoicesRegion = 8, kBlockTableRegion = 9, kMetadataRegions = 10;
  int64_t metadata_offset_[kMetadataRegions] = {};  // i32 elements
  bool separate_metadata_ = false;  // DSV4_SEPARATE_METADATA=1: each array a buffer of its own
  // The tensors of the regions, in region order (the logits rows are the micro-batch's).
  std::array<core::Tensor*, kMetadataRegions> metadata_arrays();
  std::vector<int32_t> metadata_host_;
  core::Tensor token_ids_, positions_, token_seq_, seq_begin_, seq_len_, seq_start_pos_, seq_slot_, block_table_;
  core::Tensor token_choices_;  // i32 [max_logit_rows, kTokenChoiceWords]: step_tokens' choices (a region)
  core::Tensor token_ids_out_;  // i32 [max_logit_rows]: their tokens
  core::Tensor token_logprob_records_;  // i32 [max_logit_rows, kTokenLogprobWords]: their rows' records
  core::Tensor logit_penalties_;        // i32 [capacity, kLogitPenaltyWords]: step_tokens' penalties (grown)
  std::shared_ptr<void> logits_host_;  // f32 [max_logit_rows, V]: whole_rows_buffer()
  std::map<int32_t, std::unique_ptr<ops::Graph>> graphs_;
  StageObserver observer_;
};

}  // namespace dsv4::engine
