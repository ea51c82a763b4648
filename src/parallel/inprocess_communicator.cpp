#include "parallel/inprocess_communicator.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <mutex>

namespace dsv4::parallel {
namespace {

// One rank's side of a call, as posted to the rendezvous.
struct Post {
  std::string op;
  uint64_t number = 0;
  size_t bytes = 0;
  std::string what;  // "all_gather #17 (4096 bytes)"
  const char* send = nullptr;
  char* recv = nullptr;
  core::DType dtype = core::DType::kU8;
  ReduceOp reduce = ReduceOp::kSum;
  int64_t count = 0;  // elements of recv (reduce_scatter), values (all_reduce_host)
  const std::vector<int64_t>* send_rows = nullptr;
  const std::vector<int64_t>* recv_rows = nullptr;
  int64_t row_bytes = 0;
  int64_t rows_per_peer = 0;
};

float load(const char* base, core::DType dtype, int64_t i) {
  if (dtype == core::DType::kF32) {
    float v;
    std::memcpy(&v, base + i * 4, 4);
    return v;
  }
  uint16_t h;
  std::memcpy(&h, base + i * 2, 2);
  return core::bf16_to_float(h);
}

void store(char* base, core::DType dtype, int64_t i, float v) {
  if (dtype == core::DType::kF32) {
    std::memcpy(base + i * 4, &v, 4);
  } else {
    uint16_t h = core::float_to_bf16(v);
    std::memcpy(base + i * 2, &h, 2);
  }
}

float reduce_max(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? NAN : (b > a ? b : a); }

class Group {
 public:
  Group(int world, CommOptions options)
      : world_(world), options_(std::move(options)), posts_(size_t(world)),
        posted_gen_(size_t(world), kNever), last_call_(size_t(world), "none") {}

  // Blocks until every rank has posted its side of this call and the collective is done.
  void rendezvous(int rank, const std::string& label, Post post) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!failure_.empty()) throw core::Error(fmt::format("{}: {}: group failed: {}", label, post.what, failure_));
    const uint64_t gen = generation_;
    last_call_[size_t(rank)] = post.what;
    posts_[size_t(rank)] = std::move(post);
    posted_gen_[size_t(rank)] = gen;
    if (++arrived_ == world_) {
      // Last to arrive: every peer is blocked below with its buffers alive.
      std::string mismatch = validate_locked();
      if (!mismatch.empty()) {
        std::string reason = fmt::format("{}: {}: {}", label, posts_[size_t(rank)].what, mismatch);
        fail_locked(reason);
        throw core::Error(reason);
      }
      execute_locked();
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    const Post& mine = posts_[size_t(rank)];
    const std::string what = mine.what;
    auto deadline = std::chrono::steady_clock::now() + options_.timeout;
    bool woke = cv_.wait_until(lock, deadline, [&] { return generation_ != gen || !failure_.empty(); });
    if (generation_ != gen) return;  // completed (even if the group failed right after)
    if (woke) throw core::Error(fmt::format("{}: {}: group failed: {}", label, what, failure_));
    // Timed out: name the ranks that never arrived at this call.
    std::vector<int> missing;
    for (int r = 0; r < world_; ++r)
      if (posted_gen_[size_t(r)] != gen) missing.push_back(r);
    std::string who;
    for (size_t i = 0; i < missing.size(); ++i) {
      int r = missing[i];
      who += fmt::format("{}{} (its last call: {})", i == 0 ? "" : ", ", r, last_call_[size_t(r)]);
    }
    std::string reason = fmt::format("{}: {} timed out after {} ms waiting for rank{} {}", label, what,
                                     options_.timeout.count(), missing.size() == 1 ? "" : "s", who);
    fail_locked(reason);
    throw core::Error(reason);
  }

  void abort(const std::string& reason) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_locked(reason);
  }

  std::string failure() const {
    std::lock_guard<std::mutex> lock(mu_);
    return failure_;
  }

  const CommOptions& options() const { return options_; }

 private:
  static constexpr uint64_t kNever = std::numeric_limits<uint64_t>::max();

  void fail_locked(const std::string& reason) {
    if (failure_.empty()) failure_ = reason;
    cv_.notify_all();
  }

  std::string every_call() const {
    std::string s;
    for (int r = 0; r < world_; ++r) s += fmt::format("{}rank {} issued {}", r == 0 ? "" : ", ", r, posts_[size_t(r)].what);
    return s;
  }

