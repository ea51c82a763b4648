// The HTTP front end: OpenAI-compatible endpoints over a ServingEngine.
//
//   POST /v1/completions, /v1/chat/completions   JSON or server-sent events
//   GET  /v1/models                              the one served model
//   GET  /health                                 200 while serving; 503 draining or after an engine failure
//   GET  /metrics                                Prometheus text (dsv4_* gauges, counters, histograms)
//
// Each connection holds one worker thread (cpp-httplib), so a streaming client
// holds one for its whole generation: num_threads bounds concurrent clients.
// Token events arrive on the engine thread and go into a per-request queue that
// the connection's thread drains; the engine thread never waits on a client.
// A client that goes away mid-request has its engine request cancelled.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/serving_engine.h"
#include "serve/tokenizer.h"

namespace dsv4::serve {

struct HttpServerOptions {
  std::string host = "0.0.0.0";
  int port = 8000;                      // 0: any free port (see HttpServer::start)
  std::string served_model_name = "dsv4";
  int num_threads = 512;                // connections served at once
  double shutdown_grace_s = 30.0;       // in-flight requests may finish this long after shutdown starts
  int keep_alive_timeout_s = 5;         // idle keep-alive connections close after this
  size_t max_body_bytes = 64u << 20;
  // What the program is (dsv4: version, commit, build type...): a JSON object, served as
  // GET /version with its types, and as the labels of /metrics' dsv4_build_info gauge
  // (value 1; a label's value is the field's text: a string as it is, else its JSON).
  nlohmann::json build_info = nlohmann::json::object();
};

class HttpServer {
 public:
  // `tokenizer` may be null: prompts must be token ids and outputs carry no text.
  // The engine must outlive the server.
  HttpServer(engine::ServingEngine& engine, std::shared_ptr<const Tokenizer> tokenizer, HttpServerOptions options);
  ~HttpServer();  // shuts down (forced) if still running
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and serves on background threads; returns the port. Throws core::Error
  // naming the address when it cannot bind.
  int start();
  // Thread-safe, returns at once. The first call starts a graceful shutdown: new
  // requests get 503, /health turns 503, in-flight requests may finish for the
  // grace period and are cancelled after it. force=true cancels them now.
  void request_shutdown(bool force = false);
  // Blocks until shutdown was requested and is complete (requests finished or
  // cancelled, listener stopped, threads joined).
  void wait();
  void shutdown(bool force = false) {
    request_shutdown(force);
    wait();
  }

  int port() const;
  bool healthy() const;
  size_t num_inflight() const;  // generation requests being served
  std::string metrics_text() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv4::serve
