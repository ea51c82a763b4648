#include "parallel/nccl_communicator.h"

#include <fmt/format.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "ops/cuda/cuda_check.h"

namespace dsv4::parallel {
namespace {

using Clock = std::chrono::steady_clock;

static_assert(sizeof(ncclUniqueId) == sizeof(UniqueIdBytes), "ncclUniqueId is 128 bytes");

// Makes `device` current for a scope and restores the previous device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    DSV4_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) DSV4_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

std::string nccl_text(ncclResult_t r, ncclComm_t comm) {
  std::string s = fmt::format("{} ({})", ncclGetErrorString(r), int(r));
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && last[0] != '\0') s += fmt::format(": {}", last);
  return s;
}

std::string cuda_text(cudaError_t e) { return fmt::format("{} ({})", cudaGetErrorName(e), cudaGetErrorString(e)); }

ncclDataType_t nccl_float_type(core::DType dtype) {
  return dtype == core::DType::kF32 ? ncclFloat32 : ncclBfloat16;
}

ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::kSum ? ncclSum : ncclMax; }

// Short sleeps after a burst of yields: host waits cost little latency and little CPU.
void backoff(int spins) {
  if (spins < 200) std::this_thread::yield();
  else std::this_thread::sleep_for(std::chrono::microseconds(spins < 2000 ? 20 : 200));
}

constexpr size_t kInitialStageBytes = 64 << 10;

}  // namespace

// ---- the process's communicators --------------------------------------------------------

struct NcclCommunicator::Domain {
  explicit Domain(int world_size, int locals) : world(world_size), members(size_t(locals), nullptr),
                                                progress(size_t(locals)) {}
  struct Progress {
    int rank = -1;
    uint64_t number = 0;
    std::string what = "none";
  };
  const int world;
  std::mutex mu;  // guards members; taken before any member's State::mu, never after
  std::vector<NcclCommunicator*> members;
  std::mutex progress_mu;  // a leaf lock
  std::vector<Progress> progress;

  void record(int index, uint64_t number, std::string what) {
    std::lock_guard<std::mutex> lock(progress_mu);
    progress[size_t(index)].number = number;
    progress[size_t(index)].what = std::move(what);
  }

  // Who a timed-out call on member `self` is waiting for, as far as this process can see.
  std::string waiting_for(int self, uint64_t number) {
    std::lock_guard<std::mutex> lock(progress_mu);
    std::string behind, here;
    int n_behind = 0;
    for (size_t i = 0; i < progress.size(); ++i) {
      here += fmt::format("{}{}", here.empty() ? "" : ", ", progress[i].rank);
      if (int(i) == self || progress[i].number >= number) continue;
      behind += fmt::format("{}{} (its last call: {})", behind.empty() ? "" : ", ", progress[i].rank, progress[i].what);
      ++n_behind;
    }
    if (n_behind > 0) return fmt::format("waiting for rank{} {}", n_behind == 1 ? "" : "s", behind);
    if (int(progress.size()) < world)
      return fmt::format("every rank of this process ({}) issued it, so a rank in another process (world size {}) "
                         "stopped issuing collectives or died", here, world);
    return "every rank issued it; the work queued before it on the stream did not finish";
  }
};

struct NcclCommunicator::State {
  struct Pending {
    uint64_t number = 0;
    std::string what;
    cudaEvent_t event = nullptr;
    Clock::time_point start;
  };

  NcclCommunicator* self = nullptr;
  NcclOptions options;
  std::mutex mu;  // every NCCL call on self->comm_, and the fields below
  std::condition_variable cv;
  std::atomic<bool> failed{false};
  std::string failure;  // written once, under mu
  std::deque<Pending> pending;
  std::vector<cudaEvent_t> spare_events;
  bool stop = false;
  std::thread watchdog;
  // Host-collective staging: only the rank's thread touches these.
  char* host_stage = nullptr;
  char* dev_stage = nullptr;
  size_t stage_bytes = 0;
  std::vector<std::pair<char*, char*>> retired_stages;  // freed at destruction (cudaFree syncs the device)
  cudaEvent_t host_done = nullptr;

