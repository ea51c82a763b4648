// The OpenAI-compatible API: /v1/completions and /v1/chat/completions request
// bodies parsed and validated into engine requests, and the response bodies
// (JSON, or server-sent events ending in `data: [DONE]`) in the format OpenAI
// clients parse. No I/O here: http_server.cpp moves the bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/request.h"
#include "serve/tokenizer.h"

namespace dsv4::serve {

enum class ApiKind { kCompletion, kChat };

// A request the server refuses: HTTP status plus an OpenAI-style error body
// whose message names the field and what was expected.
class ApiError : public std::runtime_error {
 public:
  ApiError(int status, const std::string& message, std::string param = {}, std::string code = {})
      : std::runtime_error(message), status_(status), param_(std::move(param)), code_(std::move(code)) {}
  int status() const { return status_; }
  const std::string& param() const { return param_; }
  const std::string& code() const { return code_; }
  std::string body() const;

 private:
  int status_;
  std::string param_, code_;
};

// {"error": {"message", "type", "param", "code"}}; type is "invalid_request_error"
// for 4xx and "server_error" for 5xx; empty param/code become null.
std::string error_body(int status, const std::string& message, const std::string& param = {},
                       const std::string& code = {});

// What validation needs to know about the served model.
struct ModelInfo {
  std::string name;                     // --served-model-name; "model" must match it
  int32_t max_model_len = 0;            // prompt + max_tokens
  int64_t vocab_size = 0;               // token ids in [0, vocab_size)
  int32_t eos_token_id = 1;
  const Tokenizer* tokenizer = nullptr; // null: prompts must be token ids, outputs carry no text
};

struct ApiRequest {
  ApiKind kind = ApiKind::kCompletion;
  engine::RequestParams params;         // prompt tokens, max_tokens, sampling, stop ids, ignore_eos
  std::vector<std::string> stop;        // stop strings, matched on the detokenized text
  bool stream = false;
  bool include_usage = false;           // stream_options.include_usage
  bool include_stop_str_in_output = false;
  bool skip_special_tokens = true;
  bool return_token_ids = false;        // vLLM's extension: token ids next to the text
  // params.logprobs: completions' "logprobs" (an integer), chat's "top_logprobs" with "logprobs": true.
  // Completions' "echo": the prompt's text before the completion's, and with "logprobs" its
  // tokens' (params.prompt_logprobs) before the completion's tokens'.
  bool echo = false;
  bool score_only = false;  // echo with max_tokens 0: the prompt alone (params.max_tokens is 1)
  // Choices: `n` for each prompt; completions' prompt may be a batch, whose prompts after the
  // first are `more_prompts` (params as params, each its own prompt and max_tokens). The
  // choices are numbered prompt by prompt (choice_requests).
  int32_t n = 1;
  std::vector<engine::RequestParams> more_prompts;
  int32_t index = 0;     // this choice's "index" in the response (choice_requests)
  bool in_set = false;   // one choice of several: the usage chunk and [DONE] are the set's
};

// The most choices (prompts x n) one request may ask for.
constexpr int32_t kMaxChoices = 64;

// One ApiRequest a choice, in response order: prompt i's n choices at i * n .. i * n + n - 1,
// the j-th sampled with seed + j (the same draws as a request of that seed alone for j = 0).
std::vector<ApiRequest> choice_requests(const ApiRequest& request);

// The body as JSON; 400 naming the parse error when it is not a JSON object.
nlohmann::json parse_json_body(std::string_view body);
// Throw ApiError (400 for bad fields, 404 for an unknown model).
ApiRequest parse_completion_request(const nlohmann::json& body, const ModelInfo& model);
ApiRequest parse_chat_request(const nlohmann::json& body, const ModelInfo& model);

// Generated tokens to client text: streaming detokenization (never splits a UTF-8
// sequence), special tokens skipped on request, and stop strings. The output
// ends right before the earliest stop string (or after it with include_stop);
// text that could be the start of a stop string is held back until it can't.
class TextOutput {
 public:
  // min_tokens: no stop string is matched before that many tokens (vLLM's min_tokens); one that
  // begins in their text and ends after them still is.
  TextOutput(const Tokenizer* tokenizer, std::vector<std::string> stop, bool include_stop, bool skip_special,
             int32_t min_tokens = 0);
  // The text this token releases (often all of its text, may be empty).
  std::string push(int32_t token);
  // End of generation: releases what is held back.
  std::string finish();
  bool stopped() const { return stopped_; }  // a stop string matched; ignore later tokens
  // Characters (code points) of the text the tokens so far made, before any stop string cut it:
  // where the next token's text begins (completions' logprobs.text_offset).
  int64_t chars() const { return chars_; }

 private:
  std::string release(bool final);
  void hold(const std::string& text);

  std::optional<StreamingDetokenizer> detok_;
  std::vector<std::string> stop_;
  bool include_stop_;
  int32_t min_tokens_;
  int32_t tokens_ = 0;  // pushed so far
  std::string held_;
  int64_t chars_ = 0;
  bool stopped_ = false;
};

// "cmpl-" / "chatcmpl-" followed by 32 random hex digits.
std::string make_response_id(ApiKind kind);

// One response in the making: takes the engine's token events for one request,
// turns them into text, and writes either SSE chunks as they come or the whole
// JSON body at the end.
class ResponseBuilder {
 public:
  ResponseBuilder(const ApiRequest& request, const ModelInfo& model, std::string id, int64_t created);