  // Empty when all ranks issued a matching call; else what differs, naming every rank.
  std::string validate_locked() const {
    const Post& p0 = posts_[0];
    for (int r = 1; r < world_; ++r) {
      const Post& p = posts_[size_t(r)];
      if (p.op != p0.op || p.number != p0.number) return "collective mismatch: " + every_call();
    }
    const std::string& op = p0.op;
    if (op == "all_gather" || op == "all_gather_host") {
      for (int r = 1; r < world_; ++r)
        if (posts_[size_t(r)].bytes != p0.bytes) return "byte counts differ: " + every_call();
    } else if (op == "reduce_scatter") {
      for (int r = 1; r < world_; ++r) {
        const Post& p = posts_[size_t(r)];
        if (p.bytes != p0.bytes || p.dtype != p0.dtype || p.reduce != p0.reduce) {
          std::string s = "reduce_scatter arguments differ:";
          for (int q = 0; q < world_; ++q)
            s += fmt::format(" rank {} {} {} ({} bytes);", q, core::dtype_name(posts_[size_t(q)].dtype),
                             reduce_op_name(posts_[size_t(q)].reduce), posts_[size_t(q)].bytes);
          return s;
        }
      }
    } else if (op == "all_reduce_host" || op == "barrier") {
      for (int r = 1; r < world_; ++r) {
        const Post& p = posts_[size_t(r)];
        if (p.count != p0.count || p.reduce != p0.reduce) return "all_reduce_host arguments differ: " + every_call();
      }
    } else if (op == "all_to_all") {
      for (int src = 0; src < world_; ++src) {
        for (int dst = 0; dst < world_; ++dst) {
          const Post& s = posts_[size_t(src)];
          const Post& d = posts_[size_t(dst)];
          int64_t sent = (*s.send_rows)[size_t(dst)] * s.row_bytes;
          int64_t expected = (*d.recv_rows)[size_t(src)] * d.row_bytes;
          if (sent != expected)
            return fmt::format("all_to_all counts disagree: rank {} sends {} rows x {} bytes to rank {}, "
                               "but rank {} expects {} rows x {} bytes from rank {}",
                               src, (*s.send_rows)[size_t(dst)], s.row_bytes, dst, dst, (*d.recv_rows)[size_t(src)],
                               d.row_bytes, src);
        }
      }
    } else if (op == "all_to_all_equal") {
      for (int r = 1; r < world_; ++r) {
        const Post& p = posts_[size_t(r)];
        if (p.rows_per_peer * p.row_bytes != p0.rows_per_peer * p0.row_bytes)
          return "all_to_all_equal sizes differ: " + every_call();
      }
    }
    return "";
  }

  void execute_locked() {
    const std::string& op = posts_[0].op;
    const size_t world = size_t(world_);
    if (op == "all_gather" || op == "all_gather_host") {
      const size_t b = posts_[0].bytes;
      if (b == 0) return;
      for (size_t dst = 0; dst < world; ++dst)
        for (size_t src = 0; src < world; ++src) std::memmove(posts_[dst].recv + src * b, posts_[src].send, b);
    } else if (op == "reduce_scatter") {
      const core::DType dt = posts_[0].dtype;
      const int64_t n = posts_[0].count;
      const bool sum = posts_[0].reduce == ReduceOp::kSum;
      for (size_t dst = 0; dst < world; ++dst) {
        // Element i of rank dst's result reads block dst of every rank, in rank order; an
        // in-place recv aliases only its own element, which is read before it is written.
        for (int64_t i = 0; i < n; ++i) {
          const int64_t at = int64_t(dst) * n + i;
          float acc = load(posts_[0].send, dt, at);
          for (size_t src = 1; src < world; ++src) {
            float v = load(posts_[src].send, dt, at);
            acc = sum ? acc + v : reduce_max(acc, v);
          }
          store(posts_[dst].recv, dt, i, acc);
        }
      }
    } else if (op == "all_reduce_host" || op == "barrier") {
      const int64_t n = posts_[0].count;
      const bool sum = posts_[0].reduce == ReduceOp::kSum;
      std::vector<int64_t> result(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        int64_t acc;
        std::memcpy(&acc, posts_[0].send + i * 8, 8);
        for (size_t src = 1; src < world; ++src) {
          int64_t v;
          std::memcpy(&v, posts_[src].send + i * 8, 8);
          acc = sum ? int64_t(uint64_t(acc) + uint64_t(v)) : std::max(acc, v);
        }
        result[size_t(i)] = acc;
      }
      if (n > 0)
        for (size_t dst = 0; dst < world; ++dst) std::memcpy(posts_[dst].recv, result.data(), size_t(n) * 8);
    } else if (op == "all_to_all") {
      for (size_t dst = 0; dst < world; ++dst) {
        const Post& d = posts_[dst];
        int64_t recv_off = 0;
        for (size_t src = 0; src < world; ++src) {
          const Post& s = posts_[src];
          int64_t send_off = 0;
          for (size_t j = 0; j < dst; ++j) send_off += (*s.send_rows)[j] * s.row_bytes;
          const int64_t n = (*d.recv_rows)[src] * d.row_bytes;
          if (n > 0) std::memcpy(d.recv + recv_off, s.send + send_off, size_t(n));
          recv_off += n;
        }
      }
    } else if (op == "all_to_all_equal") {
      for (size_t dst = 0; dst < world; ++dst) {
        const Post& d = posts_[dst];
        const int64_t n = d.rows_per_peer * d.row_bytes;
        if (n == 0) continue;
        for (size_t src = 0; src < world; ++src)
          std::memcpy(d.recv + int64_t(src) * n, posts_[src].send + int64_t(dst) * n, size_t(n));
      }
    }
  }