  std::string label() const { return self->rank_label(); }

  // Every call reports itself to the process's progress board first (0-byte ones too), so
  // a peer's timeout message can say which call this rank reached.
  void note(const Call& call) { self->domain_->record(self->local_index_, call.number, call.describe()); }

  cudaEvent_t take_event_locked() {
    if (!spare_events.empty()) {
      cudaEvent_t e = spare_events.back();
      spare_events.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    DSV4_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return e;
  }

  // Fails this communicator only: records the reason and aborts the NCCL communicator,
  // whose kernels then exit. Returns false when it had already failed.
  bool fail_local(const std::string& reason) {
    std::lock_guard<std::mutex> lock(mu);
    if (failed) return false;
    failure = reason;
    failed = true;
    if (self->comm_ != nullptr) {
      DeviceGuard guard(self->device_);
      ncclResult_t r = ncclCommAbort(self->comm_);
      if (r != ncclSuccess && r != ncclInProgress)
        std::fprintf(stderr, "dsv4: %s: ncclCommAbort returned %s\n", label().c_str(), ncclGetErrorString(r));
    }
    cv.notify_all();
    return true;
  }

  // Fails this communicator and every other one of the process.
  void fail(const std::string& reason) {
    if (!fail_local(reason)) return;
    Domain& d = *self->domain_;
    std::lock_guard<std::mutex> lock(d.mu);
    for (NcclCommunicator* m : d.members)
      if (m != nullptr && m != self) m->state_->fail_local(reason);
  }

  [[noreturn]] void throw_failed(const std::string& what) {
    std::string reason;
    {
      std::lock_guard<std::mutex> lock(mu);
      reason = failure;
    }
    throw core::Error(fmt::format("{}: {}: communicator has failed: {}", label(), what, reason));
  }

  // After an NCCL call returned ncclInProgress: poll until the enqueue finished.
  // Returns an error text, or "" when done. Releases `lock` between polls.
  std::string wait_ready(const Call& call, const char* name, std::unique_lock<std::mutex>& lock) {
    const auto deadline = Clock::now() + options.comm.timeout;
    for (int spins = 0;; ++spins) {
      ncclResult_t state = ncclInProgress;
      ncclResult_t r = ncclCommGetAsyncError(self->comm_, &state);
      if (r != ncclSuccess)
        return self->call_error(call, fmt::format("ncclCommGetAsyncError after {} failed: {}", name,
                                                  nccl_text(r, self->comm_)));
      if (state == ncclSuccess) return "";
      if (state != ncclInProgress)
        return self->call_error(call, fmt::format("{} failed: {}", name, nccl_text(state, self->comm_)));
      if (Clock::now() > deadline)
        return self->call_error(call, fmt::format("{} did not finish enqueueing within {} ms", name,
                                                  options.comm.timeout.count()));
      lock.unlock();
      backoff(spins);
      lock.lock();
      if (failed) {
        lock.unlock();
        throw_failed(call.describe());
      }
    }
  }

  // Issues one NCCL operation (issue() may be a whole group) on the stream, waits until it
  // is enqueued and, outside graph capture, hands its completion to the watchdog.
  void enqueue(const Call& call, const char* name, const std::function<ncclResult_t()>& issue, bool track) {
    DeviceGuard guard(self->device_);
    std::string error;
    {
      std::unique_lock<std::mutex> lock(mu);
      if (failed) {
        lock.unlock();
        throw_failed(call.describe());
      }
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      cudaError_t ce = cudaStreamIsCapturing(self->stream_, &capture);
      if (ce != cudaSuccess) {
        error = self->call_error(call, "cudaStreamIsCapturing failed: " + cuda_text(ce));
      } else {
        ncclResult_t r = issue();
        if (r != ncclSuccess && r != ncclInProgress)
          error = self->call_error(call, fmt::format("{} failed: {}", name, nccl_text(r, self->comm_)));
        else if (r == ncclInProgress)
          error = wait_ready(call, name, lock);
      }
      // An event recorded inside a capture must never be queried (tbo-survey §2.3 G5);
      // graph replays are covered by watch().
      if (error.empty() && track && capture == cudaStreamCaptureStatusNone) {
        cudaEvent_t e = take_event_locked();
        ce = cudaEventRecord(e, self->stream_);
        if (ce != cudaSuccess) {
          spare_events.push_back(e);
          error = self->call_error(call, "cudaEventRecord failed: " + cuda_text(ce));
        } else {
          pending.push_back(Pending{call.number, call.describe(), e, Clock::now()});
        }
      }
    }
    if (!error.empty()) {
      fail(error);
      throw core::Error(error);
    }
  }

  // Host wait for `event`, bounded by the timeout; throws (and fails the group) on timeout.
  void wait_event(cudaEvent_t event, uint64_t number, const std::string& what) {
    const auto start = Clock::now();
    const auto deadline = start + options.comm.timeout;
    for (int spins = 0;; ++spins) {
      cudaError_t q = cudaEventQuery(event);
      if (q == cudaSuccess) break;
      if (q != cudaErrorNotReady) {
        std::string reason = fmt::format("{}: {}: waiting for the GPU failed: {}", label(), what, cuda_text(q));
        fail(reason);
        throw core::Error(reason);
      }
      if (failed) throw_failed(what);
      if (Clock::now() > deadline) {
        // Name the oldest collective still pending on the GPU: that is what is stuck.
        std::string stuck = what;
        uint64_t stuck_number = number;
        {
          std::lock_guard<std::mutex> lock(mu);
          if (!pending.empty()) {
            stuck = pending.front().what;
            stuck_number = pending.front().number;
          }
        }
        std::string reason = fmt::format("{}: {} timed out after {} ms {}", label(), stuck, options.comm.timeout.count(),
                                         self->domain_->waiting_for(self->local_index_, stuck_number));
        if (stuck != what) reason += fmt::format(" (noticed in {})", what);
        fail(reason);
        throw core::Error(reason);
      }
      backoff(spins);
    }
    // Aborted kernels exit early, so a completed event proves nothing after a failure.
    if (failed) throw_failed(what);
  }

  // One watchdog look: NCCL's async error, then the oldest pending completions.
  std::string check_locked() {
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(self->comm_, &state);
    if (r != ncclSuccess) return fmt::format("{}: ncclCommGetAsyncError failed: {}", label(), nccl_text(r, self->comm_));
    if (state != ncclSuccess && state != ncclInProgress)
      return fmt::format("{}: NCCL reported an asynchronous error: {} ({})", label(), nccl_text(state, self->comm_),
                         pending.empty() ? "no collective pending" : "pending: " + pending.front().what);
    const auto now = Clock::now();
    while (!pending.empty()) {
      Pending& p = pending.front();
      cudaError_t q = cudaEventQuery(p.event);
      if (q == cudaSuccess) {
        spare_events.push_back(p.event);
        pending.pop_front();
        continue;
      }
      if (q != cudaErrorNotReady)
        return fmt::format("{}: {}: the GPU reported {}", label(), p.what, cuda_text(q));
      if (now - p.start > options.comm.timeout)
        return fmt::format("{}: {} timed out after {} ms {}", label(), p.what, options.comm.timeout.count(),
                           self->domain_->waiting_for(self->local_index_, p.number));
      break;
    }
    return "";
  }

  void watchdog_loop() {
    // The watchdog must keep polling while a rank thread captures a graph.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    (void)cudaThreadExchangeStreamCaptureMode(&mode);
    (void)cudaSetDevice(self->device_);
    std::unique_lock<std::mutex> lock(mu);
    while (!stop) {
      cv.wait_for(lock, options.watchdog_poll, [&] { return stop; });
      if (stop || failed) continue;
      std::string reason = check_locked();
      if (!reason.empty()) {
        lock.unlock();
        fail(reason);
        lock.lock();
      }
    }
  }

  // Grows the host-collective staging buffers (never shrinks; old ones are freed at the end
  // because cudaFree waits for the whole device).
  void ensure_stage(size_t bytes) {
    if (bytes <= stage_bytes) return;
    DeviceGuard guard(self->device_);
    size_t n = std::max(bytes, 2 * stage_bytes);
    if (host_stage != nullptr) retired_stages.emplace_back(host_stage, dev_stage);
    host_stage = nullptr;
    dev_stage = nullptr;
    stage_bytes = 0;
    DSV4_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_stage), n));
    DSV4_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&dev_stage), n));
    stage_bytes = n;
  }

  void check_not_capturing(const Call& call) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    DSV4_CUDA_CHECK(cudaStreamIsCapturing(self->stream_, &capture));
    if (capture != cudaStreamCaptureStatusNone)
      throw core::Error(self->call_error(call, "host collectives cannot run while the stream is being captured"));
  }

  // Host collective tail: device result -> pinned -> wait.
  void finish_host(const Call& call, size_t bytes) {
    DeviceGuard guard(self->device_);
    cudaError_t e = cudaMemcpyAsync(host_stage, dev_stage, bytes, cudaMemcpyDeviceToHost, self->stream_);
    if (e == cudaSuccess) e = cudaEventRecord(host_done, self->stream_);
    if (e != cudaSuccess) {
      std::string reason = self->call_error(call, "staging copy failed: " + cuda_text(e));
      fail(reason);
      throw core::Error(reason);
    }
    wait_event(host_done, call.number, call.describe());
  }
};

