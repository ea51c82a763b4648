#include "parallel/communicator.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <mutex>
#include <thread>

namespace dsv4::parallel {

std::string_view reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kMax: return "max";
  }
  return "?";
}

namespace {

bool is_reduce(std::string_view op) { return op == "reduce_scatter" || op == "all_reduce_host"; }

std::string lower_dtype(core::DType dtype) {
  std::string s(core::dtype_name(dtype));
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// The hashed part of an entry, as text: "all_gather #17 bf16 x 2048".
std::string entry_key(const LedgerEntry& e) {
  std::string s = fmt::format("{} #{} {}", e.op, e.call, lower_dtype(e.dtype));
  if (is_reduce(e.op)) s += fmt::format(" {}", reduce_op_name(e.reduce));
  s += fmt::format(" x {}", e.count);
  return s;
}

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

uint64_t ledger_hash(const std::vector<LedgerEntry>& entries) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const LedgerEntry& e : entries) {
    std::string key = entry_key(e);
    h = fnv1a(h, key.data(), key.size());
    // all_to_all payloads differ by rank by design; everything else must agree byte for byte.
    int64_t bytes = e.op == "all_to_all" ? 0 : e.bytes;
    h = fnv1a(h, &bytes, sizeof(bytes));
    h = fnv1a(h, "\n", 1);
  }
  return h;
}

constexpr size_t kLedgerListLimit = 64;  // entries listed per rank in a mismatch report

}  // namespace

std::string LedgerEntry::describe() const { return fmt::format("{} ({} bytes)", entry_key(*this), bytes); }

std::string Communicator::Call::describe() const { return fmt::format("{} #{} ({} bytes)", op, number, bytes); }

Communicator::Communicator(CommOptions options) : options_(std::move(options)) {}
Communicator::~Communicator() = default;

std::string Communicator::rank_label() const {
  return options_.name.empty() ? fmt::format("rank {}", rank()) : fmt::format("{} rank {}", options_.name, rank());
}

std::string Communicator::call_error(const Call& call, std::string_view what) const {
  return fmt::format("{}: {}: {}", rank_label(), call.describe(), what);
}

void Communicator::throw_if_failed(const Call& call) const {
  std::string reason = failure();
  if (!reason.empty()) throw core::Error(call_error(call, "communicator has failed: " + reason));
}

Communicator::Call Communicator::begin(const char* op, size_t bytes, LedgerEntry entry, bool record) {
  Call call{++calls_, op, bytes};
  if (record && options_.ledger && !in_ledger_check_) {
    entry.call = call.number;
    entry.op = op;
    entry.bytes = int64_t(bytes);
    ledger_.push_back(std::move(entry));
  }
  throw_if_failed(call);
  return call;
}

void Communicator::check_data_device(const char* op, const core::Tensor& t, const char* which) const {
  if (t.nbytes() == 0) return;
  if (t.device() != device_kind())
    core::fail("{}: {}: {} tensor {} is in {} memory, but a {} communicator needs {} memory", rank_label(), op, which,
               t.shape_string(), t.device() == core::Device::kCpu ? "host" : "device", kind(),
               device_kind() == core::Device::kCpu ? "host" : "device");
  DSV4_CHECK(t.data() != nullptr, "{}: {} tensor {} has no data", op, which, t.shape_string());
}

void Communicator::all_gather(const core::Tensor& send, const core::Tensor& recv) {
  const int world = world_size();
  if (send.dtype() != recv.dtype() || recv.nbytes() != size_t(world) * send.nbytes())
    core::fail("{}: all_gather: recv {} {} must be {} x send {} {}", rank_label(), core::dtype_name(recv.dtype()),
               recv.shape_string(), world, core::dtype_name(send.dtype()), send.shape_string());
  check_data_device("all_gather", send, "send");
  check_data_device("all_gather", recv, "recv");
  LedgerEntry e;
  e.dtype = send.dtype();
  e.count = send.numel();
  Call call = begin("all_gather", send.nbytes(), std::move(e), true);
  do_all_gather(call, send, recv);
}

void Communicator::reduce_scatter(const core::Tensor& send, const core::Tensor& recv, ReduceOp op) {
  const int world = world_size();
  if (send.dtype() != recv.dtype() || send.nbytes() != size_t(world) * recv.nbytes())
    core::fail("{}: reduce_scatter: send {} {} must be {} x recv {} {}", rank_label(), core::dtype_name(send.dtype()),
               send.shape_string(), world, core::dtype_name(recv.dtype()), recv.shape_string());
  if (send.dtype() != core::DType::kF32 && send.dtype() != core::DType::kBF16)
    core::fail("{}: reduce_scatter: dtype {} is not supported (f32 or bf16)", rank_label(),
               core::dtype_name(send.dtype()));
  check_data_device("reduce_scatter", send, "send");
  check_data_device("reduce_scatter", recv, "recv");
  LedgerEntry e;
  e.dtype = recv.dtype();
  e.reduce = op;
  e.count = recv.numel();
  Call call = begin("reduce_scatter", recv.nbytes(), std::move(e), true);
  do_reduce_scatter(call, send, recv, op);
}

