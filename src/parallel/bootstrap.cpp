#include "parallel/bootstrap.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "core/error.h"

namespace dsv4::parallel {
namespace {

using Clock = std::chrono::steady_clock;

constexpr char kMagic[8] = {'D', 'S', 'V', '4', 'B', 'O', 'O', 'T'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHelloBytes = 8 + 4 + 3 * 4;
constexpr size_t kReplyHeaderBytes = 8 + 4 + 3 * 4 + 128 + 4;
constexpr uint32_t kMaxErrorBytes = 4096;

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = o.fd_;
      o.fd_ = -1;
    }
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

int ms_left(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return int(std::clamp<int64_t>(left, 0, 1 << 30));
}

std::string errno_text(int err) { return std::strerror(err); }

enum class Io { kOk, kClosed, kTimeout, kError };

// Waits for fd to become readable/writable; false on timeout.
bool wait_fd(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd, events, 0};
    int rc = ::poll(&p, 1, ms_left(deadline));
    if (rc > 0) return true;
    if (rc == 0) return false;
    if (errno != EINTR) return true;  // let the following read/write report the error
  }
}

Io send_all(int fd, const void* data, size_t n, Clock::time_point deadline, int* err) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    if (!wait_fd(fd, POLLOUT, deadline)) return Io::kTimeout;
    ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      *err = errno;
      return Io::kError;
    }
    p += k;
    n -= size_t(k);
  }
  return Io::kOk;
}

Io recv_all(int fd, void* data, size_t n, Clock::time_point deadline, int* err) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    if (!wait_fd(fd, POLLIN, deadline)) return Io::kTimeout;
    ssize_t k = ::recv(fd, p, n, 0);
    if (k == 0) return Io::kClosed;
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      *err = errno;
      return Io::kError;
    }
    p += k;
    n -= size_t(k);
  }
  return Io::kOk;
}

void set_nonblocking(int fd) { ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL, 0) | O_NONBLOCK); }

struct AddrList {
  addrinfo* head = nullptr;
  ~AddrList() {
    if (head) ::freeaddrinfo(head);
  }
};

// Resolves host:port; an empty result carries the resolver's message in *error.
void resolve(const std::string& host, int port, bool passive, AddrList* out, std::string* error) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  std::string service = std::to_string(port);
  int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &out->head);
  if (rc != 0) *error = ::gai_strerror(rc);
}

std::string peer_name(const sockaddr_storage& sa) {
  char host[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (sa.ss_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(&sa);
    ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    port = ntohs(in->sin_port);
  } else if (sa.ss_family == AF_INET6) {
    auto* in = reinterpret_cast<const sockaddr_in6*>(&sa);
    ::inet_ntop(AF_INET6, &in->sin6_addr, host, sizeof(host));
    port = ntohs(in->sin6_port);
  }
  return fmt::format("{}:{}", host, port);
}

template <typename T>
void put(std::string& buf, T v) {
  buf.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

template <typename T>
T get(const char*& p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  p += sizeof(T);
  return v;
}

struct Hello {
  int32_t nnodes = 0, node_rank = 0, gpus_per_node = 0;
};

std::string encode_hello(const ClusterSpec& spec) {
  std::string buf(kMagic, 8);
  put<uint32_t>(buf, kVersion);
  put<int32_t>(buf, spec.nnodes);
  put<int32_t>(buf, spec.node_rank);
  put<int32_t>(buf, spec.gpus_per_node);
  return buf;
}

std::string encode_reply(int32_t status, int32_t world, int32_t offset, const UniqueIdBytes& id,
                         const std::string& error) {
  std::string buf(kMagic, 8);
  put<uint32_t>(buf, kVersion);
  put<int32_t>(buf, status);
  put<int32_t>(buf, world);
  put<int32_t>(buf, offset);
  buf.append(reinterpret_cast<const char*>(id.data()), id.size());
  uint32_t n = uint32_t(std::min<size_t>(error.size(), kMaxErrorBytes));
  put<uint32_t>(buf, n);
  buf.append(error, 0, n);
  return buf;
}

std::string endpoint(const ClusterSpec& spec) { return fmt::format("{}:{}", spec.master_addr, spec.master_port); }

// ---- node 0 ---------------------------------------------------------------------------

Fd listen_on(const ClusterSpec& spec) {
  AddrList addrs;
  std::string error;
  resolve(spec.master_addr, spec.master_port, true, &addrs, &error);
  if (!addrs.head)
    core::fail("node 0: cannot resolve --master-addr '{}': {}", spec.master_addr, error);
  int last = 0;
  for (addrinfo* a = addrs.head; a; a = a->ai_next) {
    Fd fd(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol));
    if (fd.get() < 0) {
      last = errno;
      continue;
    }
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd.get(), a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd.get(), 128) == 0) {
      set_nonblocking(fd.get());
      return fd;
    }
    last = errno;
  }
  core::fail("node 0: cannot listen on {} (--master-addr must be an address of node 0): {}", endpoint(spec),
             errno_text(last));
}

