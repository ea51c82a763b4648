#include "serve/openai_api.h"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "core/error.h"
#include "serve/chat_template.h"

namespace dsv4::serve {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;  // responses keep OpenAI's key order

std::string dump_json(const nlohmann::json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

namespace {

std::string dump_ordered(const ojson& j) { return j.dump(-1, ' ', false, ojson::error_handler_t::replace); }

uint64_t random_u64() {
  thread_local std::mt19937_64 rng([] {
    std::random_device rd;
    return (uint64_t(rd()) << 32) ^ rd() ^ std::hash<std::thread::id>{}(std::this_thread::get_id()) ^
           uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  }());
  return rng();
}

// A value as the client sent it, shortened for messages.
std::string show(const json& v) {
  std::string s = dump_json(v);
  if (s.size() > 96) {
    size_t cut = 93;
    while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;  // not inside a UTF-8 sequence
    s = s.substr(0, cut) + "...";
  }
  return s;
}

[[noreturn]] void bad(const std::string& field, const std::string& expected, const json& got) {
  throw ApiError(400, fmt::format("{} must be {}, got {}", field, expected, show(got)), field);
}

[[noreturn]] void missing(const std::string& field, const std::string& expected) {
  throw ApiError(400, fmt::format("{} is required: {}", field, expected), field);
}

// The field, or null when absent or JSON null (OpenAI clients send null for "default").
const json* find(const json& obj, const char* name) {
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

bool integral(const json& v) {
  if (v.is_number_integer()) return true;
  if (!v.is_number_float()) return false;
  const double d = v.get<double>();
  return std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15;
}

// Integer value of an integral JSON number, saturated to int64.
int64_t to_int64(const json& v) {
  if (v.is_number_unsigned()) return int64_t(std::min<uint64_t>(v.get<uint64_t>(), uint64_t(INT64_MAX)));
  if (v.is_number_integer()) return v.get<int64_t>();
  return int64_t(v.get<double>());
}

bool get_bool(const json& body, const char* name, bool fallback) {
  const json* v = find(body, name);
  if (!v) return fallback;
  if (!v->is_boolean()) bad(name, "true or false", *v);
  return v->get<bool>();
}

std::optional<int64_t> get_int(const json& body, const char* name, int64_t lo, int64_t hi, const std::string& expected) {
  const json* v = find(body, name);
  if (!v) return std::nullopt;
  if (!integral(*v)) bad(name, expected, *v);
  const int64_t x = to_int64(*v);
  if (x < lo || x > hi) bad(name, expected, *v);
  return x;
}

double get_number(const json& body, const char* name, double fallback, double lo, double hi, bool lo_open,
                  const std::string& expected) {
  const json* v = find(body, name);
  if (!v) return fallback;
  if (!v->is_number()) bad(name, expected, *v);
  const double x = v->get<double>();
  if (!std::isfinite(x) || x > hi || x < lo || (lo_open && x == lo)) bad(name, expected, *v);
  return x;
}

// Fields this server cannot honour are refused rather than silently ignored,
// unless they carry their neutral value.
void reject_unsupported(const json& body, ApiKind kind) {
  if (const json* v = find(body, "echo"); v && kind == ApiKind::kChat && !(v->is_boolean() && !v->get<bool>()))
    throw ApiError(400,
                   fmt::format("echo is a /v1/completions field (the prompt returned before the completion); chat "
                               "completions do not take it, got {}",
                               show(*v)),
                   "echo");
  if (const json* v = find(body, "use_beam_search"); v && !(v->is_boolean() && !v->get<bool>()))
    throw ApiError(400, "use_beam_search is not supported by this server", "use_beam_search");
  if (const json* v = find(body, "suffix"); v && !(v->is_string() && v->get<std::string>().empty()))
    throw ApiError(400, "suffix is not supported by this server", "suffix");
  if (const json* v = find(body, "tools"); v && !(v->is_array() && v->empty()))
    throw ApiError(400, "tools (function calling) are not supported by this server yet", "tools");
  if (const json* v = find(body, "response_format"); v) {
    const json* type = v->is_object() ? find(*v, "type") : nullptr;
    if (!type || *type != "text")
      throw ApiError(400,
                     fmt::format("response_format must be {{\"type\": \"text\"}} (structured output is not supported), got {}",
                                 show(*v)),
                     "response_format");
  }
}

void check_model(const json& body, const ModelInfo& model) {
  const json* v = find(body, "model");
  if (!v) return;  // the one served model
  if (!v->is_string()) bad("model", fmt::format("a string naming the served model (\"{}\")", model.name), *v);
  if (v->get<std::string>() != model.name)
    throw ApiError(404, fmt::format("The model `{}` does not exist; this server serves `{}`", v->get<std::string>(),
                                    model.name),
                   "model", "model_not_found");
}

std::vector<int32_t> token_ids(const json& arr, const std::string& field, int64_t vocab) {
  std::vector<int32_t> ids;
  ids.reserve(arr.size());
  for (size_t i = 0; i < arr.size(); ++i) {
    const json& t = arr[i];
    if (!integral(t) || to_int64(t) < 0 || to_int64(t) >= vocab)
      bad(fmt::format("{}[{}]", field, i), fmt::format("a token id in [0, {})", vocab), t);
    ids.push_back(int32_t(to_int64(t)));
  }
  return ids;
}

std::vector<int32_t> encode_prompt_text(const std::string& text, const ModelInfo& model) {
  if (!model.tokenizer)
    throw ApiError(400,
                   "prompt is text, but this server runs without a tokenizer (start it with --tokenizer DIR); send "
                   "the prompt as an array of token ids",
                   "prompt");
  // Completions get the BOS the DeepSeek tokenizer config adds (add_bos_token), as HF does.
  std::vector<int32_t> ids = model.tokenizer->encode(text, /*allow_special=*/true);
  if (ids.empty() || ids.front() != model.tokenizer->bos_id()) ids.insert(ids.begin(), model.tokenizer->bos_id());
  return ids;
}

// One prompt under the name `field`; `expected` says what it may be where it is neither a string nor an array.
std::vector<int32_t> parse_one_prompt(const json& p, const std::string& field, const std::string& expected,
                                      const ModelInfo& model) {
  std::vector<int32_t> ids;
  if (p.is_string()) {
    if (p.get<std::string>().empty()) bad(field, "a non-empty string or array of token ids", p);
    ids = encode_prompt_text(p.get<std::string>(), model);
  } else if (p.is_array()) {
    if (p.empty()) bad(field, "a non-empty string or array of token ids", p);
    ids = token_ids(p, field, model.vocab_size);
  } else {
    bad(field, expected, p);
  }
  return ids;
}

// One prompt (a string or token ids), or a batch of them (an array of strings or of token-id
// arrays), each validated under its own name (prompt[i]).
std::vector<std::vector<int32_t>> parse_prompts(const json& body, const ModelInfo& model) {
  const char* expected = "a string, an array of token ids, or a batch of them (an array of strings or of arrays)";
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) missing("prompt", expected);
  const json& p = *it;
  if (!p.is_array() || p.empty() || !(p[0].is_string() || p[0].is_array())) {
    return {parse_one_prompt(p, "prompt", expected, model)};
  }
  std::vector<std::vector<int32_t>> batch;
  for (size_t i = 0; i < p.size(); ++i) {
    batch.push_back(parse_one_prompt(p[i], fmt::format("prompt[{}]", i),
                                     "a string or an array of token ids (as the batch's first prompt)", model));
  }
  return batch;
}

// n choices for each prompt; best_of only as n (this server returns every choice it makes).
int32_t parse_n(const json& body, size_t prompts) {
  const auto n = get_int(body, "n", 1, kMaxChoices, fmt::format("an integer in [1, {}]", kMaxChoices));
  const int32_t choices = int32_t(n.value_or(1));
  if (const json* v = find(body, "best_of"); v && !v->is_null()) {
    if (!integral(*v) || to_int64(*v) != choices)
      throw ApiError(400,
                     fmt::format("best_of ({}) other than n ({}) is not supported: this server returns every choice "
                                 "it makes; leave best_of out",
                                 show(*v), choices),
                     "best_of");
  }
  if (int64_t(prompts) * choices > kMaxChoices)
    throw ApiError(400,
                   fmt::format("{} prompts x n {} = {} choices; this server answers at most {} in one request",
                               prompts, choices, int64_t(prompts) * choices, kMaxChoices),
                   prompts > 1 ? "prompt" : "n");
  return choices;
}

std::vector<ChatMessage> parse_messages(const json& body) {
  const char* expected = "a non-empty array of {\"role\", \"content\"} objects";
  auto it = body.find("messages");
  if (it == body.end() || it->is_null()) missing("messages", expected);
  if (!it->is_array() || it->empty()) bad("messages", expected, *it);
  std::vector<ChatMessage> messages;
  for (size_t i = 0; i < it->size(); ++i) {
    const json& m = (*it)[i];
    const std::string field = fmt::format("messages[{}]", i);
    if (!m.is_object()) bad(field, "an object with \"role\" and \"content\"", m);
    auto role = m.find("role");
    if (role == m.end() || role->is_null()) missing(field + ".role", "one of system, user, assistant");
    if (!role->is_string() || (*role != "system" && *role != "user" && *role != "assistant"))
      bad(field + ".role", "one of system, user, assistant", *role);
    ChatMessage msg;
    msg.role = role->get<std::string>();
    auto content = m.find("content");
    const std::string cfield = field + ".content";
    if (content == m.end() || content->is_null()) {
      if (msg.role != "assistant") missing(cfield, "a string or an array of text parts");
    } else if (content->is_string()) {
      msg.content = content->get<std::string>();
    } else if (content->is_array()) {
      for (size_t j = 0; j < content->size(); ++j) {
        const json& part = (*content)[j];
        const std::string pfield = fmt::format("{}[{}]", cfield, j);
        if (!part.is_object()) bad(pfield, "a {\"type\": \"text\", \"text\": ...} object", part);
        auto type = part.find("type");
        if (type == part.end() || *type != "text")
          bad(pfield + ".type", "\"text\" (this server takes text only)", type == part.end() ? json(nullptr) : *type);
        auto text = part.find("text");
        if (text == part.end() || !text->is_string())
          bad(pfield + ".text", "a string", text == part.end() ? json(nullptr) : *text);
        if (j) msg.content += "\n";
        msg.content += text->get<std::string>();
      }
    } else {
      bad(cfield, "a string or an array of text parts", *content);
    }
    messages.push_back(std::move(msg));
  }
  return messages;
}

// Sampling, stops and stream options shared by both endpoints.
void parse_common(const json& body, const ModelInfo& model, ApiRequest& r) {
  engine::SamplingParams& s = r.params.sampling;
  s.temperature = float(get_number(body, "temperature", 1.0, 0.0, 2.0, false, "a number in [0, 2]"));
  s.top_p = float(get_number(body, "top_p", 1.0, 0.0, 1.0, true, "a number in (0, 1]"));
  if (auto k = get_int(body, "top_k", -1, INT32_MAX, "an integer >= -1 (-1 or 0: no limit)")) s.top_k = int32_t(std::max<int64_t>(*k, 0));
  // vLLM's min_p: a token at least min_p times as likely as the most likely one (at the temperature) is kept.
  s.min_p = float(get_number(body, "min_p", 0.0, 0.0, 1.0, false, "a number in [0, 1]"));
  // OpenAI's ranges; the repetition penalty's is vLLM's.
  s.presence_penalty = float(get_number(body, "presence_penalty", 0.0, -2.0, 2.0, false, "a number in [-2, 2]"));
  s.frequency_penalty = float(get_number(body, "frequency_penalty", 0.0, -2.0, 2.0, false, "a number in [-2, 2]"));
  s.repetition_penalty = float(get_number(body, "repetition_penalty", 1.0, 0.0, 2.0, true, "a number in (0, 2]"));
  // {"token id": bias in [-100, 100]}, added to the token's logit (OpenAI's form: ids as keys).
  if (const json* v = find(body, "logit_bias")) {
    if (!v->is_object()) bad("logit_bias", "an object mapping token ids to biases in [-100, 100]", *v);
    for (const auto& [key, bias] : v->items()) {
      const std::string field = fmt::format("logit_bias[\"{}\"]", key);
      int64_t id = -1;
      const auto [end, ec] = std::from_chars(key.data(), key.data() + key.size(), id);
      if (ec != std::errc() || end != key.data() + key.size() || id < 0 || id >= model.vocab_size)
        throw ApiError(400,
                       fmt::format("logit_bias: the key \"{}\" is not a token id in [0, {})", key, model.vocab_size),
                       "logit_bias");
      if (!bias.is_number() || !std::isfinite(bias.get<double>()) || std::abs(bias.get<double>()) > 100.0)
        bad(field, "a number in [-100, 100]", bias);
      if (bias.get<double>() != 0.0) s.logit_bias.emplace_back(int32_t(id), float(bias.get<double>()));
    }
    std::sort(s.logit_bias.begin(), s.logit_bias.end());  // (distinct: JSON keys; "07" and "7" would not be)
    for (size_t i = 1; i < s.logit_bias.size(); ++i)
      if (s.logit_bias[i].first == s.logit_bias[i - 1].first)
        throw ApiError(400, fmt::format("logit_bias names token {} twice", s.logit_bias[i].first), "logit_bias");
  }
  if (const json* v = find(body, "seed")) {
    if (!integral(*v)) bad("seed", "an integer", *v);
    s.seed = v->is_number_unsigned() ? v->get<uint64_t>() : uint64_t(to_int64(*v));
  } else {
    s.seed = random_u64();
  }

  if (const json* v = find(body, "stop")) {
    if (v->is_string()) {
      if (v->get<std::string>().empty()) bad("stop", "a non-empty string or an array of non-empty strings", *v);
      r.stop.push_back(v->get<std::string>());
    } else if (v->is_array()) {
      for (size_t i = 0; i < v->size(); ++i) {
        const json& x = (*v)[i];
        if (!x.is_string() || x.get<std::string>().empty()) bad(fmt::format("stop[{}]", i), "a non-empty string", x);
        r.stop.push_back(x.get<std::string>());
      }
    } else {
      bad("stop", "a string or an array of strings", *v);
    }
    if (!r.stop.empty() && !model.tokenizer)
      throw ApiError(400, "stop strings need a tokenizer, and this server runs without one; use stop_token_ids",
                     "stop");
  }
  if (const json* v = find(body, "stop_token_ids")) {
    if (!v->is_array()) bad("stop_token_ids", "an array of token ids", *v);
    r.params.stop_token_ids = token_ids(*v, "stop_token_ids", model.vocab_size);
  }

  r.stream = get_bool(body, "stream", false);
  if (const json* v = find(body, "stream_options")) {
    if (!v->is_object()) bad("stream_options", "an object such as {\"include_usage\": true}", *v);
    if (!r.stream) throw ApiError(400, "stream_options is only allowed with \"stream\": true", "stream_options");
    if (const json* u = find(*v, "include_usage")) {
      if (!u->is_boolean()) bad("stream_options.include_usage", "true or false", *u);
      r.include_usage = u->get<bool>();
    }
  }
  r.params.ignore_eos = get_bool(body, "ignore_eos", false);
  if (auto m = get_int(body, "min_tokens", 0, INT32_MAX, "an integer >= 0")) r.params.min_tokens = int32_t(*m);
  r.skip_special_tokens = get_bool(body, "skip_special_tokens", true);
  r.include_stop_str_in_output = get_bool(body, "include_stop_str_in_output", false);
  r.return_token_ids = get_bool(body, "return_token_ids", false);
  reject_unsupported(body, r.kind);
}

// Completions: "logprobs": N lists each token's log-probability and the N most likely tokens'
// (false or null: none). Chat: "logprobs": true, with "top_logprobs": N alternatives.
void parse_logprobs(const json& body, ApiKind kind, ApiRequest& r) {
  const std::string range = fmt::format("[0, {}]", engine::kMaxLogprobs);
  if (kind == ApiKind::kCompletion) {
    if (const json* v = find(body, "logprobs"); v && !(v->is_boolean() && !v->get<bool>())) {
      if (!integral(*v) || to_int64(*v) < 0 || to_int64(*v) > engine::kMaxLogprobs)
        bad("logprobs", fmt::format("an integer in {}: how many of the most likely tokens to list beside each token",
                                    range),
            *v);
      r.params.logprobs = int32_t(to_int64(*v));
    }
    if (const json* v = find(body, "top_logprobs"); v && !(integral(*v) && to_int64(*v) == 0))
      throw ApiError(400,
                     fmt::format("top_logprobs is a chat completions field; /v1/completions takes \"logprobs\": N, "
                                 "got top_logprobs {}",
                                 show(*v)),
                     "top_logprobs");
    return;
  }
  const bool wanted = get_bool(body, "logprobs", false);
  const auto top = get_int(body, "top_logprobs", 0, engine::kMaxLogprobs, "an integer in " + range);
  if (top && *top > 0 && !wanted)
    throw ApiError(400, fmt::format("top_logprobs ({}) needs \"logprobs\": true", *top), "top_logprobs");
  if (wanted) r.params.logprobs = int32_t(top.value_or(0));
}

// max_tokens against the context: prompt + max_tokens <= max_model_len.
void fit_length(ApiRequest& r, const ModelInfo& model, std::optional<int64_t> requested, int64_t fallback,
                const char* prompt_field, const char* max_field) {
  const int64_t prompt = int64_t(r.params.prompt.size());
  const int64_t limit = model.max_model_len;
  if (prompt >= limit)
    throw ApiError(400,
                   fmt::format("This model's maximum context length is {} tokens, but the {} has {} tokens, which "
                               "leaves no room for the completion. Please shorten the {}.",
                               limit, prompt_field, prompt, prompt_field),
                   prompt_field);
  int64_t max_tokens = requested ? *requested : std::min(fallback, limit - prompt);
  if (prompt + max_tokens > limit)
    throw ApiError(400,
                   fmt::format("This model's maximum context length is {} tokens. However, you requested {} tokens "
                               "({} in the {}, {} in the completion). Please reduce the length of the {} or {}.",
                               limit, prompt + max_tokens, prompt, prompt_field, max_tokens, prompt_field, max_field),
                   max_field);
  r.params.max_tokens = int32_t(max_tokens);
  if (r.params.min_tokens > max_tokens)
    throw ApiError(400,
                   fmt::format("min_tokens ({}) must not exceed {} ({}{})", r.params.min_tokens, max_field, max_tokens,
                               requested ? "" : ", its default here"),
                   "min_tokens");
}

}  // namespace

std::string ApiError::body() const { return error_body(status_, what(), param_, code_); }

std::string error_body(int status, const std::string& message, const std::string& param, const std::string& code) {
  ojson e;
  e["message"] = message;
  e["type"] = status >= 500 ? "server_error" : "invalid_request_error";
  e["param"] = param.empty() ? ojson(nullptr) : ojson(param);
  e["code"] = code.empty() ? ojson(nullptr) : ojson(code);
  ojson body;
  body["error"] = e;
  return dump_ordered(body);
}

nlohmann::json parse_json_body(std::string_view body) {
  if (body.find_first_not_of(" \t\r\n") == std::string_view::npos)
    throw ApiError(400, "the request body is empty; expected a JSON object");
  json j;
  try {
    j = json::parse(body);
  } catch (const json::parse_error& e) {
    std::string what = e.what();
    if (auto p = what.find("] "); what.rfind("[json.exception", 0) == 0 && p != std::string::npos)
      what = what.substr(p + 2);
    throw ApiError(400, fmt::format("the request body is not valid JSON: {}", what));
  }
  if (!j.is_object()) throw ApiError(400, fmt::format("the request body must be a JSON object, got {}", show(j)));
  return j;
}

ApiRequest parse_completion_request(const nlohmann::json& body, const ModelInfo& model) {
  ApiRequest r;
  r.kind = ApiKind::kCompletion;
  check_model(body, model);
  const std::vector<std::vector<int32_t>> prompts = parse_prompts(body, model);
  r.echo = get_bool(body, "echo", false);
  // With echo, max_tokens 0 scores the prompt alone (the engine runs one token, not returned).
  const auto max_tokens = get_int(body, "max_tokens", r.echo ? 0 : 1, INT32_MAX,
                                  r.echo ? "an integer >= 0 (0 with echo: the prompt alone)" : "an integer >= 1");
  parse_common(body, model, r);
  parse_logprobs(body, r.kind, r);
  r.n = parse_n(body, prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    ApiRequest one = r;  // (its params: the sampling, stops and logprobs parsed above)
    one.params.prompt = prompts[i];
    const std::string field = prompts.size() > 1 ? fmt::format("prompt[{}]", i) : "prompt";
    fit_length(one, model, max_tokens, 16, field.c_str(), "max_tokens");
    if (r.echo && one.params.max_tokens == 0) {
      r.score_only = true;
      one.params.max_tokens = 1;
    }
    if (r.echo) one.params.prompt_logprobs = one.params.logprobs;
    if (i == 0) r.params = one.params;
    else r.more_prompts.push_back(one.params);
  }
  return r;
}

ApiRequest parse_chat_request(const nlohmann::json& body, const ModelInfo& model) {
  ApiRequest r;
  r.kind = ApiKind::kChat;
  check_model(body, model);
  std::vector<ChatMessage> messages = parse_messages(body);
  const bool add_generation_prompt = get_bool(body, "add_generation_prompt", true);
  auto max_tokens = get_int(body, "max_completion_tokens", 1, INT32_MAX, "an integer >= 1");
  const char* max_field = "max_completion_tokens";
  if (auto legacy = get_int(body, "max_tokens", 1, INT32_MAX, "an integer >= 1"); legacy && !max_tokens) {
    max_tokens = legacy;
    max_field = "max_tokens";
  }
  parse_common(body, model, r);
  parse_logprobs(body, r.kind, r);
  r.n = parse_n(body, 1);
  if (!model.tokenizer)
    throw ApiError(400,
                   "chat completions need a tokenizer, and this server runs without one (start it with --tokenizer "
                   "DIR); use /v1/completions with token ids",
                   "messages");
  std::string text;
  try {
    text = apply_chat_template(messages, add_generation_prompt);
  } catch (const core::Error& e) {
    throw ApiError(400, fmt::format("messages: {}", e.what()), "messages");
  }
  r.params.prompt = model.tokenizer->encode(text, /*allow_special=*/true);
  fit_length(r, model, max_tokens, INT32_MAX, "messages", max_field);
  return r;
}

// --- TextOutput ---

TextOutput::TextOutput(const Tokenizer* tokenizer, std::vector<std::string> stop, bool include_stop,
                       bool skip_special, int32_t min_tokens)
    : stop_(std::move(stop)), include_stop_(include_stop), min_tokens_(min_tokens) {
  if (tokenizer) detok_.emplace(*tokenizer, skip_special);
}

std::string TextOutput::push(int32_t token) {
  if (stopped_ || !detok_) return {};
  ++tokens_;
  hold(detok_->push(token));
  return release(false);
}

std::string TextOutput::finish() {
  if (stopped_ || !detok_) return {};
  hold(detok_->flush());
  return release(true);
}

void TextOutput::hold(const std::string& text) {
  for (const char c : text) chars_ += (static_cast<unsigned char>(c) & 0xC0) != 0x80;  // lead bytes: valid UTF-8
  held_ += text;
}

std::string TextOutput::release(bool final) {
  size_t best = std::string::npos, best_len = 0;
  // (before min_tokens only the tail that may begin a stop string is held back)
  if (tokens_ >= min_tokens_)
    for (const std::string& s : stop_) {
      const size_t pos = held_.find(s);
      if (pos < best) {
        best = pos;
        best_len = s.size();
      }
    }
  if (best != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, best + (include_stop_ ? best_len : 0));
    held_.clear();
    return out;
  }
  if (final) return std::exchange(held_, {});
  // Keep the longest suffix that is a proper prefix of some stop string: any
  // match still to come starts there (a longer one would already be complete).
  size_t keep = 0;
  for (const std::string& s : stop_)
    for (size_t k = std::min(s.size() - 1, held_.size()); k > keep; --k)
      if (held_.compare(held_.size() - k, k, s, 0, k) == 0) {
        keep = k;
        break;
      }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

// --- responses ---

std::string make_response_id(ApiKind kind) {
  return fmt::format("{}-{:016x}{:016x}", kind == ApiKind::kChat ? "chatcmpl" : "cmpl", random_u64(), random_u64());
}

std::vector<ApiRequest> choice_requests(const ApiRequest& request) {
  std::vector<engine::RequestParams> prompts = {request.params};
  prompts.insert(prompts.end(), request.more_prompts.begin(), request.more_prompts.end());
  std::vector<ApiRequest> out;
  for (const engine::RequestParams& p : prompts)
    for (int32_t j = 0; j < request.n; ++j) {
      ApiRequest c = request;
      c.more_prompts.clear();
      c.n = 1;
      c.params = p;
      c.params.sampling.seed = p.sampling.seed + uint64_t(j);
      c.index = int32_t(out.size());
      c.in_set = true;
      out.push_back(std::move(c));
    }
  return out;
}

ResponseBuilder::ResponseBuilder(const ApiRequest& request, const ModelInfo& model, std::string id, int64_t created)
    : kind_(request.kind),
      index_(request.index),
      in_set_(request.in_set),
      id_(std::move(id)),
      model_(model.name),
      created_(created),
      prompt_(request.params.prompt),
      stop_token_ids_(request.params.stop_token_ids),
      eos_(model.eos_token_id),
      ignore_eos_(request.params.ignore_eos),
      include_stop_(request.include_stop_str_in_output),
      include_usage_(request.stream && request.include_usage),
      return_token_ids_(request.return_token_ids),
      logprobs_(request.params.logprobs),
      echo_(request.echo),
      score_only_(request.score_only),
      skip_special_(request.skip_special_tokens),
      tokenizer_(model.tokenizer),
      text_out_(model.tokenizer, request.stop, request.include_stop_str_in_output, request.skip_special_tokens,
                request.params.min_tokens) {}

void ResponseBuilder::echo_prompt(const engine::TokenEvent& e, Delta& d) {
  // The prompt's text as the tokenizer gives it back (special tokens as the request asks), each
  // token's text offset in it, and its log-probabilities where the request asked: the first
  // token has none (null), the others are the engine's scores (TokenEvent::prompt_logprobs).
  TextOutput prompt_text(tokenizer_, {}, false, skip_special_);
  const bool scored = logprobs_ >= 0 && e.prompt_logprobs.size() + 1 == prompt_.size();
  if (logprobs_ >= 0 && !scored)
    error_ = fmt::format("the engine returned {} prompt log-probabilities for a prompt of {} tokens",
                         e.prompt_logprobs.size(), prompt_.size());
  for (size_t i = 0; i < prompt_.size(); ++i) {
    if (scored) {
      TokenLogprobs t{prompt_[i], 0.0f, {}, prompt_text.chars(), i == 0};
      if (i > 0) t.logprob = e.prompt_logprobs[i - 1].logprob, t.top = e.prompt_logprobs[i - 1].top;
      d.logprobs.push_back(std::move(t));
    }
    d.text += prompt_text.push(prompt_[i]);
  }
  d.text += prompt_text.finish();
  prompt_chars_ = prompt_text.chars();
}

ResponseBuilder::Delta ResponseBuilder::apply(const engine::TokenEvent& e) {
  Delta d;
  if (done_) return d;
  if (echo_ && e.token >= 0 && !echoed_) {
    echoed_ = true;
    echo_prompt(e, d);
    if (!error_.empty()) {
      error_status_ = 500;
      done_ = d.last = true;
      needs_cancel_ = !e.finished;
      return d;
    }
  }
  if (score_only_ && e.token >= 0) {
    // max_tokens 0: the engine's one token (it had to run the prompt) is not returned.
    done_ = d.last = true;
    finish_reason_ = "length";
    needs_cancel_ = !e.finished;
    return d;
  }
  if (e.token >= 0) {
    ++completion_tokens_;
    d.ids.push_back(e.token);
    if (logprobs_ >= 0) d.logprobs.push_back({e.token, e.logprob, e.top_logprobs, prompt_chars_ + text_out_.chars()});
    // The token that stopped generation (EOS, stop_token_ids) is not part of the text.
    const bool stop_token =
        e.finished && e.reason == engine::FinishReason::kStop &&
        ((!ignore_eos_ && e.token == eos_) ||
         std::find(stop_token_ids_.begin(), stop_token_ids_.end(), e.token) != stop_token_ids_.end());
    if (!stop_token || include_stop_) d.text += text_out_.push(e.token);
    if (text_out_.stopped()) {
      done_ = d.last = true;
      finish_reason_ = "stop";
      needs_cancel_ = !e.finished;
      return d;
    }
  }
  if (e.finished) {
    d.text += text_out_.finish();
    done_ = d.last = true;
    switch (e.reason) {
      case engine::FinishReason::kLength: finish_reason_ = "length"; break;
      case engine::FinishReason::kStop: finish_reason_ = "stop"; break;
      case engine::FinishReason::kCancelled:
        error_ = "the request was cancelled before it finished (the server is shutting down)";
        error_status_ = 503;
        break;
      default:
        error_ = e.error.empty() ? "generation failed" : e.error;
        error_status_ = 500;
        break;
    }
    if (error_.empty() && text_out_.stopped()) finish_reason_ = "stop";
  }
  return d;
}

namespace {

ojson usage_json(int32_t prompt, int32_t completion) {
  ojson u;
  u["prompt_tokens"] = prompt;
  u["completion_tokens"] = completion;
  u["total_tokens"] = prompt + completion;
  return u;
}

ojson head(const std::string& id, const char* object, int64_t created, const std::string& model) {
  ojson c;
  c["id"] = id;
  c["object"] = object;
  c["created"] = created;
  c["model"] = model;
  return c;
}

std::string sse_ordered(const ojson& data) { return "data: " + dump_ordered(data) + "\n\n"; }

// A log-probability as JSON: the float's shortest decimal; -inf as -9999 (JSON has no infinities;
// vLLM's convention); NaN (a row with no finite logit) as null.
ojson logprob_json(float logprob) {
  if (logprob != logprob) return nullptr;
  return std::strtod(fmt::format("{}", std::max(logprob, -9999.0f)).c_str(), nullptr);
}

}  // namespace

std::string ResponseBuilder::token_text(int32_t token) const {
  // Without a tokenizer a token is named by its id, as vLLM's return_tokens_as_token_ids.
  return tokenizer_ ? std::string(tokenizer_->token_bytes(token)) : fmt::format("token_id:{}", token);
}

nlohmann::ordered_json ResponseBuilder::logprobs_json(const std::vector<TokenLogprobs>& tokens) const {
  if (logprobs_ < 0) return nullptr;
  if (kind_ == ApiKind::kChat) {
    // {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
    auto entry = [&](int32_t token, float logprob) {
      const std::string text = token_text(token);
      ojson e;
      e["token"] = text;  // bytes that are not valid UTF-8 are written as U+FFFD; "bytes" has them exact
      e["logprob"] = logprob_json(logprob);
      ojson bytes = ojson::array();
      for (const unsigned char c : text) bytes.push_back(int(c));
      e["bytes"] = bytes;
      return e;
    };
    ojson content = ojson::array();
    for (const TokenLogprobs& t : tokens) {
      ojson e = entry(t.token, t.logprob);
      ojson top = ojson::array();
      for (const ops::TokenLogprob& a : t.top) top.push_back(entry(a.id, a.logprob));
      e["top_logprobs"] = top;
      content.push_back(e);
    }
    ojson r;
    r["content"] = content;
    return r;
  }
  // {"tokens", "token_logprobs", "top_logprobs": [{text: logprob}], "text_offset"}
  ojson text = ojson::array(), logprob = ojson::array(), top = ojson::array(), offset = ojson::array();
  for (const TokenLogprobs& t : tokens) {
    text.push_back(token_text(t.token));
    offset.push_back(t.text_offset);
    if (t.unscored) {  // the prompt's first token (echo): nothing before it to score it by
      logprob.push_back(nullptr);
      top.push_back(nullptr);
      continue;
    }
    logprob.push_back(logprob_json(t.logprob));
    ojson alternatives = ojson::object();
    for (const ops::TokenLogprob& a : t.top) {
      // The name as a client reads it (bytes that are not UTF-8 written as U+FFFD), so that two
      // ids of one name are one key: the likelier's.
      const std::string key = json::parse(dump_json(token_text(a.id))).get<std::string>();
      if (!alternatives.contains(key)) alternatives[key] = logprob_json(a.logprob);
    }
    top.push_back(alternatives);
  }
  ojson r;
  r["tokens"] = text;
  r["token_logprobs"] = logprob;
  r["top_logprobs"] = top;
  r["text_offset"] = offset;
  return r;
}

std::string ResponseBuilder::stream_start() {
  if (kind_ != ApiKind::kChat) return {};
  ojson c = head(id_, "chat.completion.chunk", created_, model_);
  ojson choice;
  choice["index"] = index_;
  choice["delta"] = {{"role", "assistant"}, {"content", ""}};
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = nullptr;
  c["choices"] = ojson::array({choice});
  if (include_usage_) c["usage"] = nullptr;
  return sse_ordered(c);
}

std::string ResponseBuilder::stream_event(const engine::TokenEvent& event) {
  if (done_) return {};
  const Delta d = apply(event);
  if (!error_.empty()) {
    return "data: " + error_body(error_status_, error_) + "\n\n" + (in_set_ ? "" : "data: [DONE]\n\n");
  }
  const bool chat = kind_ == ApiKind::kChat;
  ojson c = head(id_, chat ? "chat.completion.chunk" : "text_completion", created_, model_);
  ojson choice;
  choice["index"] = index_;
  if (chat) {
    ojson delta = ojson::object();
    if (!d.text.empty() || !d.last) delta["content"] = d.text;
    choice["delta"] = delta;
  } else {
    choice["text"] = d.text;
  }
  choice["logprobs"] = logprobs_json(d.logprobs);
  choice["finish_reason"] = d.last ? ojson(finish_reason_) : ojson(nullptr);
  if (return_token_ids_) choice["token_ids"] = d.ids;
  c["choices"] = ojson::array({choice});
  if (include_usage_) c["usage"] = nullptr;
  std::string out = sse_ordered(c);
  if (d.last && !in_set_) {
    if (include_usage_) {
      ojson u = head(id_, chat ? "chat.completion.chunk" : "text_completion", created_, model_);
      u["choices"] = ojson::array();
      u["usage"] = usage_json(prompt_tokens(), completion_tokens_);
      out += sse_ordered(u);
    }
    out += "data: [DONE]\n\n";
  }
  return out;
}

std::string ResponseBuilder::stream_abort(const std::string& message) {
  if (done_) return {};
  done_ = true;
  error_ = message;
  error_status_ = 503;
  return "data: " + error_body(error_status_, error_) + "\n\n" + "data: [DONE]\n\n";
}

void ResponseBuilder::add_event(const engine::TokenEvent& event) {
  if (done_) return;
  Delta d = apply(event);
  text_ += d.text;
  output_ids_.insert(output_ids_.end(), d.ids.begin(), d.ids.end());
  output_logprobs_.insert(output_logprobs_.end(), d.logprobs.begin(), d.logprobs.end());
}

int ResponseBuilder::final_status() const {
  if (!error_.empty()) return error_status_;
  return done_ ? 200 : 500;
}

std::string ResponseBuilder::error_json() const {
  if (!error_.empty()) return error_body(error_status_, error_);
  return error_body(500, "the request ended without a result");
}

nlohmann::ordered_json ResponseBuilder::choice_json() const {
  const bool chat = kind_ == ApiKind::kChat;
  ojson choice;
  choice["index"] = index_;
  if (chat) {
    ojson message;
    message["role"] = "assistant";
    message["content"] = text_;
    choice["message"] = message;
  } else {
    choice["text"] = text_;
  }
  choice["logprobs"] = logprobs_json(output_logprobs_);
  choice["finish_reason"] = finish_reason_;
  if (return_token_ids_) {
    choice["token_ids"] = output_ids_;
    if (!chat) choice["prompt_token_ids"] = prompt_;
  }
  return choice;
}

std::string ResponseBuilder::final_body() const {
  if (!error_.empty() || !done_) return error_json();
  const bool chat = kind_ == ApiKind::kChat;
  ojson r = head(id_, chat ? "chat.completion" : "text_completion", created_, model_);
  r["choices"] = ojson::array({choice_json()});
  if (return_token_ids_ && chat) r["prompt_token_ids"] = prompt_;
  r["usage"] = usage_json(prompt_tokens(), completion_tokens_);
  return dump_ordered(r);
}

// --- ResponseSet ---

ResponseSet::ResponseSet(const ApiRequest& request, const ModelInfo& model, std::string id, int64_t created)
    : kind_(request.kind),
      id_(std::move(id)),
      model_(model.name),
      created_(created),
      include_usage_(request.stream && request.include_usage),
      return_token_ids_(request.return_token_ids),
      n_(request.n),
      requests_(choice_requests(request)) {
  for (const ApiRequest& r : requests_) builders_.push_back(std::make_unique<ResponseBuilder>(r, model, id_, created));
}

int32_t ResponseSet::prompt_tokens() const {
  int32_t total = 0;  // each prompt once, however many choices it has (OpenAI's count)
  for (size_t i = 0; i < builders_.size(); i += size_t(n_)) total += builders_[i]->prompt_tokens();
  return total;
}

int32_t ResponseSet::completion_tokens() const {
  int32_t total = 0;
  for (const auto& b : builders_) total += b->completion_tokens();
  return total;
}

bool ResponseSet::done() const {
  bool all = true;
  for (const auto& b : builders_) {
    if (b->failed()) return true;
    all = all && b->done();
  }
  return all;
}

bool ResponseSet::needs_cancel(size_t choice) const {
  const ResponseBuilder& b = *builders_[choice];
  if (b.needs_cancel()) return true;
  if (b.done()) return false;
  for (const auto& other : builders_)
    if (other->failed()) return true;
  return false;
}

std::string ResponseSet::stream_start() {
  std::string out;
  for (const auto& b : builders_) out += b->stream_start();
  return out;
}

std::string ResponseSet::stream_end() {
  ended_ = true;
  std::string out;
  if (include_usage_) {
    ojson u = head(id_, kind_ == ApiKind::kChat ? "chat.completion.chunk" : "text_completion", created_, model_);
    u["choices"] = ojson::array();
    u["usage"] = usage_json(prompt_tokens(), completion_tokens());
    out += sse_ordered(u);
  }
  return out + "data: [DONE]\n\n";
}

std::string ResponseSet::stream_event(size_t choice, const engine::TokenEvent& event) {
  if (ended_) return {};
  std::string out = builders_[choice]->stream_event(event);
  if (builders_[choice]->failed()) {  // its error event ends the stream
    ended_ = true;
    return out + "data: [DONE]\n\n";
  }
  if (done()) out += stream_end();
  return out;
}

std::string ResponseSet::stream_abort(const std::string& message) {
  if (ended_) return {};
  ended_ = true;
  for (auto& b : builders_) b->stream_abort(message);
  return "data: " + error_body(503, message) + "\n\n" + "data: [DONE]\n\n";
}

void ResponseSet::add_event(size_t choice, const engine::TokenEvent& event) { builders_[choice]->add_event(event); }

int ResponseSet::final_status() const {
  for (const auto& b : builders_)
    if (b->failed()) return b->final_status();
  return done() ? 200 : 500;
}

std::string ResponseSet::final_body() const {
  for (const auto& b : builders_)
    if (b->failed()) return b->error_json();
  for (const auto& b : builders_)
    if (!b->done()) return b->error_json();
  const bool chat = kind_ == ApiKind::kChat;
  ojson r = head(id_, chat ? "chat.completion" : "text_completion", created_, model_);
  ojson choices = ojson::array();
  for (const auto& b : builders_) choices.push_back(b->choice_json());
  r["choices"] = choices;
  if (return_token_ids_ && chat) r["prompt_token_ids"] = requests_[0].params.prompt;
  r["usage"] = usage_json(prompt_tokens(), completion_tokens());
  return dump_ordered(r);
}

std::string models_body(const ModelInfo& model, int64_t created) {
  ojson m;
  m["id"] = model.name;
  m["object"] = "model";
  m["created"] = created;
  m["owned_by"] = "dsv4";
  m["root"] = model.name;
  m["parent"] = nullptr;
  m["max_model_len"] = model.max_model_len;
  ojson list;
  list["object"] = "list";
  list["data"] = ojson::array({m});
  return dump_ordered(list);
}

}  // namespace dsv4::serve
