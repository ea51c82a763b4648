#include "serve/http_server.h"

#include <dirent.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>
#include <httplib.h>

#include "core/error.h"
#include "serve/metrics.h"
#include "serve/openai_api.h"

namespace dsv4::serve {

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// A response's engine events, each with the choice it belongs to, in arrival order, from the
// engine thread to the connection's thread. push() only appends and notifies, so the engine
// thread never waits.
class EventQueue {
 public:
  using Item = std::pair<size_t, engine::TokenEvent>;
  void push(size_t choice, const engine::TokenEvent& e) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      events_.emplace_back(choice, e);
    }
    cv_.notify_one();
  }
  // What has arrived, waiting up to `timeout` when nothing has.
  std::vector<Item> take(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (events_.empty() && timeout.count() > 0) cv_.wait_for(lock, timeout, [&] { return !events_.empty(); });
    std::vector<Item> out(std::make_move_iterator(events_.begin()), std::make_move_iterator(events_.end()));
    events_.clear();
    return out;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Item> events_;
};

std::string numeric_address(const sockaddr_storage& addr, socklen_t len, int* port) {
  char host[NI_MAXHOST], serv[NI_MAXSERV];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&addr), len, host, sizeof host, serv, sizeof serv,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return {};
  *port = std::atoi(serv);
  return host;
}

// The socket a request arrived on, or -1. cpp-httplib does not hand it to
// handlers; the (peer address, peer port, local port) triple names the
// connection uniquely while its request is being served (the socket stays open
// until the handler and the content provider return).
int find_connection_fd(const std::string& remote_addr, int remote_port, int local_port) {
  DIR* dir = opendir("/proc/self/fd");
  if (!dir) return -1;
  int found = -1;
  while (dirent* ent = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(ent->d_name, &end, 10);
    if (end == ent->d_name || *end != '\0') continue;
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    if (getpeername(int(fd), reinterpret_cast<sockaddr*>(&addr), &len) != 0) continue;
    int port = -1;
    if (numeric_address(addr, len, &port) != remote_addr || port != remote_port) continue;
    if (local_port >= 0) {
      len = sizeof addr;
      if (getsockname(int(fd), reinterpret_cast<sockaddr*>(&addr), &len) != 0) continue;
      numeric_address(addr, len, &port);
      if (port != local_port) continue;
    }
    found = int(fd);
    break;
  }
  closedir(dir);
  return found;
}

// The client closed its end (or the connection broke).
bool peer_closed(int fd) {
  pollfd p{fd, short(POLLIN | POLLRDHUP), 0};
  if (poll(&p, 1, 0) <= 0) return false;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

// Watches one request's connection for the client going away, at most once a second.
class ConnectionWatch {
 public:
  explicit ConnectionWatch(const httplib::Request& req)
      : addr_(req.remote_addr), port_(req.remote_port), local_port_(req.local_port) {}
  bool client_gone() {
    const auto now = Clock::now();
    if (now - last_ < 1s) return false;
    last_ = now;
    if (fd_ == -2) fd_ = find_connection_fd(addr_, port_, local_port_);
    return fd_ >= 0 && peer_closed(fd_);
  }
  void touch() { last_ = Clock::now(); }

 private:
  std::string addr_;
  int port_, local_port_;
  int fd_ = -2;  // not looked up yet
  Clock::time_point last_ = Clock::now();
};

void reply_error(httplib::Response& res, int status, const std::string& message, const std::string& param = {},
                 const std::string& code = {}) {
  res.status = status;
  res.set_content(error_body(status, message, param, code), "application/json");
}

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

}  // namespace

struct HttpServer::Impl {
  Impl(engine::ServingEngine& e, std::shared_ptr<const Tokenizer> t, HttpServerOptions o)
      : engine(e), tokenizer(std::move(t)), options(std::move(o)), created(unix_now()) {
    model.name = options.served_model_name;
    model.max_model_len = engine.max_model_len();
    model.vocab_size = engine.config().vocab_size;
    model.eos_token_id = int32_t(engine.config().eos_token_id);
    model.tokenizer = tokenizer.get();
  }