// ---- creation ---------------------------------------------------------------------------

UniqueIdBytes nccl_unique_id() {
  ncclUniqueId id;
  DSV4_NCCL_CHECK(ncclGetUniqueId(&id));
  UniqueIdBytes bytes;
  std::memcpy(bytes.data(), &id, sizeof(id));
  return bytes;
}

ClusterPlan bootstrap_nccl(const ClusterSpec& spec, std::chrono::milliseconds timeout) {
  return bootstrap_cluster(spec, nccl_unique_id, timeout);
}

std::string nccl_version_string() {
  int v = 0;
  DSV4_NCCL_CHECK(ncclGetVersion(&v));
  auto text = [](int code) {
    return code >= 10000 ? fmt::format("{}.{}.{}", code / 10000, (code / 100) % 100, code % 100)
                         : fmt::format("{}.{}.{}", code / 1000, (code / 100) % 10, code % 100);
  };
  return fmt::format("{} (compiled against {})", text(v), text(NCCL_VERSION_CODE));
}

std::vector<std::unique_ptr<NcclCommunicator>> create_nccl_communicators(const ClusterPlan& plan,
                                                                         const NcclOptions& options) {
  const int n = int(plan.local.size());
  if (n < 1) core::fail("create_nccl_communicators: the plan has no local ranks");
  if (options.comm.timeout.count() <= 0)
    core::fail("create_nccl_communicators: timeout {} ms must be positive", options.comm.timeout.count());
  int devices = 0;
  DSV4_CUDA_CHECK(cudaGetDeviceCount(&devices));
  for (int i = 0; i < n; ++i) {
    const LocalRank& l = plan.local[size_t(i)];
    if (l.rank < 0 || l.rank >= plan.world_size)
      core::fail("create_nccl_communicators: rank {} is outside world size {}", l.rank, plan.world_size);
    if (l.device < 0 || l.device >= devices)
      core::fail("rank {}: CUDA device {} does not exist (this process sees {} device{})", l.rank, l.device, devices,
                 devices == 1 ? "" : "s");
    for (int j = 0; j < i; ++j)
      if (plan.local[size_t(j)].device == l.device)
        core::fail("ranks {} and {} are both on CUDA device {}; NCCL needs one device per rank",
                   plan.local[size_t(j)].rank, l.rank, l.device);
  }
  int runtime = 0;
  DSV4_NCCL_CHECK(ncclGetVersion(&runtime));
  if (runtime < NCCL_VERSION_CODE)
    std::fprintf(stderr, "dsv4: warning: NCCL library %s is older than the header this was built with\n",
                 nccl_version_string().c_str());

  ncclUniqueId id;
  std::memcpy(&id, plan.unique_id.data(), sizeof(id));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every call may return ncclInProgress; ncclCommAbort can always interrupt
  if (options.min_ctas > 0) config.minCTAs = options.min_ctas;
  if (options.max_ctas > 0) config.maxCTAs = options.max_ctas;
  if (!options.comm.name.empty()) config.commName = options.comm.name.c_str();

  std::string ranks;
  for (const LocalRank& l : plan.local) ranks += fmt::format("{}{}", ranks.empty() ? "" : ", ", l.rank);
  int previous = 0;
  DSV4_CUDA_CHECK(cudaGetDevice(&previous));
  std::vector<ncclComm_t> comms(static_cast<size_t>(n), nullptr);
  auto abort_all = [&] {
    for (int i = 0; i < n; ++i)
      if (comms[size_t(i)] != nullptr) {
        (void)cudaSetDevice(plan.local[size_t(i)].device);
        (void)ncclCommAbort(comms[size_t(i)]);
      }
    (void)cudaSetDevice(previous);
  };

  std::string error;
  DSV4_NCCL_CHECK(ncclGroupStart());
  for (int i = 0; i < n && error.empty(); ++i) {
    const LocalRank& l = plan.local[size_t(i)];
    cudaError_t ce = cudaSetDevice(l.device);
    if (ce != cudaSuccess) {
      error = fmt::format("rank {}: cudaSetDevice({}) failed: {}", l.rank, l.device, cuda_text(ce));
      break;
    }
    ncclResult_t r = ncclCommInitRankConfig(&comms[size_t(i)], plan.world_size, id, l.rank, &config);
    if (r != ncclSuccess && r != ncclInProgress)
      error = fmt::format("rank {}: ncclCommInitRankConfig failed: {}", l.rank, nccl_text(r, comms[size_t(i)]));
  }
  ncclResult_t end = ncclGroupEnd();
  if (error.empty() && end != ncclSuccess && end != ncclInProgress)
    error = fmt::format("ranks {}: ncclGroupEnd after ncclCommInitRankConfig failed: {}", ranks, nccl_text(end, nullptr));
  // Non-blocking init: poll every communicator until it leaves ncclInProgress.
  const auto deadline = Clock::now() + options.comm.timeout;
  for (int spins = 0; error.empty(); ++spins) {
    bool done = true;
    for (int i = 0; i < n && error.empty(); ++i) {
      ncclResult_t state = ncclInProgress;
      ncclResult_t r = ncclCommGetAsyncError(comms[size_t(i)], &state);
      if (r != ncclSuccess) state = r;
      if (state == ncclInProgress) done = false;
      else if (state != ncclSuccess)
        error = fmt::format("rank {}: NCCL communicator init failed: {}", plan.local[size_t(i)].rank,
                            nccl_text(state, comms[size_t(i)]));
    }
    if (done || !error.empty()) break;
    if (Clock::now() > deadline) {
      error = fmt::format("rank{} {}: NCCL communicator init did not complete within {} ms (world size {}): every "
                          "rank must join with the same unique id; are all processes/nodes running?",
                          n == 1 ? "" : "s", ranks, options.comm.timeout.count(), plan.world_size);
      break;
    }
    backoff(spins);
  }
  if (!error.empty()) {
    abort_all();
    throw core::Error(error);
  }
  DSV4_CUDA_CHECK(cudaSetDevice(previous));

  auto domain = std::make_shared<NcclCommunicator::Domain>(plan.world_size, n);
  for (int i = 0; i < n; ++i) domain->progress[size_t(i)].rank = plan.local[size_t(i)].rank;
  std::vector<std::unique_ptr<NcclCommunicator>> out;
  for (int i = 0; i < n; ++i) {
    const LocalRank& l = plan.local[size_t(i)];
    out.emplace_back(new NcclCommunicator(comms[size_t(i)], l.rank, plan.world_size, l.device, i, domain, options));
    comms[size_t(i)] = nullptr;  // owned now
  }
  return out;
}