  // Streaming. The first chunk (chat: the assistant role), then one chunk per
  // event (one per generated token, text possibly empty) until the last, which
  // carries finish_reason and is followed by the usage chunk (include_usage) and
  // `data: [DONE]`. Events after done() are ignored and return "".
  std::string stream_start();
  std::string stream_event(const engine::TokenEvent& event);
  // Ends the stream early with an error event and [DONE] (server shutdown).
  std::string stream_abort(const std::string& message);

  // Non-streaming: feed every event, then read the status and body.
  void add_event(const engine::TokenEvent& event);
  int final_status() const;
  std::string final_body() const;

  bool done() const { return done_; }
  bool failed() const { return !error_.empty(); }
  // Non-streaming: the body's choice object, and the error body where the request failed.
  nlohmann::ordered_json choice_json() const;
  std::string error_json() const;
  // True once the output ended before the engine finished (a stop string), so
  // the engine request should be cancelled.
  bool needs_cancel() const { return needs_cancel_; }
  int32_t completion_tokens() const { return completion_tokens_; }
  int32_t prompt_tokens() const { return int32_t(prompt_.size()); }
  const std::string& id() const { return id_; }
  // Why the request ended: "stop", "length", or "" while running / on errors.
  const std::string& finish_reason() const { return finish_reason_; }
  const std::string& error() const { return error_; }

 private:
  // A generated token's log-probabilities, with where its text begins.
  struct TokenLogprobs {
    int32_t token = -1;
    float logprob = 0.0f;
    std::vector<ops::TokenLogprob> top;
    int64_t text_offset = 0;
    bool unscored = false;  // the echoed prompt's first token: null log-probabilities
  };
  struct Delta {
    std::string text;
    std::vector<int32_t> ids;
    std::vector<TokenLogprobs> logprobs;  // one a token of ids where the request asked
    bool last = false;
  };
  Delta apply(const engine::TokenEvent& event);
  // Echo: the prompt's text and log-probabilities into `d`, ahead of the first token's.
  void echo_prompt(const engine::TokenEvent& event, Delta& d);
  // The choice's "logprobs": null where the request did not ask, else the endpoint's form.
  nlohmann::ordered_json logprobs_json(const std::vector<TokenLogprobs>& tokens) const;
  std::string token_text(int32_t token) const;

  ApiKind kind_;
  int32_t index_;
  bool in_set_;
  std::string id_, model_;
  int64_t created_;
  std::vector<int32_t> prompt_;
  std::vector<int32_t> stop_token_ids_;
  int32_t eos_;
  bool ignore_eos_, include_stop_, include_usage_, return_token_ids_;
  int32_t logprobs_;                  // RequestParams::logprobs
  bool echo_, score_only_, skip_special_;
  bool echoed_ = false;
  int64_t prompt_chars_ = 0;          // echo: the prompt text's characters (text offsets after it)
  const Tokenizer* tokenizer_;
  TextOutput text_out_;
  std::string text_;                  // non-streaming: all released text
  std::vector<int32_t> output_ids_;   // non-streaming: all generated ids
  std::vector<TokenLogprobs> output_logprobs_;  // non-streaming, where asked
  int32_t completion_tokens_ = 0;
  bool done_ = false;
  bool needs_cancel_ = false;
  std::string finish_reason_;
  std::string error_;
  int error_status_ = 0;
};

// A response of several choices (ApiRequest::n, a batch of prompts): a ResponseBuilder a
// choice, each fed its own engine request's events, merged into one body or one stream whose
// usage counts each prompt once and whose [DONE] follows the last choice's end. A choice that
// fails fails the response (its error, the others cancelled). One choice reads as a
// ResponseBuilder alone.
class ResponseSet {
 public:
  ResponseSet(const ApiRequest& request, const ModelInfo& model, std::string id, int64_t created);

  size_t size() const { return builders_.size(); }
  // What to submit for choice i.
  const engine::RequestParams& params(size_t i) const { return requests_[i].params; }

  std::string stream_start();
  std::string stream_event(size_t choice, const engine::TokenEvent& event);
  std::string stream_abort(const std::string& message);

  void add_event(size_t choice, const engine::TokenEvent& event);
  int final_status() const;
  std::string final_body() const;

  // Every choice ended, or one failed.
  bool done() const;
  // Choice i's engine request should be cancelled: its output ended first (a stop string), or
  // another choice failed.
  bool needs_cancel(size_t choice) const;
  const ResponseBuilder& choice(size_t i) const { return *builders_[i]; }

 private:
  int32_t prompt_tokens() const;
  int32_t completion_tokens() const;
  std::string stream_end();  // the usage chunk (include_usage) and [DONE]

  ApiKind kind_;
  std::string id_, model_;
  int64_t created_;
  bool include_usage_, return_token_ids_;
  int32_t n_;
  std::vector<ApiRequest> requests_;
  std::vector<std::unique_ptr<ResponseBuilder>> builders_;
  bool ended_ = false;  // streaming: [DONE] written
};

// /v1/models.
std::string models_body(const ModelInfo& model, int64_t created);

// Compact JSON that never throws on bad UTF-8 (replaced by U+FFFD).
std::string dump_json(const nlohmann::json& json);

}  // namespace dsv4::serve