  // One generation request being served: registered so a shutdown can find
  // and cancel it; unregisters when the response is done.
  class Ticket {
   public:
    explicit Ticket(Impl& s) : s_(s) {
      std::lock_guard<std::mutex> lock(s_.mutex);
      id_ = ++s_.next_ticket;
      s_.inflight[id_] = {};
    }
    ~Ticket() {
      {
        std::lock_guard<std::mutex> lock(s_.mutex);
        s_.inflight.erase(id_);
      }
      s_.cv.notify_all();
    }
    void add_engine_id(int64_t id) {
      bool cancel = false;
      {
        std::lock_guard<std::mutex> lock(s_.mutex);
        s_.inflight[id_].push_back(id);
        cancel = s_.cancel_all;
      }
      if (cancel) s_.engine.cancel(id);
    }

   private:
    Impl& s_;
    uint64_t id_ = 0;
  };

  // Everything a streaming response needs after its handler returned.
  struct StreamState {
    std::shared_ptr<Ticket> ticket;
    std::shared_ptr<EventQueue> queue;
    std::unique_ptr<ResponseSet> set;
    std::vector<int64_t> engine_ids;  // a choice each
    std::vector<bool> cancel_sent;
    bool started = false;
    bool first_token_seen = false;
    bool recorded = false;  // counted in the finished-requests metric
    Clock::time_point arrival;
    std::unique_ptr<ConnectionWatch> watch;
  };

  void routes();
  void generate(ApiKind kind, const httplib::Request& req, httplib::Response& res);
  void serve_blocking(const httplib::Request& req, httplib::Response& res, ResponseSet& set, EventQueue& queue,
                      const std::vector<int64_t>& ids, Clock::time_point arrival);
  bool pump(StreamState& st, httplib::DataSink& sink);
  // The stream ends before its last event (client gone, server stopping).
  void abandon(StreamState& st);
  void cancel(int64_t engine_id) { engine.cancel(engine_id); }
  // Cancels the choices whose engine requests should stop (ResponseSet::needs_cancel), once each.
  void cancel_ended(const ResponseSet& set, const std::vector<int64_t>& ids, std::vector<bool>& sent);
  void on_event_seen(const engine::TokenEvent& e, bool* first_token_seen, Clock::time_point arrival);
  void record_finish(const ResponseBuilder& b, Clock::time_point arrival, bool client_gone);
  void record_finish(const ResponseSet& set, Clock::time_point arrival, bool client_gone);
  void cancel_everything();
  std::string metrics() const;
  void tick();

  engine::ServingEngine& engine;
  std::shared_ptr<const Tokenizer> tokenizer;
  HttpServerOptions options;
  ModelInfo model;
  int64_t created;
  httplib::Server server;
  std::thread listener, ticker;
  int listen_fd = -1;
  int bound_port = -1;

  mutable std::mutex mutex;  // guards everything below up to the metrics
  std::condition_variable cv;
  bool started = false, shutdown_requested = false, force = false, stopping = false, stopped = false;
  bool cancel_all = false;
  Clock::time_point shutdown_at;
  uint64_t next_ticket = 0;
  std::unordered_map<uint64_t, std::vector<int64_t>> inflight;  // ticket -> its engine requests (a choice each)

  std::atomic<bool> draining{false};
  std::atomic<bool> engine_failed{false};

  mutable std::mutex metrics_mutex;
  std::map<std::pair<std::string, int>, uint64_t> http_requests;  // (path, status)
  std::map<std::string, uint64_t> finished_by_reason;
  std::deque<std::pair<Clock::time_point, int64_t>> token_samples;  // (time, generated tokens), last ~10 s
  Histogram ttft{{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0}};
  Histogram e2e{{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                 240.0, 480.0}};
};