NcclCommunicator::NcclCommunicator(ncclComm_t comm, int rank, int world, int device, int local_index,
                                   std::shared_ptr<Domain> domain, const NcclOptions& options)
    : Communicator(options.comm), comm_(comm), rank_(rank), world_(world), device_(device), local_index_(local_index),
      domain_(std::move(domain)), state_(std::make_unique<State>()) {
  state_->self = this;
  state_->options = options;
  DeviceGuard guard(device_);
  DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&own_stream_, cudaStreamNonBlocking));
  stream_ = own_stream_;
  DSV4_CUDA_CHECK(cudaEventCreateWithFlags(&state_->host_done, cudaEventDisableTiming));
  state_->ensure_stage(kInitialStageBytes);
  {
    std::lock_guard<std::mutex> lock(domain_->mu);
    domain_->members[size_t(local_index_)] = this;
  }
  state_->watchdog = std::thread([s = state_.get()] { s->watchdog_loop(); });
}

NcclCommunicator::~NcclCommunicator() {
  {
    std::lock_guard<std::mutex> lock(domain_->mu);
    domain_->members[size_t(local_index_)] = nullptr;
  }
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stop = true;
    state_->cv.notify_all();
  }
  if (state_->watchdog.joinable()) state_->watchdog.join();

  int previous = 0;
  (void)cudaGetDevice(&previous);
  (void)cudaSetDevice(device_);
  if (!state_->failed) {
    // Clean shutdown: let queued work finish, then finalize (non-blocking) and destroy;
    // anything that does not finish within the timeout is aborted instead.
    const auto deadline = Clock::now() + state_->options.comm.timeout;
    bool quiet = true;
    for (auto& p : state_->pending) {
      for (int spins = 0; cudaEventQuery(p.event) == cudaErrorNotReady; ++spins) {
        if (Clock::now() > deadline) {
          quiet = false;
          break;
        }
        backoff(spins);
      }
      if (!quiet) break;
    }
    bool finalized = false;
    if (quiet && ncclCommFinalize(comm_) != ncclSuccess) {
      ncclResult_t state = ncclInProgress;
      for (int spins = 0; Clock::now() < deadline; ++spins) {
        if (ncclCommGetAsyncError(comm_, &state) != ncclSuccess || state != ncclInProgress) break;
        backoff(spins);
      }
      finalized = state == ncclSuccess;
    } else if (quiet) {
      finalized = true;
    }
    if (finalized) {
      (void)ncclCommDestroy(comm_);
    } else {
      std::fprintf(stderr, "dsv4: %s: communicator still busy at destruction after %lld ms; aborting it\n",
                   rank_label().c_str(), static_cast<long long>(state_->options.comm.timeout.count()));
      (void)ncclCommAbort(comm_);
    }
  }
  comm_ = nullptr;
  for (auto& p : state_->pending) (void)cudaEventDestroy(p.event);
  for (cudaEvent_t e : state_->spare_events) (void)cudaEventDestroy(e);
  if (state_->host_done) (void)cudaEventDestroy(state_->host_done);
  state_->retired_stages.emplace_back(state_->host_stage, state_->dev_stage);
  for (auto& [h, d] : state_->retired_stages) {
    if (h) (void)cudaFreeHost(h);
    if (d) (void)cudaFree(d);
  }
  if (own_stream_) (void)cudaStreamDestroy(own_stream_);
  (void)cudaSetDevice(previous);
}