struct Joined {
  Fd fd;
  Hello hello;
  std::string peer;
};

ClusterPlan run_master(const ClusterSpec& spec, const std::function<UniqueIdBytes()>& make_id,
                       std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  Fd listener = listen_on(spec);
  const UniqueIdBytes id = make_id();
  std::vector<Joined> joined;
  std::vector<std::string> ignored;  // connections that did not speak the protocol

  // Sends `error` to every node that is waiting for a reply (best effort), then throws.
  auto fail_all = [&](const std::string& error, Fd* extra) {
    std::string msg = fmt::format("node 0 (master {}): {}", endpoint(spec), error);
    auto reply = encode_reply(1, 0, 0, UniqueIdBytes{}, msg);
    const auto short_deadline = Clock::now() + std::chrono::milliseconds(1000);
    int err = 0;
    for (Joined& j : joined) send_all(j.fd.get(), reply.data(), reply.size(), short_deadline, &err);
    if (extra) send_all(extra->get(), reply.data(), reply.size(), short_deadline, &err);
    throw core::Error(msg);
  };

  while (int(joined.size()) < spec.nnodes - 1) {
    if (!wait_fd(listener.get(), POLLIN, deadline)) {
      std::vector<bool> seen(size_t(spec.nnodes), false);
      seen[0] = true;
      for (const Joined& j : joined) seen[size_t(j.hello.node_rank)] = true;
      std::string missing, present = "0";
      for (int n = 1; n < spec.nnodes; ++n) {
        std::string& list = seen[size_t(n)] ? present : missing;
        list += fmt::format("{}{}", list.empty() ? "" : ", ", n);
      }
      std::string msg = fmt::format("timed out after {} ms waiting for node(s) {} of {} to connect (joined: {})",
                                    timeout.count(), missing, spec.nnodes, present);
      if (!ignored.empty()) msg += fmt::format("; ignored {} connection(s) that did not speak the protocol: ", ignored.size()) + ignored.front();
      fail_all(msg, nullptr);
    }
    sockaddr_storage sa{};
    socklen_t len = sizeof(sa);
    Fd conn(::accept4(listener.get(), reinterpret_cast<sockaddr*>(&sa), &len, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (conn.get() < 0) continue;  // EAGAIN / ECONNABORTED: the peer went away
    const std::string peer = peer_name(sa);
    char buf[kHelloBytes];
    int err = 0;
    // A silent connection must not hold the rendezvous: give each hello a few seconds.
    auto hello_deadline = std::min(deadline, Clock::now() + std::chrono::milliseconds(5000));
    Io io = recv_all(conn.get(), buf, sizeof(buf), hello_deadline, &err);
    if (io != Io::kOk || std::memcmp(buf, kMagic, 8) != 0) {
      ignored.push_back(fmt::format("{} ({})", peer, io == Io::kOk ? "bad magic" : "no hello"));
      continue;
    }
    const char* p = buf + 8;
    uint32_t version = get<uint32_t>(p);
    Hello h;
    h.nnodes = get<int32_t>(p);
    h.node_rank = get<int32_t>(p);
    h.gpus_per_node = get<int32_t>(p);
    if (version != kVersion)
      fail_all(fmt::format("node at {} speaks bootstrap protocol {}, node 0 speaks {} (mixed dsv4 builds?)", peer,
                           version, kVersion), &conn);
    if (h.nnodes != spec.nnodes)
      fail_all(fmt::format("wrong node count: node {} at {} was started with --nnodes {}, node 0 with --nnodes {}",
                           h.node_rank, peer, h.nnodes, spec.nnodes), &conn);
    if (h.node_rank == 0)
      fail_all(fmt::format("duplicate node rank 0: the node at {} also says --node-rank 0", peer), &conn);
    if (h.node_rank < 0 || h.node_rank >= spec.nnodes)
      fail_all(fmt::format("node at {} says --node-rank {}, outside 1..{} for --nnodes {}", peer, h.node_rank,
                           spec.nnodes - 1, spec.nnodes), &conn);
    for (const Joined& j : joined)
      if (j.hello.node_rank == h.node_rank)
        fail_all(fmt::format("duplicate node rank {}: nodes at {} and {} both say --node-rank {}", h.node_rank,
                             j.peer, peer, h.node_rank), &conn);
    if (h.gpus_per_node < 1)
      fail_all(fmt::format("node {} at {} says --gpus-per-node {}", h.node_rank, peer, h.gpus_per_node), &conn);
    joined.push_back(Joined{std::move(conn), h, peer});
  }

  // Global ranks in node-rank order.
  std::vector<int> gpus(size_t(spec.nnodes), 0);
  gpus[0] = spec.gpus_per_node;
  for (const Joined& j : joined) gpus[size_t(j.hello.node_rank)] = j.hello.gpus_per_node;
  std::vector<int> offset(size_t(spec.nnodes), 0);
  int world = 0;
  for (int n = 0; n < spec.nnodes; ++n) {
    offset[size_t(n)] = world;
    world += gpus[size_t(n)];
  }
  for (Joined& j : joined) {
    auto reply = encode_reply(0, world, offset[size_t(j.hello.node_rank)], id, "");
    int err = 0;
    Io io = send_all(j.fd.get(), reply.data(), reply.size(), deadline, &err);
    if (io != Io::kOk)
      fail_all(fmt::format("cannot send the plan to node {} at {}: {}", j.hello.node_rank, j.peer,
                           io == Io::kTimeout ? "timed out" : errno_text(err)), nullptr);
  }
  ClusterPlan plan;
  plan.world_size = world;
  plan.rank_offset = 0;
  plan.unique_id = id;
  return plan;
}

// ---- nodes 1.. ------------------------------------------------------------------------

Fd connect_to_master(const ClusterSpec& spec, Clock::time_point deadline, std::chrono::milliseconds timeout) {
  std::string last_error = "no attempt";
  for (;;) {
    AddrList addrs;
    std::string error;
    resolve(spec.master_addr, spec.master_port, false, &addrs, &error);
    if (!addrs.head) last_error = "cannot resolve: " + error;
    for (addrinfo* a = addrs.head; a; a = a->ai_next) {
      Fd fd(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol));
      if (fd.get() < 0) {
        last_error = errno_text(errno);
        continue;
      }
      int rc = ::connect(fd.get(), a->ai_addr, a->ai_addrlen);
      if (rc != 0 && errno == EINPROGRESS) {
        auto attempt = std::min(deadline, Clock::now() + std::chrono::milliseconds(2000));
        if (!wait_fd(fd.get(), POLLOUT, attempt)) {
          last_error = "connect timed out";
          continue;
        }
        int soerr = 0;
        socklen_t len = sizeof(soerr);
        ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &soerr, &len);
        rc = soerr == 0 ? 0 : -1;
        errno = soerr;
      }
      if (rc == 0) {
        int one = 1;
        ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        return fd;
      }
      last_error = errno_text(errno);
    }
    if (Clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min(100, ms_left(deadline))));
    if (Clock::now() >= deadline) break;
  }
  core::fail("node {}: cannot connect to master {} within {} ms (last error: {}); is node 0 running with the same "
             "--master-addr and --master-port?", spec.node_rank, endpoint(spec), timeout.count(), last_error);
}