void HttpServer::Impl::routes() {
  server.Post("/v1/completions",
              [this](const httplib::Request& req, httplib::Response& res) { generate(ApiKind::kCompletion, req, res); });
  server.Post("/v1/chat/completions",
              [this](const httplib::Request& req, httplib::Response& res) { generate(ApiKind::kChat, req, res); });
  server.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(models_body(model, created), "application/json");
  });
  server.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (engine_failed) return reply_error(res, 503, "the engine failed; see the server log");
    if (draining) return reply_error(res, 503, "the server is shutting down");
    res.set_content("{\"status\":\"ok\"}", "application/json");
  });
  server.Get("/version", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(options.build_info.dump(), "application/json");
  });
  server.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics(), "text/plain; version=0.0.4; charset=utf-8");
  });
  server.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;  // our own error bodies
    if (res.status == 413)
      return reply_error(res, 413, fmt::format("the request body is larger than {} bytes", options.max_body_bytes));
    if (res.status == 404)
      return reply_error(res, 404,
                         fmt::format("no route for {} {}; this server has POST /v1/completions, POST "
                                     "/v1/chat/completions, GET /v1/models, GET /health, GET /metrics, GET /version",
                                     req.method, req.path));
    reply_error(res, res.status, fmt::format("{} {} failed with HTTP {}", req.method, req.path, res.status));
  });
  server.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    reply_error(res, 500, fmt::format("internal error: {}", what));
  });
  server.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    static const char* known[] = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
                                  "/version"};
    std::string path = "other";
    for (const char* k : known)
      if (req.path == k) path = k;
    std::lock_guard<std::mutex> lock(metrics_mutex);
    ++http_requests[{path, res.status}];
  });
}

void HttpServer::Impl::on_event_seen(const engine::TokenEvent& e, bool* first_token_seen, Clock::time_point arrival) {
  if (e.token >= 0 && !*first_token_seen) {
    *first_token_seen = true;
    ttft.observe(seconds_since(arrival));
  }
  // Accepted requests end with an error only when a step failed (engine/serving_engine.cpp).
  if (e.finished && e.reason == engine::FinishReason::kError) engine_failed = true;
}

void HttpServer::Impl::record_finish(const ResponseBuilder& b, Clock::time_point arrival, bool client_gone) {
  std::string reason = b.finish_reason();
  if (reason.empty()) reason = client_gone || b.error().empty() || starts_with(b.error(), "the request was cancelled")
                                   ? "cancelled"
                                   : "error";
  if (!b.finish_reason().empty()) e2e.observe(seconds_since(arrival));
  std::lock_guard<std::mutex> lock(metrics_mutex);
  ++finished_by_reason[reason];
}

void HttpServer::Impl::record_finish(const ResponseSet& set, Clock::time_point arrival, bool client_gone) {
  for (size_t i = 0; i < set.size(); ++i) record_finish(set.choice(i), arrival, client_gone);
}

void HttpServer::Impl::cancel_ended(const ResponseSet& set, const std::vector<int64_t>& ids, std::vector<bool>& sent) {
  for (size_t i = 0; i < ids.size(); ++i)
    if (!sent[i] && set.needs_cancel(i)) {
      cancel(ids[i]);
      sent[i] = true;
    }
}