// ---- control ----------------------------------------------------------------------------

void NcclCommunicator::set_stream(cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(state_->mu);
  stream_ = stream != nullptr ? stream : own_stream_;
}

void NcclCommunicator::abort(const std::string& reason) { state_->fail(reason); }

std::string NcclCommunicator::failure() const {
  if (!state_->failed) return "";
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->failure;
}

void NcclCommunicator::synchronize() {
  const std::string what = fmt::format("synchronize after call #{}", calls_issued());
  if (state_->failed) state_->throw_failed(what);
  DeviceGuard guard(device_);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  DSV4_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
  if (capture != cudaStreamCaptureStatusNone)
    core::fail("{}: {}: the stream is being captured; synchronize after launching the graph", rank_label(), what);
  cudaEvent_t e = nullptr;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    e = state_->take_event_locked();
  }
  cudaError_t ce = cudaEventRecord(e, stream_);
  if (ce != cudaSuccess) {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->spare_events.push_back(e);
    throw core::Error(fmt::format("{}: {}: cudaEventRecord failed: {}", rank_label(), what, cuda_text(ce)));
  }
  try {
    state_->wait_event(e, calls_issued(), what);
  } catch (...) {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (cudaEventQuery(e) == cudaSuccess) state_->spare_events.push_back(e);  // else leaked on purpose: still queued
    throw;
  }
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->spare_events.push_back(e);
}