ClusterPlan run_worker(const ClusterSpec& spec, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  Fd fd = connect_to_master(spec, deadline, timeout);
  auto hello = encode_hello(spec);
  int err = 0;
  Io io = send_all(fd.get(), hello.data(), hello.size(), deadline, &err);
  if (io != Io::kOk)
    core::fail("node {}: cannot send to master {}: {}", spec.node_rank, endpoint(spec),
               io == Io::kTimeout ? "timed out" : errno_text(err));
  char header[kReplyHeaderBytes];
  io = recv_all(fd.get(), header, sizeof(header), deadline, &err);
  if (io == Io::kTimeout)
    core::fail("node {}: connected to master {} but got no reply within {} ms (node 0 replies once all {} nodes have "
               "joined; are they all started, with the same --nnodes?)", spec.node_rank, endpoint(spec),
               timeout.count(), spec.nnodes);
  if (io != Io::kOk)
    core::fail("node {}: master {} closed the connection before replying ({}); see node 0's log", spec.node_rank,
               endpoint(spec), io == Io::kClosed ? "connection closed" : errno_text(err));
  if (std::memcmp(header, kMagic, 8) != 0)
    core::fail("node {}: {} is not a dsv4 bootstrap master (bad magic)", spec.node_rank, endpoint(spec));
  const char* p = header + 8;
  uint32_t version = get<uint32_t>(p);
  int32_t status = get<int32_t>(p);
  int32_t world = get<int32_t>(p);
  int32_t offset = get<int32_t>(p);
  ClusterPlan plan;
  std::memcpy(plan.unique_id.data(), p, 128);
  p += 128;
  uint32_t error_bytes = get<uint32_t>(p);
  if (version != kVersion)
    core::fail("node {}: master {} speaks bootstrap protocol {}, this node {} (mixed dsv4 builds?)", spec.node_rank,
               endpoint(spec), version, kVersion);
  std::string error(std::min(error_bytes, kMaxErrorBytes), '\0');
  if (!error.empty()) recv_all(fd.get(), error.data(), error.size(), deadline, &err);
  if (status != 0) core::fail("node {}: rendezvous failed: {}", spec.node_rank, error);
  if (world < spec.gpus_per_node || offset < 0 || offset + spec.gpus_per_node > world)
    core::fail("node {}: master {} sent an inconsistent plan (world {}, rank offset {}, {} local GPUs)",
               spec.node_rank, endpoint(spec), world, offset, spec.gpus_per_node);
  plan.world_size = world;
  plan.rank_offset = offset;
  return plan;
}

}  // namespace