void HttpServer::Impl::generate(ApiKind kind, const httplib::Request& req, httplib::Response& res) {
  const auto arrival = Clock::now();
  if (draining) return reply_error(res, 503, "the server is shutting down and takes no new requests");
  ApiRequest api;
  try {
    const nlohmann::json body = parse_json_body(req.body);
    api = kind == ApiKind::kChat ? parse_chat_request(body, model) : parse_completion_request(body, model);
  } catch (const ApiError& e) {
    res.status = e.status();
    res.set_content(e.body(), "application/json");
    return;
  }
  auto ticket = std::make_shared<Ticket>(*this);
  auto queue = std::make_shared<EventQueue>();
  auto set = std::make_unique<ResponseSet>(api, model, make_response_id(kind), unix_now());
  // An engine request a choice; if one is refused, the ones submitted before it are cancelled.
  std::vector<int64_t> ids;
  for (size_t i = 0; i < set->size(); ++i) {
    std::string error;
    const int64_t id =
        engine.submit(set->params(i), [queue, i](const engine::TokenEvent& e) { queue->push(i, e); }, &error);
    if (id < 0) {
      for (int64_t done : ids) cancel(done);
      if (starts_with(error, "the engine failed")) engine_failed = true;
      const bool unavailable =
          draining || starts_with(error, "the engine failed") || starts_with(error, "the server is shutting down");
      if (set->size() > 1 && !error.empty()) error = fmt::format("choice {}: {}", i, error);
      return reply_error(res, unavailable ? 503 : 400, error.empty() ? "the engine refused the request" : error);
    }
    ticket->add_engine_id(id);
    ids.push_back(id);
  }
  if (!api.stream) {
    serve_blocking(req, res, *set, *queue, ids, arrival);
    return;
  }
  auto st = std::make_shared<StreamState>();
  st->ticket = std::move(ticket);
  st->queue = std::move(queue);
  st->set = std::move(set);
  st->engine_ids = std::move(ids);
  st->cancel_sent.assign(st->engine_ids.size(), false);
  st->arrival = arrival;
  st->watch = std::make_unique<ConnectionWatch>(req);
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  res.set_chunked_content_provider(
      "text/event-stream", [this, st](size_t, httplib::DataSink& sink) { return pump(*st, sink); },
      [this, st](bool) {
        // Runs when the response is destroyed: a stream that did not reach its
        // end (client gone, write failed, server stopping) frees its requests.
        if (!st->set->done()) abandon(*st);
      });
}

void HttpServer::Impl::serve_blocking(const httplib::Request& req, httplib::Response& res, ResponseSet& set,
                                      EventQueue& queue, const std::vector<int64_t>& ids, Clock::time_point arrival) {
  ConnectionWatch watch(req);
  bool first_token_seen = false;
  std::vector<bool> cancel_sent(ids.size(), false);
  while (!set.done()) {
    for (const auto& [choice, e] : queue.take(250ms)) {
      on_event_seen(e, &first_token_seen, arrival);
      set.add_event(choice, e);
      if (set.done()) break;
    }
    cancel_ended(set, ids, cancel_sent);
    if (!set.done() && watch.client_gone()) {
      for (int64_t id : ids) cancel(id);
      record_finish(set, arrival, true);
      return reply_error(res, 499, "the client closed the connection");
    }
  }
  cancel_ended(set, ids, cancel_sent);  // (the others, where one choice failed)
  record_finish(set, arrival, false);
  res.status = set.final_status();
  res.set_content(set.final_body(), "application/json");
}

bool HttpServer::Impl::pump(StreamState& st, httplib::DataSink& sink) {
  std::string out;
  if (!st.started) {
    st.started = true;
    out = st.set->stream_start();
  }
  for (const auto& [choice, e] : st.queue->take(out.empty() ? 200ms : 0ms)) {
    on_event_seen(e, &st.first_token_seen, st.arrival);
    out += st.set->stream_event(choice, e);
    if (st.set->done()) break;
  }
  cancel_ended(*st.set, st.engine_ids, st.cancel_sent);
  if (!out.empty()) {
    if (!sink.write(out.data(), out.size())) {  // the client went away
      abandon(st);
      return false;
    }
    st.watch->touch();
  } else if (st.watch->client_gone()) {
    abandon(st);
    return false;
  }
  if (st.set->done()) {
    record_finish(*st.set, st.arrival, false);
    st.recorded = true;
    sink.done();
  }
  return true;
}

void HttpServer::Impl::abandon(StreamState& st) {
  for (int64_t id : st.engine_ids) cancel(id);
  if (!st.recorded) record_finish(*st.set, st.arrival, true);
  st.recorded = true;
}

