// The Communicator moves bytes between ranks; it knows nothing of the model.
//
// One object per rank. Every call is collective: all ranks of the group issue the same
// calls in the same order (DESIGN §6). Data collectives act on the rank's tensors (host
// memory for in-process ranks, device memory on the rank's stream for NCCL, where they are
// CUDA-graph capturable); host collectives are small, synchronous and used for step
// agreement (the StepPlan all-gather, DESIGN §3.2). Every call accepts 0 bytes, so idle
// ranks run the same program with empty micro-batches (tbo-survey §2.4).
//
// Failure contract (tbo-survey §2.1: a mismatched or missing collective must never hang):
// a failure or timeout on any rank makes this rank's pending and later calls throw
// core::Error whose message names the rank and the call, e.g.
//   "rank 0: all_gather #17 (4096 bytes) timed out after 5000 ms waiting for rank 1"
// and, where the implementation can reach them, the same happens on the other ranks.
// Once failed, a communicator stays failed; build a new group to continue.
//
// Debug collective ledger (CommOptions::ledger): every collective appends an entry
// (op, dtype, count, bytes, call number) to this rank's ledger; check_ledger() compares a
// hash of the entries since the last check across ranks and, if they differ, throws an
// Error listing every rank's entries, so a would-be hang or silent row misalignment
// becomes an assertion at a known point (e.g. once per engine step).
#pragma once

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace dsv4::parallel {

enum class ReduceOp { kSum, kMax };
std::string_view reduce_op_name(ReduceOp op);  // "sum", "max"

struct CommOptions {
  // A collective that has not completed after this long fails the group (no silent hang).
  std::chrono::milliseconds timeout{60000};
  // Record the collective ledger (small host cost per call); check it with check_ledger().
  bool ledger = false;
  // Optional label for messages when several communicators exist ("ep", "ub1").
  std::string name;
};

// One collective as this rank issued it.
struct LedgerEntry {
  uint64_t call = 0;          // this communicator's call number (#n in messages; host calls count too)
  std::string op;             // "all_gather", "reduce_scatter", "all_to_all", "all_gather_host", ...
  core::DType dtype = core::DType::kU8;
  ReduceOp reduce = ReduceOp::kSum;  // reduce_scatter / all_reduce_host only
  int64_t count = 0;          // rank-invariant element count: per-rank block (all_gather, reduce_scatter),
                              // elements per row (all_to_all), values (all_reduce_host), bytes (host gather)
  int64_t bytes = 0;          // this rank's payload; for all_to_all it differs legitimately across ranks,
                              // so it is shown but not hashed
  std::string describe() const;  // "all_gather #17 bf16 x 2048 (4096 bytes)"
};

class Communicator {
 public:
  explicit Communicator(CommOptions options);
  virtual ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::string kind() const = 0;  // "inprocess", "nccl"
  // Where data-collective tensors must live (tensors of 0 bytes may live anywhere).
  virtual core::Device device_kind() const = 0;

  // ---- data collectives -------------------------------------------------------------
  // recv = world x send, rank-major. send and recv have the same dtype. In place when
  // send aliases recv's block for this rank.
  void all_gather(const core::Tensor& send, const core::Tensor& recv);
  // send = world x recv (block p goes to rank p, reduced over ranks); f32 or bf16.
  void reduce_scatter(const core::Tensor& send, const core::Tensor& recv, ReduceOp op);
  // Rows of row_bytes each. send holds send_rows[0] rows for peer 0, then send_rows[1] rows
  // for peer 1, ...; recv receives recv_rows[p] rows from each peer p, in rank order.
  // Counts are host values agreed beforehand (send_rows[q] on rank p == recv_rows[p] on
  // rank q); a peer pair with 0 rows moves nothing. Buffers may be larger than needed;
  // send and recv must not overlap.
  void all_to_all(const core::Tensor& send, const std::vector<int64_t>& send_rows, const core::Tensor& recv,
                  const std::vector<int64_t>& recv_rows, int64_t row_bytes);
  // The equal-count case (padded, graph-friendly dispatch): rows_per_peer rows to and from
  // every peer. NCCL runs it as one ncclAlltoAll. This is a separate call, not a detected
  // special case of all_to_all, because a rank cannot see locally whether every pair's
  // counts are equal, and ranks choosing different NCCL calls would hang.
  void all_to_all_equal(const core::Tensor& send, const core::Tensor& recv, int64_t rows_per_peer,
                        int64_t row_bytes);

  // ---- host collectives (synchronous; for step agreement) -----------------------------
  // recv = world x bytes, rank-major. Every rank passes the same byte count.
  void all_gather_host(const void* send, size_t bytes, void* recv);
  // In place over `count` values (same count on every rank).
  void all_reduce_host(int64_t* values, int count, ReduceOp op);
  void barrier();

  // ---- failure ----------------------------------------------------------------------
  // Fails the communicator (and every communicator it shares a failure domain with: the
  // whole in-process group, the NCCL communicators of this process): pending and later
  // calls throw core::Error carrying `reason`. Safe from any thread; the first reason wins.
  virtual void abort(const std::string& reason) = 0;
  // Empty while healthy, else the reason the communicator failed.
  virtual std::string failure() const = 0;

  // ---- debug ledger -----------------------------------------------------------------
  // Collective over all ranks (issue it at the same point everywhere; a no-op, not a
  // collective, when the ledger is off, so turn it on or off on every rank alike).
  // Throws core::Error listing every rank's entries since the last check when they differ.
  void check_ledger(const std::string& where);
  const std::vector<LedgerEntry>& ledger_entries() const { return ledger_; }

  const CommOptions& options() const { return options_; }
  uint64_t calls_issued() const { return calls_; }
  // "rank 3" or "ep rank 3": how messages name this rank.
  std::string rank_label() const;

 protected:
  // What every implementation receives with a call: its number and a one-line description
  // for error messages ("all_gather #17 (4096 bytes)").
  struct Call {
    uint64_t number = 0;
    const char* op = "";
    size_t bytes = 0;
    std::string describe() const;
  };

  virtual void do_all_gather(const Call& call, const core::Tensor& send, const core::Tensor& recv) = 0;
  virtual void do_reduce_scatter(const Call& call, const core::Tensor& send, const core::Tensor& recv,
                                 ReduceOp op) = 0;
  virtual void do_all_to_all(const Call& call, const core::Tensor& send, const std::vector<int64_t>& send_rows,
                             const core::Tensor& recv, const std::vector<int64_t>& recv_rows, int64_t row_bytes) = 0;
  virtual void do_all_to_all_equal(const Call& call, const core::Tensor& send, const core::Tensor& recv,
                                   int64_t rows_per_peer, int64_t row_bytes) = 0;
  virtual void do_all_gather_host(const Call& call, const void* send, size_t bytes, void* recv) = 0;
  virtual void do_all_reduce_host(const Call& call, int64_t* values, int count, ReduceOp op) = 0;

  // "rank 0: all_gather #17 (4096 bytes): <what>" — the prefix every error carries.
  std::string call_error(const Call& call, std::string_view what) const;

 private:
  Call begin(const char* op, size_t bytes, LedgerEntry entry, bool record);
  void throw_if_failed(const Call& call) const;
  void check_data_device(const char* op, const core::Tensor& t, const char* which) const;

  CommOptions options_;
  uint64_t calls_ = 0;
  std::vector<LedgerEntry> ledger_;
  bool in_ledger_check_ = false;  // the check's own host collectives are not recorded
};

// Runs fn(*comms[r]) for every rank on its own thread and returns after all threads end.
// An exception escaping one rank aborts every communicator in `comms` with
// "rank r failed: <what>", so peers blocked in collectives throw at once instead of
// waiting for the timeout (tbo-survey §2.1 H7). Returns each rank's exception (null when
// the rank returned normally), in rank order.
std::vector<std::exception_ptr> run_rank_threads(const std::vector<Communicator*>& comms,
                                                 const std::function<void(Communicator&)>& fn);
std::vector<std::exception_ptr> run_rank_threads(const std::vector<std::unique_ptr<Communicator>>& comms,
                                                 const std::function<void(Communicator&)>& fn);
// The same, but rethrows the root cause (the error raised first in time, i.e. the one
// that caused the abort) when any rank failed.
void run_rank_threads_or_throw(const std::vector<std::unique_ptr<Communicator>>& comms,
                               const std::function<void(Communicator&)>& fn);

// Message of an exception_ptr ("" for null; "unknown exception" for non-std types).
std::string exception_message(const std::exception_ptr& e);

}  // namespace dsv4::parallel