void Communicator::all_to_all(const core::Tensor& send, const std::vector<int64_t>& send_rows,
                              const core::Tensor& recv, const std::vector<int64_t>& recv_rows, int64_t row_bytes) {
  const int world = world_size();
  if (int(send_rows.size()) != world || int(recv_rows.size()) != world)
    core::fail("{}: all_to_all: {} send counts and {} recv counts for {} ranks", rank_label(), send_rows.size(),
               recv_rows.size(), world);
  int64_t send_total = 0, recv_total = 0;
  for (int p = 0; p < world; ++p) {
    if (send_rows[p] < 0 || recv_rows[p] < 0)
      core::fail("{}: all_to_all: negative row count for peer {} (send {}, recv {})", rank_label(), p, send_rows[p],
                 recv_rows[p]);
    send_total += send_rows[p];
    recv_total += recv_rows[p];
  }
  if (row_bytes < 0) core::fail("{}: all_to_all: negative row_bytes {}", rank_label(), row_bytes);
  if (size_t(send_total * row_bytes) > send.nbytes() || size_t(recv_total * row_bytes) > recv.nbytes())
    core::fail("{}: all_to_all: {} send rows / {} recv rows of {} bytes do not fit send {} ({} bytes) / recv {} ({} bytes)",
               rank_label(), send_total, recv_total, row_bytes, send.shape_string(), send.nbytes(),
               recv.shape_string(), recv.nbytes());
  check_data_device("all_to_all", send, "send");
  check_data_device("all_to_all", recv, "recv");
  LedgerEntry e;
  e.dtype = send.dtype();
  const size_t elem = core::dtype_size(send.dtype());
  e.count = elem > 0 && row_bytes % int64_t(elem) == 0 ? row_bytes / int64_t(elem) : row_bytes;
  Call call = begin("all_to_all", size_t(send_total * row_bytes), std::move(e), true);
  do_all_to_all(call, send, send_rows, recv, recv_rows, row_bytes);
}

void Communicator::all_to_all_equal(const core::Tensor& send, const core::Tensor& recv, int64_t rows_per_peer,
                                    int64_t row_bytes) {
  const int world = world_size();
  if (rows_per_peer < 0 || row_bytes < 0)
    core::fail("{}: all_to_all_equal: negative rows_per_peer {} or row_bytes {}", rank_label(), rows_per_peer,
               row_bytes);
  const size_t need = size_t(world) * size_t(rows_per_peer) * size_t(row_bytes);
  if (need > send.nbytes() || need > recv.nbytes())
    core::fail("{}: all_to_all_equal: {} ranks x {} rows x {} bytes do not fit send {} ({} bytes) / recv {} ({} bytes)",
               rank_label(), world, rows_per_peer, row_bytes, send.shape_string(), send.nbytes(), recv.shape_string(),
               recv.nbytes());
  check_data_device("all_to_all_equal", send, "send");
  check_data_device("all_to_all_equal", recv, "recv");
  LedgerEntry e;
  e.dtype = send.dtype();
  const size_t elem = core::dtype_size(send.dtype());
  const int64_t bytes_per_peer = rows_per_peer * row_bytes;
  e.count = elem > 0 && bytes_per_peer % int64_t(elem) == 0 ? bytes_per_peer / int64_t(elem) : bytes_per_peer;
  Call call = begin("all_to_all_equal", need, std::move(e), true);
  do_all_to_all_equal(call, send, recv, rows_per_peer, row_bytes);
}

void Communicator::all_gather_host(const void* send, size_t bytes, void* recv) {
  DSV4_CHECK(bytes == 0 || (send != nullptr && recv != nullptr), "all_gather_host of {} bytes with a null buffer",
             bytes);
  LedgerEntry e;
  e.dtype = core::DType::kU8;
  e.count = int64_t(bytes);
  Call call = begin("all_gather_host", bytes, std::move(e), true);
  do_all_gather_host(call, send, bytes, recv);
}

void Communicator::all_reduce_host(int64_t* values, int count, ReduceOp op) {
  DSV4_CHECK(count >= 0 && (count == 0 || values != nullptr), "all_reduce_host of {} values", count);
  LedgerEntry e;
  e.dtype = core::DType::kI64;
  e.reduce = op;
  e.count = count;
  Call call = begin("all_reduce_host", size_t(count) * sizeof(int64_t), std::move(e), true);
  do_all_reduce_host(call, values, count, op);
}

void Communicator::barrier() {
  LedgerEntry e;
  e.dtype = core::DType::kI64;
  e.count = 1;
  Call call = begin("barrier", sizeof(int64_t), std::move(e), true);
  int64_t token = 0;
  do_all_reduce_host(call, &token, 1, ReduceOp::kSum);
}