void HttpServer::Impl::cancel_everything() {
  std::vector<int64_t> ids;
  {
    std::lock_guard<std::mutex> lock(mutex);
    cancel_all = true;
    for (const auto& [ticket, engine_ids] : inflight) ids.insert(ids.end(), engine_ids.begin(), engine_ids.end());
  }
  for (int64_t id : ids) engine.cancel(id);
}

void HttpServer::Impl::tick() {
  const engine::EngineStats s = engine.stats();
  std::lock_guard<std::mutex> lock(metrics_mutex);
  token_samples.emplace_back(Clock::now(), s.generated_tokens);
  while (token_samples.size() > 11) token_samples.pop_front();
}

std::string HttpServer::Impl::metrics() const {
  const engine::EngineStats s = engine.stats();
  size_t in_flight = 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    in_flight = inflight.size();
  }
  PrometheusWriter w;
  std::vector<std::pair<std::string, std::string>> build_labels;
  for (const auto& [key, value] : options.build_info.items())
    build_labels.emplace_back(key, value.is_string() ? value.get<std::string>() : value.dump());
  w.gauge("dsv4_build_info", "The program serving (its labels; the value is always 1).", 1.0, build_labels);
  w.gauge("dsv4_num_requests_running", "Requests in the running batch (admitted, holding cache state).",
          double(s.running));
  w.gauge("dsv4_num_requests_waiting", "Requests waiting for admission.", double(s.waiting));
  w.gauge("dsv4_kv_cache_usage_ratio", "Fraction of KV cache pages in use (0 to 1).", s.kv_usage);
  w.gauge("dsv4_kv_cache_free_pages", "KV cache pages free.", double(s.free_pages));
  w.counter("dsv4_prompt_tokens_total", "Prompt tokens computed (recomputation after preemption included).",
            double(s.prompt_tokens));
  w.counter("dsv4_generation_tokens_total", "Tokens generated.", double(s.generated_tokens));
  w.counter("dsv4_engine_finished_requests_total", "Requests the engine finished, for any reason.",
            double(s.finished_requests));
  w.counter("dsv4_num_preemptions_total", "Requests preempted for lack of cache pages (recomputed later).",
            double(s.preemptions));
  w.counter("dsv4_engine_steps_total", "Engine steps run.", double(s.steps));
  w.gauge("dsv4_step_time_seconds", "Duration of the last engine step.", s.last_step_ms / 1000.0);
  double rate = 0.0;
  std::map<std::pair<std::string, int>, uint64_t> http;
  std::map<std::string, uint64_t> finished;
  {
    std::lock_guard<std::mutex> lock(metrics_mutex);
    if (!token_samples.empty()) {
      const double dt = seconds_since(token_samples.front().first);
      if (dt > 0.5) rate = double(s.generated_tokens - token_samples.front().second) / dt;
    }
    http = http_requests;
    finished = finished_by_reason;
  }
  w.gauge("dsv4_generation_tokens_per_second", "Tokens generated per second over the last 10 seconds.", rate);
  w.gauge("dsv4_http_requests_in_flight", "Generation requests being served over HTTP.", double(in_flight));
  w.gauge("dsv4_server_healthy", "1 while serving; 0 when draining for shutdown or after an engine failure.",
          engine_failed || draining ? 0.0 : 1.0);
  for (const char* reason : {"stop", "length", "cancelled", "error"})
    w.counter("dsv4_request_finished_total",
              "Generation requests finished over HTTP, by finish reason (cancelled: client gone or shutdown).",
              double(finished.count(reason) ? finished.at(reason) : 0), {{"finished_reason", reason}});
  for (const auto& [key, n] : http)
    w.counter("dsv4_http_requests_total", "HTTP requests answered, by path and status.", double(n),
              {{"path", key.first}, {"status", std::to_string(key.second)}});
  ttft.write(w, "dsv4_time_to_first_token_seconds", "Time from request arrival to its first generated token.");
  e2e.write(w, "dsv4_e2e_request_latency_seconds", "Time from request arrival to its last token (completed requests).");
  return w.text();
}