void NcclCommunicator::watch(const std::string& what) {
  if (state_->failed) state_->throw_failed(what);
  DeviceGuard guard(device_);
  std::lock_guard<std::mutex> lock(state_->mu);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  DSV4_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
  if (capture != cudaStreamCaptureStatusNone)
    core::fail("{}: watch('{}') while the stream is being captured; call it after launching the graph", rank_label(),
               what);
  cudaEvent_t e = state_->take_event_locked();
  DSV4_CUDA_CHECK(cudaEventRecord(e, stream_));
  state_->pending.push_back(State::Pending{calls_issued(), what, e, Clock::now()});
}

// ---- data collectives -------------------------------------------------------------------

void NcclCommunicator::do_all_gather(const Call& call, const core::Tensor& send, const core::Tensor& recv) {
  state_->note(call);
  const size_t bytes = send.nbytes();
  if (bytes == 0) return;  // the same on every rank: counts agree
  state_->enqueue(call, "ncclAllGather", [&] {
    return ncclAllGather(send.data(), recv.data(), bytes, ncclUint8, comm_, stream_);
  }, true);
}

void NcclCommunicator::do_reduce_scatter(const Call& call, const core::Tensor& send, const core::Tensor& recv,
                                         ReduceOp op) {
  state_->note(call);
  const size_t count = size_t(recv.numel());
  if (count == 0) return;
  state_->enqueue(call, "ncclReduceScatter", [&] {
    return ncclReduceScatter(send.data(), recv.data(), count, nccl_float_type(recv.dtype()), nccl_op(op), comm_,
                             stream_);
  }, true);
}