void Communicator::check_ledger(const std::string& where) {
  if (!options_.ledger) return;
  struct Summary {
    uint64_t hash;
    int64_t entries;
  };
  const int world = world_size();
  in_ledger_check_ = true;
  struct Reset {
    bool* flag;
    ~Reset() { *flag = false; }
  } reset{&in_ledger_check_};

  Summary mine{ledger_hash(ledger_), int64_t(ledger_.size())};
  std::vector<Summary> all(static_cast<size_t>(world));
  all_gather_host(&mine, sizeof(mine), all.data());
  bool agree = std::all_of(all.begin(), all.end(),
                           [&](const Summary& s) { return s.hash == all[0].hash && s.entries == all[0].entries; });
  if (agree) {
    ledger_.clear();
    return;
  }

  // Every rank saw the same table, so every rank takes this path: exchange the entries.
  std::string text;
  for (size_t i = 0; i < ledger_.size() && i < kLedgerListLimit; ++i) text += ledger_[i].describe() + "\n";
  if (ledger_.size() > kLedgerListLimit) text += fmt::format("... {} more\n", ledger_.size() - kLedgerListLimit);
  int64_t width = int64_t(text.size());
  all_reduce_host(&width, 1, ReduceOp::kMax);
  text.resize(size_t(width), '\0');
  std::string table(static_cast<size_t>(width) * size_t(world), '\0');
  all_gather_host(text.data(), size_t(width), table.data());

  std::vector<std::vector<std::string>> lines(static_cast<size_t>(world));
  std::string msg = fmt::format("{}: collective ledger mismatch at '{}' (collectives since the last check):", rank_label(),
                                where);
  for (int r = 0; r < world; ++r) {
    std::string block(table.data() + size_t(r) * size_t(width), size_t(width));
    block.resize(std::strlen(block.c_str()));
    size_t pos = 0;
    while (pos < block.size()) {
      size_t nl = block.find('\n', pos);
      if (nl == std::string::npos) nl = block.size();
      lines[size_t(r)].push_back(block.substr(pos, nl - pos));
      pos = nl + 1;
    }
    msg += fmt::format("\n  rank {} ({} entries, hash {:016x}):", r, all[size_t(r)].entries, all[size_t(r)].hash);
    if (lines[size_t(r)].empty()) msg += " (none)";
    for (const std::string& l : lines[size_t(r)]) msg += "\n    " + l;
  }
  // First entry whose hashed part differs between ranks (the text before " (N bytes)").
  auto key = [](const std::string& line) { return line.substr(0, line.rfind(" (")); };
  size_t longest = 0;
  for (const auto& l : lines) longest = std::max(longest, l.size());
  for (size_t i = 0; i < longest; ++i) {
    std::string first;
    bool differs = false;
    for (int r = 0; r < world; ++r) {
      std::string k = i < lines[size_t(r)].size() ? key(lines[size_t(r)][i]) : "(nothing)";
      if (r == 0) first = k;
      else if (k != first) differs = true;
    }
    if (differs) {
      msg += fmt::format("\n  first difference at entry {}:", i + 1);
      for (int r = 0; r < world; ++r)
        msg += fmt::format(" rank {} '{}';", r, i < lines[size_t(r)].size() ? lines[size_t(r)][i] : "(nothing)");
      break;
    }
  }
  ledger_.clear();
  abort(msg);
  throw core::Error(msg);
}

std::string exception_message(const std::exception_ptr& e) {
  if (!e) return "";
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "unknown exception";
  }
}

namespace {

struct RankRun {
  std::vector<std::exception_ptr> errors;
  int first = -1;  // rank whose error came first in time
};

RankRun run_ranks(const std::vector<Communicator*>& comms, const std::function<void(Communicator&)>& fn) {
  RankRun run;
  run.errors.resize(comms.size());
  std::mutex mu;
  std::vector<std::thread> threads;
  threads.reserve(comms.size());
  for (size_t r = 0; r < comms.size(); ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(*comms[r]);
      } catch (...) {
        std::exception_ptr e = std::current_exception();
        {
          std::lock_guard<std::mutex> lock(mu);
          run.errors[r] = e;
          if (run.first < 0) run.first = int(r);
        }
        std::string reason = fmt::format("{} failed: {}", comms[r]->rank_label(), exception_message(e));
        for (Communicator* c : comms) c->abort(reason);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  return run;
}

}  // namespace

std::vector<std::exception_ptr> run_rank_threads(const std::vector<Communicator*>& comms,
                                                 const std::function<void(Communicator&)>& fn) {
  return run_ranks(comms, fn).errors;
}

std::vector<std::exception_ptr> run_rank_threads(const std::vector<std::unique_ptr<Communicator>>& comms,
                                                 const std::function<void(Communicator&)>& fn) {
  std::vector<Communicator*> raw;
  for (const auto& c : comms) raw.push_back(c.get());
  return run_rank_threads(raw, fn);
}

void run_rank_threads_or_throw(const std::vector<std::unique_ptr<Communicator>>& comms,
                               const std::function<void(Communicator&)>& fn) {
  std::vector<Communicator*> raw;
  for (const auto& c : comms) raw.push_back(c.get());
  RankRun run = run_ranks(raw, fn);
  if (run.first >= 0) std::rethrow_exception(run.errors[size_t(run.first)]);
}

}  // namespace dsv4::parallel