HttpServer::HttpServer(engine::ServingEngine& engine, std::shared_ptr<const Tokenizer> tokenizer,
                       HttpServerOptions options)
    : impl_(std::make_unique<Impl>(engine, std::move(tokenizer), std::move(options))) {}

HttpServer::~HttpServer() {
  bool running = false;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    running = impl_->started && !impl_->stopped;
  }
  if (running) shutdown(/*force=*/true);
}

int HttpServer::start() {
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    DSV4_CHECK(!s.started, "HttpServer::start called twice");
  }
  s.routes();
  const int threads = std::max(s.options.num_threads, 4);
  s.server.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  s.server.set_socket_options([&s](socket_t sock) {
    httplib::default_socket_options(sock);
    s.listen_fd = sock;
  });
  s.server.set_tcp_nodelay(true);  // one small write per token: no Nagle delay
  s.server.set_keep_alive_timeout(std::max(s.options.keep_alive_timeout_s, 1));
  s.server.set_payload_max_length(s.options.max_body_bytes);
  int port = -1;
  if (s.options.port == 0) {
    port = s.server.bind_to_any_port(s.options.host);
  } else if (s.server.bind_to_port(s.options.host, s.options.port)) {
    port = s.options.port;
  }
  if (port <= 0)
    core::fail("cannot listen on {}:{} (address in use, not an address of this machine, or no permission)",
               s.options.host, s.options.port);
  // cpp-httplib listens with a backlog of 5; hundreds of clients connect at once.
  if (s.listen_fd >= 0) ::listen(s.listen_fd, 4096);
  s.bound_port = port;
  s.listener = std::thread([&s] { s.server.listen_after_bind(); });
  s.ticker = std::thread([&s] {
    std::unique_lock<std::mutex> lock(s.mutex);
    while (!s.stopping) {
      lock.unlock();
      s.tick();
      lock.lock();
      s.cv.wait_for(lock, 1s, [&] { return s.stopping; });
    }
  });
  std::lock_guard<std::mutex> lock(s.mutex);
  s.started = true;
  return port;
}

void HttpServer::request_shutdown(bool force) {
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (!s.shutdown_requested) {
      s.shutdown_requested = true;
      s.shutdown_at = Clock::now();
    }
    if (force) s.force = true;
    s.draining = true;
  }
  s.cv.notify_all();
}

void HttpServer::wait() {
  Impl& s = *impl_;
  std::unique_lock<std::mutex> lock(s.mutex);
  if (!s.started) return;
  s.cv.wait(lock, [&] { return s.shutdown_requested; });
  if (s.stopping) {  // another thread is stopping it
    s.cv.wait(lock, [&] { return s.stopped; });
    return;
  }
  s.stopping = true;
  s.cv.notify_all();  // the ticker
  // Drain: in-flight requests may finish until the grace period ends.
  const auto deadline =
      s.shutdown_at + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s.options.shutdown_grace_s));
  s.cv.wait_until(lock, deadline, [&] { return s.inflight.empty() || s.force; });
  if (!s.inflight.empty()) {
    std::fprintf(stderr, "dsv4 serve: cancelling %zu request(s) still running\n", s.inflight.size());
    lock.unlock();
    s.cancel_everything();
    lock.lock();
    // Cancelled requests end within an engine step; their handlers then write the
    // final event. A client that stopped reading holds one until the write timeout.
    s.cv.wait_for(lock, 15s, [&] { return s.inflight.empty(); });
  }
  lock.unlock();
  s.server.stop();
  if (s.listener.joinable()) s.listener.join();
  if (s.ticker.joinable()) s.ticker.join();
  lock.lock();
  s.stopped = true;
  s.cv.notify_all();
}

int HttpServer::port() const { return impl_->bound_port; }

bool HttpServer::healthy() const { return !impl_->engine_failed && !impl_->draining; }

size_t HttpServer::num_inflight() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->inflight.size();
}

std::string HttpServer::metrics_text() const { return impl_->metrics(); }

}  // namespace dsv4::serve