ClusterPlan bootstrap_cluster(const ClusterSpec& spec, const std::function<UniqueIdBytes()>& make_id,
                              std::chrono::milliseconds timeout) {
  if (spec.nnodes < 1) core::fail("--nnodes {} must be at least 1", spec.nnodes);
  if (spec.node_rank < 0 || spec.node_rank >= spec.nnodes)
    core::fail("--node-rank {} is outside 0..{} for --nnodes {}", spec.node_rank, spec.nnodes - 1, spec.nnodes);
  if (spec.gpus_per_node < 1) core::fail("gpus per node {} must be at least 1", spec.gpus_per_node);
  if (spec.nnodes > 1 && (spec.master_port < 1 || spec.master_port > 65535))
    core::fail("--master-port {} is outside 1..65535", spec.master_port);

  ClusterPlan plan;
  if (spec.nnodes == 1) {
    plan.world_size = spec.gpus_per_node;
    plan.unique_id = make_id();
  } else if (spec.node_rank == 0) {
    plan = run_master(spec, make_id, timeout);
  } else {
    plan = run_worker(spec, timeout);
  }
  for (int i = 0; i < spec.gpus_per_node; ++i) plan.local.push_back(LocalRank{plan.rank_offset + i, i});
  return plan;
}

std::string describe(const ClusterSpec& spec, const ClusterPlan& plan) {
  std::string s = fmt::format("node {} of {} ({} GPU{}, ranks {}..{} of {}", spec.node_rank, spec.nnodes,
                              plan.local.size(), plan.local.size() == 1 ? "" : "s", plan.rank_offset,
                              plan.rank_offset + int(plan.local.size()) - 1, plan.world_size);
  if (spec.nnodes > 1) s += fmt::format(", master {}", endpoint(spec));
  return s + ")";
}

}  // namespace dsv4::parallel