void NcclCommunicator::do_all_to_all(const Call& call, const core::Tensor& send, const std::vector<int64_t>& send_rows,
                                     const core::Tensor& recv, const std::vector<int64_t>& recv_rows,
                                     int64_t row_bytes) {
  state_->note(call);
  const char* send_base = static_cast<const char*>(send.data());
  char* recv_base = static_cast<char*>(recv.data());
  std::vector<size_t> send_off(static_cast<size_t>(world_) + 1, 0), recv_off(size_t(world_) + 1, 0);
  for (int p = 0; p < world_; ++p) {
    send_off[size_t(p) + 1] = send_off[size_t(p)] + size_t(send_rows[size_t(p)] * row_bytes);
    recv_off[size_t(p) + 1] = recv_off[size_t(p)] + size_t(recv_rows[size_t(p)] * row_bytes);
  }
  bool any_peer = false;
  for (int p = 0; p < world_; ++p)
    if (p != rank_ && (send_rows[size_t(p)] > 0 || recv_rows[size_t(p)] > 0) && row_bytes > 0) any_peer = true;
  // The self block is a device copy, enqueued before the group on the same stream.
  const size_t self_bytes = size_t(send_rows[size_t(rank_)] * row_bytes);
  if (self_bytes > 0) {
    if (self_bytes != size_t(recv_rows[size_t(rank_)] * row_bytes))
      throw core::Error(call_error(call, fmt::format("sends {} rows to itself but expects {} rows from itself",
                                                     send_rows[size_t(rank_)], recv_rows[size_t(rank_)])));
    if (state_->failed) state_->throw_failed(call.describe());
    DeviceGuard guard(device_);
    cudaError_t e = cudaMemcpyAsync(recv_base + recv_off[size_t(rank_)], send_base + send_off[size_t(rank_)],
                                    self_bytes, cudaMemcpyDeviceToDevice, stream_);
    if (e != cudaSuccess) {
      std::string reason = call_error(call, "self copy cudaMemcpyAsync failed: " + cuda_text(e));
      state_->fail(reason);
      throw core::Error(reason);
    }
  }
  if (!any_peer) return;  // every pair empty: no NCCL call on any rank for these pairs
  state_->enqueue(call, "ncclGroupStart/ncclSend/ncclRecv/ncclGroupEnd", [&] {
    ncclResult_t first = ncclGroupStart();
    if (first != ncclSuccess) return first;
    for (int p = 0; p < world_ && (first == ncclSuccess || first == ncclInProgress); ++p) {
      if (p == rank_) continue;
      const size_t sb = send_off[size_t(p) + 1] - send_off[size_t(p)];
      const size_t rb = recv_off[size_t(p) + 1] - recv_off[size_t(p)];
      if (sb > 0) first = ncclSend(send_base + send_off[size_t(p)], sb, ncclUint8, p, comm_, stream_);
      if (rb > 0 && (first == ncclSuccess || first == ncclInProgress))
        first = ncclRecv(recv_base + recv_off[size_t(p)], rb, ncclUint8, p, comm_, stream_);
    }
    ncclResult_t end = ncclGroupEnd();  // always close the group, even after an error
    return first == ncclSuccess || first == ncclInProgress ? end : first;
  }, true);
}

