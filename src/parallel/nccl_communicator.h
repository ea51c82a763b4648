// NCCL communicator: one per GPU, one host thread per GPU (DESIGN §6).
//
// - Created with ncclCommInitRankConfig in non-blocking mode (config.blocking = 0), so
//   that no NCCL call can wedge the calling thread and ncclCommAbort can always interrupt
//   a hang. Every NCCL call is polled with ncclCommGetAsyncError until it leaves
//   ncclInProgress, bounded by CommOptions::timeout.
// - Data collectives are enqueued on stream() (the communicator's own non-blocking stream
//   unless set_stream() picks the rank's compute or comm stream) and are CUDA-graph
//   capturable. all_to_all is one ncclGroupStart/ncclSend/ncclRecv/ncclGroupEnd with
//   zero-size transfers skipped and the self block copied with cudaMemcpyAsync;
//   all_to_all_equal is one ncclAlltoAll (NCCL >= 2.28). all_gather and all_to_all move
//   bytes (ncclUint8); reduce_scatter reduces in f32 or bf16 in NCCL's own order.
// - Host collectives stage through pinned + device buffers, run ncclAllGather /
//   ncclAllReduce on stream() (after everything already enqueued there) and wait on an
//   event polled against the timeout. They cannot run while stream() is being captured.
// - A watchdog thread per communicator polls ncclCommGetAsyncError and the completion
//   event of every collective enqueued outside capture (and of watch() marks, which cover
//   graph replays). On an NCCL error or a timeout it calls ncclCommAbort, records the
//   reason ("rank 0: all_gather #17 (4096 bytes) timed out after 5000 ms waiting for
//   rank 1 (its last call: barrier #16)") and fails every communicator of this process,
//   so every pending and later call throws it. Kernels of an aborted communicator exit,
//   so streams drain; synchronize() then throws rather than returning.
// - Ranks in one process that stopped issuing are named in timeout messages; a rank in
//   another process cannot be seen from here (its process's own watchdog reports it).
// - NCCL_NVLS_ENABLE is left exactly as the environment sets it (keep NVLink multicast off
//   on the lent machines: tbo-survey §4.8).
// - Graphs: run each collective shape once eagerly before capturing it (NCCL connects
//   peers lazily on first use); with several ranks as threads of one process, capture with
//   cudaStreamCaptureModeThreadLocal, so one thread's capture does not forbid the other
//   threads' CUDA calls. Never replay a graph of a failed communicator.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "parallel/bootstrap.h"
#include "parallel/communicator.h"

// Checked NCCL call outside a communicator (ids, versions): names the call in the error.
#define DSV4_NCCL_CHECK(call)                                                                     \
  do {                                                                                            \
    ncclResult_t dsv4_nccl_rc_ = (call);                                                          \
    if (dsv4_nccl_rc_ != ncclSuccess)                                                             \
      ::dsv4::core::fail("NCCL error at {}:{}: {} returned {} ({})", __FILE__, __LINE__, #call,  \
                         int(dsv4_nccl_rc_), ncclGetErrorString(dsv4_nccl_rc_));                  \
  } while (0)

namespace dsv4::parallel {

struct NcclOptions {
  CommOptions comm;
  // Caps on NCCL's CTAs per collective (0 = NCCL's default): leave SMs to the compute
  // stream when collectives overlap with it (TBO, DESIGN §4).
  int min_ctas = 0, max_ctas = 0;
  // How often the watchdog looks at NCCL's async error and the pending events.
  std::chrono::milliseconds watchdog_poll{5};
};

UniqueIdBytes nccl_unique_id();  // ncclGetUniqueId as bytes

// bootstrap_cluster with ncclGetUniqueId made on node 0.
ClusterPlan bootstrap_nccl(const ClusterSpec& spec,
                           std::chrono::milliseconds timeout = std::chrono::milliseconds(120000));

// "2.28.9 (compiled against 2.28.9)"
std::string nccl_version_string();

class NcclCommunicator;

// Creates this process's communicators, one per plan.local entry (device d, global rank r),
// from the calling thread in one NCCL group; blocks until every rank of the world has
// joined or options.comm.timeout passes. They share one failure domain: a failure of one
// fails all. Use each from its own thread afterwards (run_rank_threads).
std::vector<std::unique_ptr<NcclCommunicator>> create_nccl_communicators(const ClusterPlan& plan,
                                                                         const NcclOptions& options = {});

class NcclCommunicator final : public Communicator {
 public:
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  std::string kind() const override { return "nccl"; }
  core::Device device_kind() const override { return core::Device::kCuda; }
  int device() const { return device_; }

  // Where collectives are enqueued; nullptr selects the communicator's own stream. The
  // stream must belong to device(). Not while a collective of this rank is in flight on
  // the host (call it from the rank's thread).
  void set_stream(cudaStream_t stream);
  cudaStream_t stream() const { return stream_; }
  // The raw handle, for NCCL device-API kernels; valid while failure() is empty. Never
  // abort or destroy it yourself (abort() does).
  ncclComm_t nccl() const { return comm_; }

  // Waits for everything enqueued on stream(), bounded by the timeout. Throws if the
  // communicator failed, even if the stream drained (aborted kernels exit early).
  void synchronize();
  // Records a completion mark on stream() now, so that the watchdog also times work the
  // communicator did not enqueue itself, e.g. a CUDA graph replay holding its collectives:
  // comm.watch("decode graph bucket 64") right after cudaGraphLaunch.
  void watch(const std::string& what);

  void abort(const std::string& reason) override;
  std::string failure() const override;

  struct Domain;  // this process's communicators (failure propagation, progress for messages)

 protected:
  void do_all_gather(const Call& call, const core::Tensor& send, const core::Tensor& recv) override;
  void do_reduce_scatter(const Call& call, const core::Tensor& send, const core::Tensor& recv, ReduceOp op) override;
  void do_all_to_all(const Call& call, const core::Tensor& send, const std::vector<int64_t>& send_rows,
                     const core::Tensor& recv, const std::vector<int64_t>& recv_rows, int64_t row_bytes) override;
  void do_all_to_all_equal(const Call& call, const core::Tensor& send, const core::Tensor& recv,
                           int64_t rows_per_peer, int64_t row_bytes) override;
  void do_all_gather_host(const Call& call, const void* send, size_t bytes, void* recv) override;
  void do_all_reduce_host(const Call& call, int64_t* values, int count, ReduceOp op) override;

 private:
  friend std::vector<std::unique_ptr<NcclCommunicator>> create_nccl_communicators(const ClusterPlan&,
                                                                                  const NcclOptions&);
  struct State;
  NcclCommunicator(ncclComm_t comm, int rank, int world, int device, int local_index,
                   std::shared_ptr<Domain> domain, const NcclOptions& options);

  ncclComm_t comm_ = nullptr;
  int rank_ = 0, world_ = 0, device_ = 0, local_index_ = 0;
  cudaStream_t own_stream_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::shared_ptr<Domain> domain_;
  std::unique_ptr<State> state_;
};

}  // namespace dsv4::parallel