  const int world_;
  const CommOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t generation_ = 0;
  int arrived_ = 0;
  std::vector<Post> posts_;
  std::vector<uint64_t> posted_gen_;    // generation at which each rank last posted
  std::vector<std::string> last_call_;  // each rank's last call, for timeout messages
  std::string failure_;
};

class InProcessCommunicator final : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<Group> group, int rank, int world, CommOptions options)
      : Communicator(std::move(options)), group_(std::move(group)), rank_(rank), world_(world) {}

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  std::string kind() const override { return "inprocess"; }
  core::Device device_kind() const override { return core::Device::kCpu; }
  void abort(const std::string& reason) override { group_->abort(reason); }
  std::string failure() const override { return group_->failure(); }

 protected:
  void do_all_gather(const Call& call, const core::Tensor& send, const core::Tensor& recv) override {
    Post p = post(call);
    p.send = static_cast<const char*>(send.data());
    p.recv = static_cast<char*>(recv.data());
    p.dtype = send.dtype();
    group_->rendezvous(rank_, rank_label(), std::move(p));
  }

  void do_reduce_scatter(const Call& call, const core::Tensor& send, const core::Tensor& recv, ReduceOp op) override {
    Post p = post(call);
    p.send = static_cast<const char*>(send.data());
    p.recv = static_cast<char*>(recv.data());
    p.dtype = recv.dtype();
    p.reduce = op;
    p.count = recv.numel();
    group_->rendezvous(rank_, rank_label(), std::move(p));
  }

  void do_all_to_all(const Call& call, const core::Tensor& send, const std::vector<int64_t>& send_rows,
                     const core::Tensor& recv, const std::vector<int64_t>& recv_rows, int64_t row_bytes) override {
    Post p = post(call);
    p.send = static_cast<const char*>(send.data());
    p.recv = static_cast<char*>(recv.data());
    p.dtype = send.dtype();
    p.send_rows = &send_rows;
    p.recv_rows = &recv_rows;
    p.row_bytes = row_bytes;
    group_->rendezvous(rank_, rank_label(), std::move(p));
  }

  void do_all_to_all_equal(const Call& call, const core::Tensor& send, const core::Tensor& recv,
                           int64_t rows_per_peer, int64_t row_bytes) override {
    Post p = post(call);
    p.send = static_cast<const char*>(send.data());
    p.recv = static_cast<char*>(recv.data());
    p.dtype = send.dtype();
    p.rows_per_peer = rows_per_peer;
    p.row_bytes = row_bytes;
    group_->rendezvous(rank_, rank_label(), std::move(p));
  }

  void do_all_gather_host(const Call& call, const void* send, size_t bytes, void* recv) override {
    Post p = post(call);
    p.send = static_cast<const char*>(send);
    p.recv = static_cast<char*>(recv);
    group_->rendezvous(rank_, rank_label(), std::move(p));
  }

  void do_all_reduce_host(const Call& call, int64_t* values, int count, ReduceOp op) override {
    Post p = post(call);
    p.send = reinterpret_cast<const char*>(values);
    p.recv = reinterpret_cast<char*>(values);
    p.dtype = core::DType::kI64;
    p.reduce = op;
    p.count = count;
    group_->rendezvous(rank_, rank_label(), std::move(p));
  }

 private:
  static Post post(const Call& call) {
    Post p;
    p.op = call.op;
    p.number = call.number;
    p.bytes = call.bytes;
    p.what = call.describe();
    return p;
  }

  std::shared_ptr<Group> group_;
  int rank_, world_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_inprocess_group(int world, CommOptions options) {
  if (world < 1) core::fail("make_inprocess_group: world size {} must be at least 1", world);
  if (options.timeout.count() <= 0) core::fail("make_inprocess_group: timeout {} ms must be positive", options.timeout.count());
  auto group = std::make_shared<Group>(world, options);
  std::vector<std::unique_ptr<Communicator>> comms;
  for (int r = 0; r < world; ++r) comms.push_back(std::make_unique<InProcessCommunicator>(group, r, world, options));
  return comms;
}

}  // namespace dsv4::parallel