void NcclCommunicator::do_all_to_all_equal(const Call& call, const core::Tensor& send, const core::Tensor& recv,
                                           int64_t rows_per_peer, int64_t row_bytes) {
  state_->note(call);
  const size_t per_peer = size_t(rows_per_peer * row_bytes);
  if (per_peer == 0) return;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 28, 0)
  state_->enqueue(call, "ncclAlltoAll", [&] {
    return ncclAlltoAll(send.data(), recv.data(), per_peer, ncclUint8, comm_, stream_);
  }, true);
#else
  std::vector<int64_t> rows(static_cast<size_t>(world_), rows_per_peer);
  do_all_to_all(call, send, rows, recv, rows, row_bytes);
#endif
}

// ---- host collectives -------------------------------------------------------------------

void NcclCommunicator::do_all_gather_host(const Call& call, const void* send, size_t bytes, void* recv) {
  state_->note(call);
  if (bytes == 0) return;
  State& s = *state_;
  if (s.failed) s.throw_failed(call.describe());
  s.check_not_capturing(call);
  const size_t total = size_t(world_) * bytes;
  s.ensure_stage(total);
  std::memcpy(s.host_stage + size_t(rank_) * bytes, send, bytes);
  {
    DeviceGuard guard(device_);
    DSV4_CUDA_CHECK(cudaMemcpyAsync(s.dev_stage + size_t(rank_) * bytes, s.host_stage + size_t(rank_) * bytes, bytes,
                                    cudaMemcpyHostToDevice, stream_));
  }
  s.enqueue(call, "ncclAllGather", [&] {
    return ncclAllGather(s.dev_stage + size_t(rank_) * bytes, s.dev_stage, bytes, ncclUint8, comm_, stream_);
  }, false);
  s.finish_host(call, total);
  std::memcpy(recv, s.host_stage, total);
}

void NcclCommunicator::do_all_reduce_host(const Call& call, int64_t* values, int count, ReduceOp op) {
  state_->note(call);
  if (count == 0) return;
  State& s = *state_;
  if (s.failed) s.throw_failed(call.describe());
  s.check_not_capturing(call);
  const size_t bytes = size_t(count) * sizeof(int64_t);
  s.ensure_stage(bytes);
  std::memcpy(s.host_stage, values, bytes);
  {
    DeviceGuard guard(device_);
    DSV4_CUDA_CHECK(cudaMemcpyAsync(s.dev_stage, s.host_stage, bytes, cudaMemcpyHostToDevice, stream_));
  }
  s.enqueue(call, "ncclAllReduce", [&] {
    return ncclAllReduce(s.dev_stage, s.dev_stage, size_t(count), ncclInt64, nccl_op(op), comm_, stream_);
  }, false);
  s.finish_host(call, bytes);
  std::memcpy(values, s.host_stage, bytes);
}

}  // namespace dsv4::parallel
