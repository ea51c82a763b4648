// The OpenAI-compatible server: request validation (every bad field named),
// response formats, and end to end on `tiny` (synthetic weights, CPU backend)
// over real HTTP on an ephemeral port: hundreds of concurrent streams, client
// disconnects cancelling their requests, /metrics, graceful shutdown.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <latch>
#include <mutex>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "engine/model_runner.h"
#include "engine/serving_engine.h"
#include "model/weights.h"
#include "serve/chat_template.h"
#include "serve/http_server.h"
#include "serve/metrics.h"
#include "serve/openai_api.h"
#include "test_util.h"

namespace dsv4::serve {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr int64_t kVocab = 129280;  // tiny uses the real vocabulary
constexpr int32_t kMaxModelLen = 1024;
constexpr int32_t kPages = 256;

std::string tokenizer_dir() {
  const char* v = std::getenv("DSV4_TOKENIZER_DIR");
  return v && *v ? v : DSV4_TOKENIZER_DIR_DEFAULT;
}

std::shared_ptr<const Tokenizer> shared_tokenizer() {
  static const std::shared_ptr<const Tokenizer> tokenizer = []() -> std::shared_ptr<const Tokenizer> {
    const auto path = std::filesystem::path(tokenizer_dir()) / "tokenizer.json";
    if (!std::filesystem::exists(path)) return nullptr;
    return std::make_shared<const Tokenizer>(Tokenizer::load(path.string()));
  }();
  return tokenizer;
}

#define REQUIRE_TOKENIZER()                                                                                 \
  if (!shared_tokenizer())                                                                                  \
  GTEST_SKIP() << "no tokenizer.json in " << tokenizer_dir()                                                \
               << ": run scripts/fetch_tokenizer.sh (or set DSV4_TOKENIZER_DIR to the directory it prints)"

ModelInfo model_info(const Tokenizer* tokenizer = nullptr) {
  ModelInfo m;
  m.name = "tiny";
  m.max_model_len = kMaxModelLen;
  m.vocab_size = kVocab;
  m.eos_token_id = 1;
  m.tokenizer = tokenizer;
  return m;
}

std::vector<int32_t> random_prompt(int n, uint64_t salt) {
  std::mt19937_64 g(testing::test_seed() * 1000003 + salt);
  std::vector<int32_t> ids;
  for (int i = 0; i < n; ++i) ids.push_back(int32_t(1000 + g() % 99000));
  return ids;
}

// --- request validation ---

struct BadCase {
  bool chat;
  const char* body;
  int status;
  const char* param;    // "" for none
  const char* message;  // substring of the error message
};

ApiError parse_error(bool chat, const std::string& body, const ModelInfo& model) {
  try {
    const json j = parse_json_body(body);
    if (chat)
      parse_chat_request(j, model);
    else
      parse_completion_request(j, model);
  } catch (const ApiError& e) {
    return e;
  }
  ADD_FAILURE() << "accepted: " << body;
  return ApiError(0, "");
}

TEST(OpenAiApi, EveryBadFieldIsNamedWithWhatIsExpected) {
  const BadCase cases[] = {
      {false, R"({"prompt": [1, 2], "temperature": "hot"})", 400, "temperature",
       R"(temperature must be a number in [0, 2], got "hot")"},
      {false, R"({"prompt": [1, 2], "temperature": 2.5})", 400, "temperature",
       "temperature must be a number in [0, 2], got 2.5"},
      {false, R"({"prompt": [1, 2], "top_p": 0})", 400, "top_p", "top_p must be a number in (0, 1], got 0"},
      {false, R"({"prompt": [1, 2], "top_p": 1.5})", 400, "top_p", "top_p must be a number in (0, 1], got 1.5"},
      {false, R"({"prompt": [1, 2], "top_k": -2})", 400, "top_k", "top_k must be an integer >= -1"},
      {false, R"({"prompt": [1, 2], "top_k": 1.5})", 400, "top_k", "got 1.5"},
      {false, R"({"prompt": [1, 2], "min_p": 1.5})", 400, "min_p", "min_p must be a number in [0, 1], got 1.5"},
      {false, R"({"prompt": [1, 2], "min_p": -0.1})", 400, "min_p", "min_p must be a number in [0, 1], got -0.1"},
      {false, R"({"prompt": [1, 2], "min_tokens": -1})", 400, "min_tokens", "min_tokens must be an integer >= 0, got -1"},
      {false, R"({"prompt": [1, 2], "min_tokens": 20})", 400, "min_tokens",
       "min_tokens (20) must not exceed max_tokens (16, its default here)"},
      {false, R"({"prompt": [1, 2], "max_tokens": 3, "min_tokens": 4})", 400, "min_tokens",
       "min_tokens (4) must not exceed max_tokens (3)"},
      {false, R"({"prompt": [1, 2], "max_tokens": 0})", 400, "max_tokens", "max_tokens must be an integer >= 1, got 0"},
      {false, R"({"prompt": [1, 2], "max_tokens": "5"})", 400, "max_tokens", R"(max_tokens must be an integer >= 1, got "5")"},
      {false, R"({"prompt": [1, 2], "seed": "x"})", 400, "seed", R"(seed must be an integer, got "x")"},
      {false, R"({"prompt": [1, 2], "stop": 5})", 400, "stop", "stop must be a string or an array of strings, got 5"},
      {false, R"({"prompt": [1, 2], "stop": ["a", ""]})", 400, "stop[1]", R"(stop[1] must be a non-empty string, got "")"},
      {false, R"({"prompt": [1, 2], "stream": "yes"})", 400, "stream", R"(stream must be true or false, got "yes")"},
      {false, R"({"prompt": [1, 2], "stream_options": {"include_usage": true}})", 400, "stream_options",
       "stream_options is only allowed with \"stream\": true"},
      {false, R"({"prompt": [1, 2], "stream": true, "stream_options": 3})", 400, "stream_options",
       "stream_options must be an object"},
      {false, R"({"prompt": [1, 2], "stream": true, "stream_options": {"include_usage": 1}})", 400,
       "stream_options.include_usage", "stream_options.include_usage must be true or false, got 1"},
      {false, R"({"prompt": [1, 2], "ignore_eos": 1})", 400, "ignore_eos", "ignore_eos must be true or false, got 1"},
      {false, R"({"prompt": [1, 2], "n": 0})", 400, "n", "n must be an integer in [1, 64], got 0"},
      {false, R"({"prompt": [1, 2], "n": 65})", 400, "n", "n must be an integer in [1, 64], got 65"},
      {false, R"({"prompt": [1, 2], "best_of": 3})", 400, "best_of", "best_of (3) other than n (1) is not supported"},
      {false, R"({"prompt": [1, 2], "n": 2, "best_of": 3})", 400, "best_of", "best_of (3) other than n (2)"},
      {false, R"({"prompt": [[1], [2]], "n": 40})", 400, "prompt",
       "2 prompts x n 40 = 80 choices; this server answers at most 64 in one request"},
      {false, R"({"prompt": [[1, 2], []]})", 400, "prompt[1]",
       "prompt[1] must be a non-empty string or array of token ids"},
      {false, R"({"prompt": [[1], 5]})", 400, "prompt[1]", "prompt[1] must be a string or an array of token ids"},
      {false, R"({"prompt": [[1, 2], [1, 129280]]})", 400, "prompt[1][1]",
       "prompt[1][1] must be a token id in [0, 129280), got 129280"},
      {false, R"({"prompt": [[1, 2], [3]], "max_tokens": 1023})", 400, "max_tokens",
       "(2 in the prompt[0], 1023 in the completion)"},
      {false, R"({"prompt": [1, -5]})", 400, "prompt[1]", "prompt[1] must be a token id in [0, 129280), got -5"},
      {false, R"({"prompt": [1, 129280]})", 400, "prompt[1]", "prompt[1] must be a token id in [0, 129280), got 129280"},
      {false, R"({"prompt": [1, "a"]})", 400, "prompt[1]", R"(got "a")"},
      {false, R"({"prompt": 5})", 400, "prompt",
       "prompt must be a string, an array of token ids, or a batch of them (an array of strings or of arrays), got 5"},
      {false, R"({"max_tokens": 5})", 400, "prompt", "prompt is required"},
      {false, R"({"prompt": []})", 400, "prompt", "prompt must be a non-empty string or array of token ids"},
      {false, R"({"prompt": ["a", "b"]})", 400, "prompt", "prompt is text, but this server runs without a tokenizer"},
      {false, R"({"prompt": "hello"})", 400, "prompt", "this server runs without a tokenizer"},
      {false, R"({"prompt": [1, 2], "model": 7})", 400, "model", "model must be a string"},
      {false, R"({"prompt": [1, 2], "model": "gpt-4"})", 404, "model", "The model `gpt-4` does not exist"},
      {false, R"({"prompt": [1, 2], "stop_token_ids": [1, "x"]})", 400, "stop_token_ids[1]",
       "stop_token_ids[1] must be a token id in [0, 129280)"},
      {false, R"({"prompt": [1, 2], "presence_penalty": 2.5})", 400, "presence_penalty",
       "presence_penalty must be a number in [-2, 2], got 2.5"},
      {false, R"({"prompt": [1, 2], "frequency_penalty": "x"})", 400, "frequency_penalty",
       R"(frequency_penalty must be a number in [-2, 2], got "x")"},
      {false, R"({"prompt": [1, 2], "repetition_penalty": 0})", 400, "repetition_penalty",
       "repetition_penalty must be a number in (0, 2], got 0"},
      {false, R"({"prompt": [1, 2], "logit_bias": [5]})", 400, "logit_bias",
       "logit_bias must be an object mapping token ids to biases in [-100, 100]"},
      {false, R"({"prompt": [1, 2], "logit_bias": {"x7": 1}})", 400, "logit_bias",
       R"(logit_bias: the key "x7" is not a token id in [0, 129280))"},
      {false, R"({"prompt": [1, 2], "logit_bias": {"129280": 1}})", 400, "logit_bias",
       R"(logit_bias: the key "129280" is not a token id)"},
      {false, R"({"prompt": [1, 2], "logit_bias": {"7": 101}})", 400, R"(logit_bias["7"])",
       R"(logit_bias["7"] must be a number in [-100, 100], got 101)"},
      {false, R"({"prompt": [1, 2], "logit_bias": {"7": 1, "07": 2}})", 400, "logit_bias",
       "logit_bias names token 7 twice"},
      {false, R"({"prompt": [1, 2], "logprobs": 21})", 400, "logprobs", "logprobs must be an integer in [0, 20]"},
      {false, R"({"prompt": [1, 2], "logprobs": true})", 400, "logprobs", "logprobs must be an integer in [0, 20]"},
      {false, R"({"prompt": [1, 2], "top_logprobs": 2})", 400, "top_logprobs",
       R"(top_logprobs is a chat completions field; /v1/completions takes "logprobs": N)"},
      {false, R"({"prompt": [1, 2], "echo": "yes"})", 400, "echo", R"(echo must be true or false, got "yes")"},
      {false, R"({"prompt": [1, 2], "echo": true, "max_tokens": -1})", 400, "max_tokens",
       "max_tokens must be an integer >= 0 (0 with echo: the prompt alone), got -1"},
      {true, R"({"messages": [{"role": "user", "content": "a"}], "echo": true})", 400, "echo",
       "echo is a /v1/completions field"},
      {false, R"({"prompt": [1, 2], "max_tokens": 1023})", 400, "max_tokens",
       "maximum context length is 1024 tokens. However, you requested 1025 tokens (2 in the prompt, 1023 in the "
       "completion)"},
      {true, R"({"messages": []})", 400, "messages", "messages must be a non-empty array"},
      {true, R"({"model": "tiny"})", 400, "messages", "messages is required"},
      {true, R"({"messages": "hi"})", 400, "messages", R"(messages must be a non-empty array of {"role", "content"} objects, got "hi")"},
      {true, R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "robot", "content": "c"}]})",
       400, "messages[2].role", R"(messages[2].role must be one of system, user, assistant, got "robot")"},
      {true, R"({"messages": [{"content": "a"}]})", 400, "messages[0].role", "messages[0].role is required"},
      {true, R"({"messages": [{"role": "user"}]})", 400, "messages[0].content", "messages[0].content is required"},
      {true, R"({"messages": [{"role": "user", "content": 5}]})", 400, "messages[0].content",
       "messages[0].content must be a string or an array of text parts, got 5"},
      {true, R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", 400,
       "messages[0].content[0].type", R"(messages[0].content[0].type must be "text" (this server takes text only), got "image_url")"},
      {true, R"({"messages": ["hi"]})", 400, "messages[0]", R"(messages[0] must be an object)"},
      {true, R"({"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 0})", 400,
       "max_completion_tokens", "max_completion_tokens must be an integer >= 1, got 0"},
      {true, R"({"messages": [{"role": "user", "content": "a"}], "max_tokens": -1})", 400, "max_tokens",
       "max_tokens must be an integer >= 1, got -1"},
      {true, R"({"messages": [{"role": "user", "content": "a"}], "temperature": "hot"})", 400, "temperature",
       R"(temperature must be a number in [0, 2], got "hot")"},
      {true, R"({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]})", 400, "tools",
       "tools (function calling) are not supported"},
      {true, R"({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 3})", 400, "top_logprobs",
       R"(top_logprobs (3) needs "logprobs": true)"},
      {true, R"({"messages": [{"role": "user", "content": "a"}], "logprobs": true, "top_logprobs": 21})", 400,
       "top_logprobs", "top_logprobs must be an integer in [0, 20], got 21"},
      {true, R"({"messages": [{"role": "user", "content": "a"}], "logprobs": 2})", 400, "logprobs",
       "logprobs must be true or false, got 2"},
      {true, R"({"messages": [{"role": "user", "content": "a"}]})", 400, "messages", "chat completions need a tokenizer"},
      {true, R"({"messages": [{"role": "user", "content": "a"}], "model": "other"})", 404, "model",
       "The model `other` does not exist; this server serves `tiny`"},
  };
  const ModelInfo model = model_info();
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.body);
    const ApiError e = parse_error(c.chat, c.body, model);
    EXPECT_EQ(e.status(), c.status);
    EXPECT_EQ(e.param(), c.param);
    EXPECT_NE(std::string(e.what()).find(c.message), std::string::npos) << "message: " << e.what();
    const json body = json::parse(e.body());
    EXPECT_EQ(body["error"]["message"], e.what());
    EXPECT_EQ(body["error"]["type"], "invalid_request_error");
    if (c.status == 404) {
      EXPECT_EQ(body["error"]["code"], "model_not_found");
    }
  }
}

TEST(OpenAiApi, MalformedBodiesAreRefusedWithTheReason) {
  for (const auto& [body, needle] : std::vector<std::pair<std::string, std::string>>{
           {"", "the request body is empty"},
           {"{bad", "the request body is not valid JSON: parse error at line 1, column 2"},
           {"[1, 2]", "the request body must be a JSON object, got [1,2]"},
           {"\"text\"", "the request body must be a JSON object"}}) {
    try {
      parse_json_body(body);
      ADD_FAILURE() << "accepted " << body;
    } catch (const ApiError& e) {
      EXPECT_EQ(e.status(), 400);
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  }
}

TEST(OpenAiApi, CompletionFieldsMapOntoTheEngineRequest) {
  const ModelInfo model = model_info();
  ApiRequest r = parse_completion_request(json::parse(R"({"model": "tiny", "prompt": [5, 6, 7]})"), model);
  EXPECT_EQ(r.params.prompt, (std::vector<int32_t>{5, 6, 7}));
  EXPECT_EQ(r.params.max_tokens, 16);  // OpenAI's default for completions
  EXPECT_FLOAT_EQ(r.params.sampling.temperature, 1.0f);
  EXPECT_FALSE(r.stream);
  EXPECT_TRUE(r.skip_special_tokens);

  r = parse_completion_request(
      json::parse(R"({"prompt": [[9, 8]], "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": -1,
                      "seed": 42, "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true,
                      "stop_token_ids": [3], "n": 1, "presence_penalty": 0, "logprobs": null, "user": "x"})"),
      model);
  EXPECT_EQ(r.params.prompt, (std::vector<int32_t>{9, 8}));
  EXPECT_EQ(r.params.max_tokens, 7);
  EXPECT_EQ(r.params.sampling.temperature, 0.0f);
  EXPECT_FLOAT_EQ(r.params.sampling.top_p, 0.5f);
  EXPECT_EQ(r.params.sampling.top_k, 0);
  EXPECT_EQ(r.params.sampling.min_p, 0.0f);  // (not sent: no limit)
  EXPECT_EQ(r.params.min_tokens, 0);
  EXPECT_EQ(parse_completion_request(json::parse(R"({"prompt": [1], "min_tokens": 5})"), model).params.min_tokens, 5);
  EXPECT_EQ(parse_completion_request(json::parse(R"({"prompt": [1], "min_p": 0.05})"), model).params.sampling.min_p,
            0.05f);
  EXPECT_EQ(r.params.sampling.seed, 42u);
  EXPECT_TRUE(r.stream && r.include_usage && r.params.ignore_eos);
  EXPECT_EQ(r.params.stop_token_ids, (std::vector<int32_t>{3}));
  EXPECT_EQ(r.params.logprobs, -1);  // "logprobs": null
  EXPECT_EQ(parse_completion_request(json::parse(R"({"prompt": [1], "logprobs": 3})"), model).params.logprobs, 3);
  EXPECT_EQ(parse_completion_request(json::parse(R"({"prompt": [1], "logprobs": 0})"), model).params.logprobs, 0);
  EXPECT_EQ(parse_completion_request(json::parse(R"({"prompt": [1], "logprobs": false})"), model).params.logprobs, -1);
  EXPECT_FALSE(r.params.sampling.penalized());
  const engine::SamplingParams pen =
      parse_completion_request(json::parse(R"({"prompt": [1], "presence_penalty": 0.5, "frequency_penalty": -1,
                                              "repetition_penalty": 1.25})"),
                               model)
          .params.sampling;
  EXPECT_TRUE(pen.penalized());
  EXPECT_EQ(pen.presence_penalty, 0.5f);
  EXPECT_EQ(pen.frequency_penalty, -1.0f);
  EXPECT_EQ(pen.repetition_penalty, 1.25f);
  const engine::SamplingParams biased =
      parse_completion_request(json::parse(R"({"prompt": [1], "logit_bias": {"90": -100, "5": 2.5, "6": 0}})"), model)
          .params.sampling;
  EXPECT_TRUE(biased.penalized());
  EXPECT_EQ(biased.logit_bias, (std::vector<std::pair<int32_t, float>>{{5, 2.5f}, {90, -100.0f}}));  // (0: none)

  // The default max_tokens shrinks to what the context leaves; an explicit one must fit.
  std::vector<int32_t> long_prompt(1020, 7);
  r = parse_completion_request(json{{"prompt", long_prompt}}, model);
  EXPECT_EQ(r.params.max_tokens, 4);
  long_prompt.resize(1024);
  try {
    parse_completion_request(json{{"prompt", long_prompt}}, model);
    ADD_FAILURE() << "a prompt of max_model_len tokens was accepted";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), 400);
    EXPECT_NE(std::string(e.what()).find("maximum context length is 1024 tokens, but the prompt has 1024 tokens"),
              std::string::npos)
        << e.what();
  }
}

TEST(OpenAiApi, ChatUsesTheDeepSeekTemplate) {
  REQUIRE_TOKENIZER();
  const auto tokenizer = shared_tokenizer();
  const ModelInfo model = model_info(tokenizer.get());
  const ApiRequest r = parse_chat_request(json::parse(R"({"messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Hello"}]}], "max_tokens": 5})"),
                                          model);
  const std::string text =
      apply_chat_template({{"system", "Be brief."}, {"user", "Hello"}}, /*add_generation_prompt=*/true);
  EXPECT_EQ(r.params.prompt, tokenizer->encode(text, true));
  EXPECT_EQ(r.params.prompt.front(), tokenizer->bos_id());
  EXPECT_EQ(r.params.max_tokens, 5);
  // A text completion prompt gets the BOS, as the HF tokenizer adds it.
  const ApiRequest c = parse_completion_request(json{{"prompt", "Hello world"}}, model);
  std::vector<int32_t> expected = tokenizer->encode("Hello world", true);
  expected.insert(expected.begin(), tokenizer->bos_id());
  EXPECT_EQ(c.params.prompt, expected);
}

// --- output text and response formats ---

TEST(TextOutput, StopStringsEndTheTextEvenAcrossTokens) {
  REQUIRE_TOKENIZER();
  const auto tokenizer = shared_tokenizer();
  const std::string text = "Hello world, this is the end. More text follows here.";
  const std::vector<int32_t> ids = tokenizer->encode(text, false);
  auto run = [&](std::vector<std::string> stop, bool include) {
    TextOutput out(tokenizer.get(), std::move(stop), include, true);
    std::string got;
    size_t used = 0;
    for (int32_t id : ids) {
      ++used;
      got += out.push(id);
      if (out.stopped()) break;
    }
    if (!out.stopped()) got += out.finish();
    return std::make_tuple(got, out.stopped(), used);
  };
  {
    auto [got, stopped, used] = run({}, false);
    EXPECT_EQ(got, text);
    EXPECT_FALSE(stopped);
  }
  {
    auto [got, stopped, used] = run({"the end"}, false);
    EXPECT_EQ(got, "Hello world, this is ");
    EXPECT_TRUE(stopped);
    EXPECT_LT(used, ids.size());
  }
  {
    auto [got, stopped, used] = run({"the end", "world"}, true);  // the earliest match wins
    EXPECT_EQ(got, "Hello world");
    EXPECT_TRUE(stopped);
  }
  {
    auto [got, stopped, used] = run({"lo wo"}, false);  // straddles "Hello" and " world"
    EXPECT_EQ(got, "Hel");
    EXPECT_TRUE(stopped);
  }
  {
    auto [got, stopped, used] = run({"here.!"}, false);  // a prefix held back to the end is released
    EXPECT_EQ(got, text);
    EXPECT_FALSE(stopped);
  }
  {
    // min_tokens 3: "Hello" (the first token) is not matched; "the end", later, is.
    TextOutput out(tokenizer.get(), {"Hello", "the end"}, false, true, 3);
    std::string got;
    for (int32_t id : ids) {
      got += out.push(id);
      if (out.stopped()) break;
    }
    EXPECT_TRUE(out.stopped());
    EXPECT_EQ(got, "Hello world, this is ");
  }
}

std::vector<std::string> sse_payloads(const std::string& body, std::string* problem) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < body.size()) {
    const size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) {
      *problem = "unterminated event: " + body.substr(pos, 200);
      return out;
    }
    const std::string event = body.substr(pos, end - pos);
    if (event.rfind("data: ", 0) != 0 || event.find('\n') != std::string::npos) {
      *problem = "not a single data line: " + event.substr(0, 200);
      return out;
    }
    out.push_back(event.substr(6));
    pos = end + 2;
  }
  return out;
}

engine::TokenEvent token_event(int32_t token, int32_t n, engine::FinishReason reason = engine::FinishReason::kNone) {
  engine::TokenEvent e;
  e.token = token;
  e.completion_tokens = n;
  e.finished = reason != engine::FinishReason::kNone;
  e.reason = reason;
  return e;
}

TEST(ResponseBuilder, StreamsOpenAiChunksThenUsageThenDone) {
  const ModelInfo model = model_info();
  ApiRequest r = parse_completion_request(
      json::parse(R"({"prompt": [1, 2, 3], "max_tokens": 2, "stream": true,
                      "stream_options": {"include_usage": true}, "return_token_ids": true})"),
      model);
  ResponseBuilder b(r, model, make_response_id(ApiKind::kCompletion), 1700000000);
  EXPECT_EQ(b.id().rfind("cmpl-", 0), 0u);
  std::string body = b.stream_start();
  body += b.stream_event(token_event(10, 1));
  body += b.stream_event(token_event(11, 2, engine::FinishReason::kLength));
  EXPECT_TRUE(b.done());
  std::string problem;
  const auto events = sse_payloads(body, &problem);
  ASSERT_TRUE(problem.empty()) << problem;
  ASSERT_EQ(events.size(), 4u);
  EXPECT_EQ(events.back(), "[DONE]");
  const json c0 = json::parse(events[0]), c1 = json::parse(events[1]), u = json::parse(events[2]);
  EXPECT_EQ(c0["object"], "text_completion");
  EXPECT_EQ(c0["id"], b.id());
  EXPECT_EQ(c0["model"], "tiny");
  EXPECT_EQ(c0["created"], 1700000000);
  EXPECT_EQ(c0["choices"][0]["index"], 0);
  EXPECT_EQ(c0["choices"][0]["text"], "");  // no tokenizer: no text
  EXPECT_TRUE(c0["choices"][0]["finish_reason"].is_null());
  EXPECT_EQ(c0["choices"][0]["token_ids"], json::array({10}));
  EXPECT_TRUE(c0["usage"].is_null());
  EXPECT_EQ(c1["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(c1["choices"][0]["token_ids"], json::array({11}));
  EXPECT_TRUE(u["choices"].empty());
  EXPECT_EQ(u["usage"], json::parse(R"({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})"));
  EXPECT_EQ(b.stream_event(token_event(12, 3)), "");  // nothing after the end
}

TEST(ResponseBuilder, ChatStartsWithTheAssistantRoleAndEndsWithAnEmptyDelta) {
  REQUIRE_TOKENIZER();
  const auto tokenizer = shared_tokenizer();
  const ModelInfo model = model_info(tokenizer.get());
  ApiRequest r = parse_chat_request(
      json::parse(R"({"messages": [{"role": "user", "content": "Hi"}], "stream": true})"), model);
  ResponseBuilder b(r, model, make_response_id(ApiKind::kChat), 1);
  EXPECT_EQ(b.id().rfind("chatcmpl-", 0), 0u);
  const int32_t hello = tokenizer->encode("Hello", false).at(0);
  std::string body = b.stream_start();
  body += b.stream_event(token_event(hello, 1));
  body += b.stream_event(token_event(model.eos_token_id, 2, engine::FinishReason::kStop));
  std::string problem;
  const auto events = sse_payloads(body, &problem);
  ASSERT_TRUE(problem.empty()) << problem;
  ASSERT_EQ(events.size(), 4u) << body;  // no usage chunk without include_usage
  EXPECT_EQ(json::parse(events[0])["choices"][0]["delta"], json::parse(R"({"role": "assistant", "content": ""})"));
  EXPECT_EQ(json::parse(events[1])["object"], "chat.completion.chunk");
  EXPECT_EQ(json::parse(events[1])["choices"][0]["delta"]["content"], "Hello");
  const json last = json::parse(events[2]);
  EXPECT_EQ(last["choices"][0]["delta"], json::object());  // the EOS token shows no text
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  EXPECT_FALSE(last.contains("usage"));
  EXPECT_EQ(events[3], "[DONE]");
}

// Several choices: prompt i's n choices at i * n + j, the j-th drawn with seed + j; every
// choice's prompt and max_tokens its own prompt's.
TEST(ResponseSet, ChoicesArePromptMajorWithSeedsApart) {
  const ModelInfo model = model_info();
  const ApiRequest r = parse_completion_request(
      json::parse(R"({"prompt": [[1, 2, 3], [4]], "n": 3, "seed": 10, "temperature": 0.7})"), model);
  EXPECT_EQ(r.n, 3);
  ASSERT_EQ(r.more_prompts.size(), 1u);
  const std::vector<ApiRequest> choices = choice_requests(r);
  ASSERT_EQ(choices.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(choices[i].index, int32_t(i));
    EXPECT_EQ(choices[i].params.prompt, i < 3 ? std::vector<int32_t>({1, 2, 3}) : std::vector<int32_t>({4}));
    EXPECT_EQ(choices[i].params.sampling.seed, 10 + i % 3);
    EXPECT_EQ(choices[i].params.max_tokens, 16);
    EXPECT_FLOAT_EQ(choices[i].params.sampling.temperature, 0.7f);
  }
}

// The set's non-streamed body: every choice at its index, usage counting each prompt once; a
// set of one streams exactly what one builder does; streamed choices carry their index and one
// usage chunk and one [DONE] follow the last choice's end; a choice that fails ends the response
// with its error and asks for the others to be cancelled.
TEST(ResponseSet, MergesChoicesIntoOneResponse) {
  const ModelInfo model = model_info();
  const ApiRequest r = parse_completion_request(
      json::parse(R"({"prompt": [1, 2, 3], "n": 2, "max_tokens": 2, "return_token_ids": true})"), model);
  ResponseSet whole(r, model, "cmpl-x", 5);
  ASSERT_EQ(whole.size(), 2u);
  whole.add_event(1, token_event(20, 1));
  whole.add_event(0, token_event(10, 1));
  whole.add_event(1, token_event(21, 2, engine::FinishReason::kLength));
  EXPECT_FALSE(whole.done());
  whole.add_event(0, token_event(11, 2, engine::FinishReason::kStop));
  ASSERT_TRUE(whole.done());
  ASSERT_EQ(whole.final_status(), 200);
  const json body = json::parse(whole.final_body());
  ASSERT_EQ(body["choices"].size(), 2u);
  EXPECT_EQ(body["choices"][0]["index"], 0);
  EXPECT_EQ(body["choices"][0]["token_ids"], json::parse("[10, 11]"));
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(body["choices"][1]["index"], 1);
  EXPECT_EQ(body["choices"][1]["token_ids"], json::parse("[20, 21]"));
  EXPECT_EQ(body["usage"], json::parse(R"({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})"));

  // One choice: the same stream as a builder alone.
  const char* one = R"({"prompt": [1, 2, 3], "max_tokens": 2, "stream": true, "stream_options": {"include_usage": true}})";
  ApiRequest single = parse_completion_request(json::parse(one), model);
  ResponseBuilder alone(single, model, "cmpl-y", 5);
  ResponseSet set_of_one(single, model, "cmpl-y", 5);
  const auto events = {token_event(10, 1), token_event(11, 2, engine::FinishReason::kLength)};
  std::string a = alone.stream_start(), b = set_of_one.stream_start();
  for (const auto& e : events) a += alone.stream_event(e), b += set_of_one.stream_event(0, e);
  EXPECT_EQ(a, b);

  ApiRequest streamed = parse_completion_request(
      json::parse(R"({"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 1, "stream": true,
                      "stream_options": {"include_usage": true}})"),
      model);
  ResponseSet st(streamed, model, "cmpl-z", 5);
  std::string text = st.stream_start();
  text += st.stream_event(1, token_event(7, 1, engine::FinishReason::kLength));
  EXPECT_FALSE(st.done());
  text += st.stream_event(0, token_event(8, 1, engine::FinishReason::kLength));
  EXPECT_TRUE(st.done());
  EXPECT_EQ(st.stream_event(0, token_event(9, 2)), "");
  std::string problem;
  const auto chunks = sse_payloads(text, &problem);
  ASSERT_TRUE(problem.empty()) << problem;
  ASSERT_EQ(chunks.size(), 4u);
  EXPECT_EQ(json::parse(chunks[0])["choices"][0]["index"], 1);
  EXPECT_EQ(json::parse(chunks[1])["choices"][0]["index"], 0);
  EXPECT_EQ(json::parse(chunks[2])["usage"],
            json::parse(R"({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})"));
  EXPECT_EQ(chunks[3], "[DONE]");

  ResponseSet failing(streamed, model, "cmpl-w", 5);
  engine::TokenEvent error;
  error.finished = true;
  error.reason = engine::FinishReason::kError;
  error.error = "a step failed";
  const std::string ended = failing.stream_event(0, error);
  EXPECT_TRUE(failing.done());
  EXPECT_TRUE(failing.needs_cancel(1));
  EXPECT_NE(ended.find("a step failed"), std::string::npos);
  EXPECT_EQ(ended.substr(ended.size() - 14), "data: [DONE]\n\n");
  ResponseSet failing_whole(r, model, "cmpl-v", 5);
  failing_whole.add_event(1, error);
  EXPECT_TRUE(failing_whole.done());
  EXPECT_EQ(failing_whole.final_status(), 500);
  EXPECT_NE(failing_whole.final_body().find("a step failed"), std::string::npos);
}

engine::TokenEvent logprob_event(int32_t token, int32_t n, float logprob, std::vector<ops::TokenLogprob> top,
                                 engine::FinishReason reason = engine::FinishReason::kNone) {
  engine::TokenEvent e = token_event(token, n, reason);
  e.logprob = logprob;
  e.top_logprobs = std::move(top);
  return e;
}

// Completions' logprobs: tokens named by id without a tokenizer, the most likely as {name: logprob},
// -inf as -9999, each float at its shortest; the stream gives each chunk its tokens'.
TEST(ResponseBuilder, CompletionLogprobsInOpenAiForm) {
  const ModelInfo model = model_info();
  ApiRequest r = parse_completion_request(json::parse(R"({"prompt": [4, 5], "max_tokens": 2, "logprobs": 2})"), model);
  const auto events = std::vector<engine::TokenEvent>{
      logprob_event(7, 1, -0.1f, {{7, -0.1f}, {9, -2.5f}}),
      logprob_event(8, 2, -INFINITY, {{3, -0.03125f}, {4, -3.0f}}, engine::FinishReason::kLength)};
  ResponseBuilder whole(r, model, "cmpl-x", 5);
  for (const auto& e : events) whole.add_event(e);
  ASSERT_EQ(whole.final_status(), 200);
  const json want = json::parse(R"({"tokens": ["token_id:7", "token_id:8"], "token_logprobs": [-0.1, -9999.0],
      "top_logprobs": [{"token_id:7": -0.1, "token_id:9": -2.5}, {"token_id:3": -0.03125, "token_id:4": -3.0}],
      "text_offset": [0, 0]})");
  EXPECT_EQ(json::parse(whole.final_body())["choices"][0]["logprobs"], want);
  EXPECT_NE(whole.final_body().find("\"token_logprobs\":[-0.1,-9999.0]"), std::string::npos) << whole.final_body();

  r.stream = true;
  ResponseBuilder streamed(r, model, "cmpl-y", 5);
  std::string body = streamed.stream_start();
  for (const auto& e : events) body += streamed.stream_event(e);
  std::string problem;
  const auto chunks = sse_payloads(body, &problem);
  ASSERT_TRUE(problem.empty()) << problem;
  ASSERT_EQ(chunks.size(), 3u);
  for (size_t i = 0; i < 2; ++i) {
    const json lp = json::parse(chunks[i])["choices"][0]["logprobs"];
    EXPECT_EQ(lp["tokens"], json::array({want["tokens"][i]}));
    EXPECT_EQ(lp["token_logprobs"], json::array({want["token_logprobs"][i]}));
    EXPECT_EQ(lp["top_logprobs"], json::array({want["top_logprobs"][i]}));
  }
  // Without the field: null, as before.
  const ApiRequest plain = parse_completion_request(json::parse(R"({"prompt": [4, 5], "max_tokens": 1})"), model);
  ResponseBuilder none(plain, model, "cmpl-z", 5);
  none.add_event(logprob_event(7, 1, -0.1f, {}, engine::FinishReason::kLength));
  EXPECT_TRUE(json::parse(none.final_body())["choices"][0]["logprobs"].is_null());
}

// Completions' echo: the prompt's tokens ahead of the completion's in logprobs (the first with
// null log-probabilities: nothing before it scores it; the others the engine's prompt scores),
// in the first event's chunk when streamed; max_tokens 0 returns the prompt alone, with no
// completion token, as evaluation harnesses score a text.
TEST(ResponseBuilder, EchoPutsThePromptsLogprobsFirst) {
  const ModelInfo model = model_info();
  ApiRequest r = parse_completion_request(
      json::parse(R"({"prompt": [4, 5, 6], "max_tokens": 1, "logprobs": 1, "echo": true})"), model);
  EXPECT_TRUE(r.echo);
  EXPECT_FALSE(r.score_only);
  EXPECT_EQ(r.params.prompt_logprobs, 1);
  engine::TokenEvent e = logprob_event(7, 1, -0.5f, {{7, -0.5f}}, engine::FinishReason::kLength);
  e.prompt_logprobs = {{5, -1.25f, {{9, -0.75f}}}, {6, -INFINITY, {{5, -0.125f}}}};
  const json want = json::parse(R"({"tokens": ["token_id:4", "token_id:5", "token_id:6", "token_id:7"],
      "token_logprobs": [null, -1.25, -9999.0, -0.5],
      "top_logprobs": [null, {"token_id:9": -0.75}, {"token_id:5": -0.125}, {"token_id:7": -0.5}],
      "text_offset": [0, 0, 0, 0]})");
  ResponseBuilder whole(r, model, "cmpl-x", 5);
  whole.add_event(e);
  ASSERT_EQ(whole.final_status(), 200) << whole.final_body();
  const json body = json::parse(whole.final_body());
  EXPECT_EQ(body["choices"][0]["logprobs"], want);
  EXPECT_EQ(body["usage"]["completion_tokens"], 1);

  r.stream = true;
  ResponseBuilder streamed(r, model, "cmpl-y", 5);
  std::string text = streamed.stream_start() + streamed.stream_event(e);
  std::string problem;
  const auto chunks = sse_payloads(text, &problem);
  ASSERT_TRUE(problem.empty()) << problem;
  ASSERT_EQ(chunks.size(), 2u);
  EXPECT_EQ(json::parse(chunks[0])["choices"][0]["logprobs"], want);

  // max_tokens 0: the prompt scored, no completion token; the engine runs one, not returned.
  const ApiRequest score = parse_completion_request(
      json::parse(R"({"prompt": [4, 5, 6], "max_tokens": 0, "logprobs": 0, "echo": true})"), model);
  EXPECT_TRUE(score.score_only);
  EXPECT_EQ(score.params.max_tokens, 1);
  ResponseBuilder scored(score, model, "cmpl-z", 5);
  engine::TokenEvent eos = logprob_event(model.eos_token_id, 1, -0.5f, {}, engine::FinishReason::kStop);
  eos.prompt_logprobs = {{5, -1.25f, {}}, {6, -2.0f, {}}};
  scored.add_event(eos);
  const json only = json::parse(scored.final_body());
  EXPECT_EQ(only["choices"][0]["logprobs"]["token_logprobs"], json::parse("[null, -1.25, -2.0]"));
  EXPECT_EQ(only["choices"][0]["logprobs"]["top_logprobs"], json::parse("[null, {}, {}]"));
  EXPECT_EQ(only["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(only["usage"]["completion_tokens"], 0);
  EXPECT_FALSE(scored.needs_cancel());

  // Echo without logprobs asks the engine for no scores; a prompt the engine did not score in
  // full is an error, not a short list.
  EXPECT_EQ(parse_completion_request(json::parse(R"({"prompt": [4, 5], "echo": true})"), model).params.prompt_logprobs,
            -1);
  ResponseBuilder short_list(r, model, "cmpl-w", 5);
  engine::TokenEvent missing = logprob_event(7, 1, -0.5f, {{7, -0.5f}}, engine::FinishReason::kLength);
  missing.prompt_logprobs = {{5, -1.25f, {{9, -0.75f}}}};
  short_list.add_event(missing);
  EXPECT_EQ(short_list.final_status(), 500);
  EXPECT_NE(short_list.final_body().find("1 prompt log-probabilities for a prompt of 3 tokens"), std::string::npos);
}

// Chat's logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}, the token's text
// and its bytes from the tokenizer; completions' text_offset counts the characters before a token.
TEST(ResponseBuilder, ChatLogprobsCarryTheTokensTextAndBytes) {
  REQUIRE_TOKENIZER();
  const auto tokenizer = shared_tokenizer();
  const ModelInfo model = model_info(tokenizer.get());
  const ApiRequest r = parse_chat_request(
      json::parse(R"({"messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 1})"), model);
  EXPECT_EQ(r.params.logprobs, 1);
  const int32_t hello = tokenizer->encode("Hello", false).at(0);
  const int32_t world = tokenizer->encode(" world", false).at(0);
  ResponseBuilder b(r, model, "chatcmpl-x", 1);
  b.add_event(logprob_event(hello, 1, -0.5f, {{world, -0.25f}}));
  b.add_event(logprob_event(model.eos_token_id, 2, -1.0f, {{model.eos_token_id, -1.0f}}, engine::FinishReason::kStop));
  const json body = json::parse(b.final_body());
  const json& content = body["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 2u) << body.dump();
  EXPECT_EQ(content[0]["token"], "Hello");
  EXPECT_EQ(content[0]["logprob"], -0.5);
  EXPECT_EQ(content[0]["bytes"], json::parse("[72, 101, 108, 108, 111]"));
  EXPECT_EQ(content[0]["top_logprobs"], json::parse(R"([{"token": " world", "logprob": -0.25,
      "bytes": [32, 119, 111, 114, 108, 100]}])"));
  EXPECT_EQ(content[1]["token"], std::string(tokenizer->token_bytes(model.eos_token_id)));  // the stop token too

  const ApiRequest c = parse_completion_request(json::parse(R"({"prompt": "Hi", "logprobs": 0})"), model);
  ResponseBuilder completion(c, model, "cmpl-x", 1);
  completion.add_event(logprob_event(hello, 1, -0.5f, {}));
  completion.add_event(logprob_event(world, 2, -0.75f, {}, engine::FinishReason::kLength));
  const json lp = json::parse(completion.final_body())["choices"][0]["logprobs"];
  EXPECT_EQ(lp["tokens"], json::parse(R"(["Hello", " world"])"));
  EXPECT_EQ(lp["text_offset"], json::parse("[0, 5]"));
  EXPECT_EQ(lp["top_logprobs"], json::parse("[{}, {}]"));

  // Echo: the prompt's text (its BOS skipped as a special token) before the completion's, the
  // offsets counting it.
  const ApiRequest echoed = parse_completion_request(json::parse(R"({"prompt": "Hi", "logprobs": 0, "echo": true})"),
                                                     model);
  ASSERT_EQ(echoed.params.prompt.size(), 2u);  // BOS, "Hi"
  ResponseBuilder echo(echoed, model, "cmpl-e", 1);
  engine::TokenEvent first = logprob_event(hello, 1, -0.5f, {});
  first.prompt_logprobs = {{echoed.params.prompt[1], -3.0f, {}}};
  echo.add_event(first);
  echo.add_event(logprob_event(world, 2, -0.75f, {}, engine::FinishReason::kLength));
  const json eb = json::parse(echo.final_body());
  EXPECT_EQ(eb["choices"][0]["text"], "HiHello world");
  EXPECT_EQ(eb["choices"][0]["logprobs"]["text_offset"], json::parse("[0, 0, 2, 7]"));
  EXPECT_EQ(eb["choices"][0]["logprobs"]["token_logprobs"], json::parse("[null, -3.0, -0.5, -0.75]"));

  // Two single-byte tokens that are not UTF-8 on their own read as one name, U+FFFD: one key, the
  // likelier's value.
  std::vector<int32_t> lone_bytes;
  for (int32_t id = 0; id < tokenizer->vocab_size() && lone_bytes.size() < 2; ++id) {
    const std::string_view b = tokenizer->token_bytes(id);
    if (b.size() == 1 && static_cast<unsigned char>(b[0]) >= 0x80) lone_bytes.push_back(id);
  }
  ASSERT_EQ(lone_bytes.size(), 2u);
  const ApiRequest c2 = parse_completion_request(json::parse(R"({"prompt": "Hi", "logprobs": 2})"), model);
  ResponseBuilder named(c2, model, "cmpl-y", 1);
  named.add_event(logprob_event(hello, 1, -0.5f, {{lone_bytes[0], -0.75f}, {lone_bytes[1], -1.5f}},
                                engine::FinishReason::kLength));
  EXPECT_EQ(json::parse(named.final_body())["choices"][0]["logprobs"]["top_logprobs"],
            json::parse(R"([{"\ufffd": -0.75}])"));
}

TEST(ResponseBuilder, NonStreamBodyAndErrors) {
  const ModelInfo model = model_info();
  const ApiRequest r = parse_completion_request(json::parse(R"({"prompt": [4, 5], "max_tokens": 3})"), model);
  ResponseBuilder ok(r, model, "cmpl-x", 5);
  ok.add_event(token_event(7, 1));
  ok.add_event(token_event(8, 2, engine::FinishReason::kStop));
  EXPECT_EQ(ok.final_status(), 200);
  const json body = json::parse(ok.final_body());
  EXPECT_EQ(body["object"], "text_completion");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(body["usage"]["total_tokens"], 4);

  ResponseBuilder failed(r, model, "cmpl-y", 5);
  engine::TokenEvent e;
  e.finished = true;
  e.reason = engine::FinishReason::kError;
  e.error = "device lost";
  failed.add_event(e);
  EXPECT_EQ(failed.final_status(), 500);
  EXPECT_EQ(json::parse(failed.final_body())["error"]["message"], "device lost");

  ApiRequest s = r;
  s.stream = true;
  ResponseBuilder streamed(s, model, "cmpl-z", 5);
  const std::string out = streamed.stream_event(e);
  EXPECT_NE(out.find("\"device lost\""), std::string::npos);
  EXPECT_NE(out.find("data: [DONE]\n\n"), std::string::npos);
}

// --- Prometheus text ---

// Checks the exposition format: HELP/TYPE before samples, valid names, numeric values.
std::string prometheus_problem(const std::string& text, std::set<std::string>* families) {
  static const std::regex help(R"(# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) .*)");
  static const std::regex type(R"(# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (gauge|counter|histogram|summary|untyped))");
  static const std::regex sample(
      R"(([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*")(,[a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*")*\})? (\S+))");
  std::map<std::string, std::string> types;
  std::istringstream in(text);
  std::string line;
  std::smatch m;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    if (std::regex_match(line, m, help)) continue;
    if (std::regex_match(line, m, type)) {
      if (types.count(m[1])) return "TYPE given twice: " + line;
      types[m[1]] = m[2];
      continue;
    }
    if (!std::regex_match(line, m, sample)) return "not a sample line: " + line;
    std::string name = m[1], value = m[7];
    std::string family = name;
    for (const char* suffix : {"_bucket", "_sum", "_count"})
      if (!types.count(family) && name.size() > strlen(suffix) &&
          name.compare(name.size() - strlen(suffix), strlen(suffix), suffix) == 0)
        family = name.substr(0, name.size() - strlen(suffix));
    if (!types.count(family)) return "sample before its TYPE: " + line;
    if (value != "+Inf" && value != "-Inf" && value != "NaN") {
      char* end = nullptr;
      std::strtod(value.c_str(), &end);
      if (*end != '\0') return "bad value: " + line;
    }
    families->insert(family);
  }
  return "";
}

TEST(Metrics, WriterProducesPrometheusText) {
  PrometheusWriter w;
  w.gauge("dsv4_a", "A gauge.", 0.25);
  w.counter("dsv4_b_total", "A counter.", 3, {{"path", "/v1/x"}, {"status", "200"}});
  w.counter("dsv4_b_total", "A counter.", 4, {{"path", "quote\"d"}, {"status", "500"}});
  Histogram h({0.1, 1.0});
  h.observe(0.05);
  h.observe(0.5);
  h.observe(5);
  h.write(w, "dsv4_latency_seconds", "A histogram.");
  std::set<std::string> families;
  EXPECT_EQ(prometheus_problem(w.text(), &families), "");
  EXPECT_EQ(families, (std::set<std::string>{"dsv4_a", "dsv4_b_total", "dsv4_latency_seconds"}));
  EXPECT_NE(w.text().find("dsv4_latency_seconds_bucket{le=\"1\"} 2\n"), std::string::npos) << w.text();
  EXPECT_NE(w.text().find("dsv4_latency_seconds_bucket{le=\"+Inf\"} 3\n"), std::string::npos);
  EXPECT_NE(w.text().find("dsv4_latency_seconds_count 3\n"), std::string::npos);
  EXPECT_NE(w.text().find("path=\"quote\\\"d\""), std::string::npos);
  EXPECT_EQ(w.text().find("# TYPE dsv4_b_total counter"), w.text().rfind("# TYPE dsv4_b_total counter"));
}

// --- end to end ---

// The tiny model on the CPU backend behind a server on an ephemeral port, built
// once per test process (ctest runs each test in its own process: keep them few).
struct ServerEnv {
  model::ModelConfig config = model::preset_config("tiny");
  model::ModelWeights weights;
  std::unique_ptr<ops::Backend> backend = ops::make_cpu_backend(2);
  std::shared_ptr<engine::ModelRunner> runner;
  std::unique_ptr<engine::LocalServingEngine> engine;
  std::shared_ptr<const Tokenizer> tokenizer;
  std::unique_ptr<HttpServer> server;
  int port = 0;

  ServerEnv() {
    weights = model::bind_weights(config, testing::tiny_weights().lookup(), 0, config.n_routed_experts);
    engine::RunnerOptions o;
    o.max_tokens_per_step = 512;
    o.max_seqs_per_step = 64;
    o.max_logit_rows = 64;
    o.max_blocks_per_seq = engine::pages_for_positions(kMaxModelLen);
    o.cache.num_slots = 64;
    o.cache.num_pages = kPages;
    runner = std::make_shared<engine::ModelRunner>(config, weights, *backend, o);
    engine::SchedulerConfig sc;
    sc.max_num_seqs = 64;
    sc.max_num_batched_tokens = 512;
    sc.prefill_chunk = 512;
    sc.max_model_len = kMaxModelLen;
    engine = std::make_unique<engine::LocalServingEngine>(runner, sc, int32_t(config.eos_token_id));
  }
  ~ServerEnv() {
    server.reset();
    engine->shutdown(false);
  }
  // (Re)starts the server; the tokenizer only where a test needs text (loading it takes a while).
  void serve(bool with_tokenizer) {
    if (server && (!with_tokenizer || tokenizer)) return;
    server.reset();
    tokenizer = with_tokenizer ? shared_tokenizer() : nullptr;
    server = std::make_unique<HttpServer>(*engine, tokenizer, options());
    port = server->start();
  }
  static HttpServerOptions options() {
    HttpServerOptions so;
    so.host = "127.0.0.1";
    so.port = 0;
    so.served_model_name = "tiny";
    so.num_threads = 320;
    so.keep_alive_timeout_s = 1;
    so.build_info = {{"version", "0.1.0"}, {"commit", "0123456789ab"}, {"dirty", false}};
    return so;
  }
  // Waits until nothing runs or waits, every page is free and the server holds
  // no request; false after `timeout`. A streamed request's ticket is released
  // by the server thread after the last chunk is written, so a client can read
  // [DONE] a moment before the server's in-flight count drops.
  bool wait_idle(std::chrono::milliseconds timeout) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      const auto s = engine->stats();
      const bool server_idle = !server || server->num_inflight() == 0;
      if (s.running == 0 && s.waiting == 0 && s.free_pages == kPages && server_idle) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }
};

struct HttpResult {
  int status = 0;
  std::string content_type, body;
  httplib::Error error = httplib::Error::Success;
};

// POST with the body streamed into the result; `more` may stop reading early
// (the client then closes the connection).
HttpResult post(int port, const std::string& path, const std::string& body,
                std::function<bool(const std::string&)> more = nullptr) {
  httplib::Client cli("127.0.0.1", port);
  cli.set_connection_timeout(30);
  cli.set_read_timeout(120);
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.headers = {{"Content-Type", "application/json"}};
  req.body = body;
  HttpResult r;
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    r.body.append(data, n);
    return !more || more(r.body);
  };
  auto res = cli.send(req);
  r.error = res.error();
  if (res) {
    r.status = res->status;
    r.content_type = res->get_header_value("Content-Type");
  }
  return r;
}

HttpResult get(int port, const std::string& path) {
  httplib::Client cli("127.0.0.1", port);
  cli.set_read_timeout(30);
  auto res = cli.Get(path);
  HttpResult r;
  r.error = res.error();
  if (res) {
    r.status = res->status;
    r.body = res->body;
    r.content_type = res->get_header_value("Content-Type");
  }
  return r;
}

size_t count_of(const std::string& s, const std::string& needle) {
  size_t n = 0;
  for (size_t p = s.find(needle); p != std::string::npos; p = s.find(needle, p + needle.size())) ++n;
  return n;
}

// The value of one sample ("name" or "name{labels}") in Prometheus text; 0 when absent.
double metric(const std::string& text, const std::string& sample) {
  const std::string key = "\n" + sample + " ";
  const size_t pos = ("\n" + text).find(key);
  return pos == std::string::npos ? 0.0 : std::strtod(text.c_str() + pos + key.size() - 1, nullptr);
}

class Serve : public ::testing::Test {
 protected:
  static void TearDownTestSuite() {
    delete env_;
    env_ = nullptr;
  }
  static ServerEnv& env(bool with_tokenizer = false) {
    if (!env_) env_ = new ServerEnv();
    env_->serve(with_tokenizer);
    return *env_;
  }
  static ServerEnv* env_;
};
ServerEnv* Serve::env_ = nullptr;

// Checks one streamed completion: well-formed SSE, one chunk per token, the
// finish chunk, the usage chunk and [DONE]. Returns "" or the problem.
std::string check_stream(const HttpResult& r, int prompt_tokens, int max_tokens, std::string* id) {
  if (r.error != httplib::Error::Success) return "client error " + httplib::to_string(r.error);
  if (r.status != 200) return "HTTP " + std::to_string(r.status) + ": " + r.body;
  if (r.content_type.rfind("text/event-stream", 0) != 0) return "content type " + r.content_type;
  std::string problem;
  const auto events = sse_payloads(r.body, &problem);
  if (!problem.empty()) return problem;
  if (events.size() != size_t(max_tokens) + 2 || events.back() != "[DONE]")
    return "expected " + std::to_string(max_tokens) + " chunks, usage and [DONE]: " + r.body.substr(0, 400);
  for (int i = 0; i < max_tokens; ++i) {
    const json c = json::parse(events[size_t(i)], nullptr, false);
    if (c.is_discarded()) return "bad JSON: " + events[size_t(i)];
    if (c["object"] != "text_completion" || c["model"] != "tiny" || c["choices"].size() != 1 ||
        !c["choices"][0]["text"].is_string() || c["choices"][0]["token_ids"].size() != 1)
      return "bad chunk: " + events[size_t(i)];
    if (i == 0) *id = c["id"];
    if (c["id"] != *id) return "id changed within a stream";
    const bool last = i == max_tokens - 1;
    if (last ? c["choices"][0]["finish_reason"] != "length" : !c["choices"][0]["finish_reason"].is_null())
      return "bad finish_reason: " + events[size_t(i)];
  }
  const json u = json::parse(events[size_t(max_tokens)], nullptr, false);
  if (u.is_discarded() || !u["choices"].empty() || u["usage"]["prompt_tokens"] != prompt_tokens ||
      u["usage"]["completion_tokens"] != max_tokens || u["usage"]["total_tokens"] != prompt_tokens + max_tokens)
    return "bad usage chunk: " + events[size_t(max_tokens)];
  return "";
}


TEST_F(Serve, TwoHundredConcurrentStreamingClients) {
  ServerEnv& e = env();
  constexpr int kClients = 200, kPrompt = 8, kTokens = 6;
  std::latch go(kClients);
  std::mutex mutex;
  std::vector<std::string> problems;
  std::set<std::string> ids;
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i)
    clients.emplace_back([&, i] {
      // Greedy: sampling at temperature > 0 sorts the whole vocabulary per token.
      const json body = {{"model", "tiny"},         {"prompt", random_prompt(kPrompt, uint64_t(i))},
                         {"max_tokens", kTokens},    {"ignore_eos", true},
                         {"stream", true},           {"stream_options", {{"include_usage", true}}},
                         {"return_token_ids", true}, {"temperature", 0}};
      go.arrive_and_wait();
      const HttpResult r = post(e.port, "/v1/completions", body.dump());
      std::string id;
      const std::string problem = check_stream(r, kPrompt, kTokens, &id);
      std::lock_guard<std::mutex> lock(mutex);
      if (!problem.empty()) problems.push_back("client " + std::to_string(i) + ": " + problem);
      ids.insert(id);
    });
  for (auto& t : clients) t.join();
  EXPECT_TRUE(problems.empty()) << problems.size() << " failed; first: " << problems.front();
  EXPECT_EQ(ids.size(), size_t(kClients));  // response ids are unique
  EXPECT_TRUE(e.wait_idle(5s));
  const auto s = e.engine->stats();
  EXPECT_EQ(s.running, 0);
  EXPECT_EQ(s.waiting, 0);
  EXPECT_EQ(s.free_pages, kPages);
  EXPECT_EQ(e.server->num_inflight(), 0u);
}

TEST_F(Serve, NonStreamingEndpointsErrorsAndPrometheusMetrics) {
  ServerEnv& e = env();
  const std::string before = get(e.port, "/metrics").body;  // counters are per process
  EXPECT_EQ(get(e.port, "/health").status, 200);
  const HttpResult version = get(e.port, "/version");
  ASSERT_EQ(version.status, 200);
  EXPECT_EQ(json::parse(version.body), json({{"version", "0.1.0"}, {"commit", "0123456789ab"}, {"dirty", false}}));
  const HttpResult models = get(e.port, "/v1/models");
  ASSERT_EQ(models.status, 200);
  const json m = json::parse(models.body);
  EXPECT_EQ(m["object"], "list");
  EXPECT_EQ(m["data"][0]["id"], "tiny");
  EXPECT_EQ(m["data"][0]["max_model_len"], kMaxModelLen);

  const std::string request = R"({"model": "tiny", "prompt": [11, 12, 13, 14], "max_tokens": 5, "ignore_eos": true,
                                  "return_token_ids": true, "temperature": 0})";
  const HttpResult r = post(e.port, "/v1/completions", request);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.content_type, "application/json");
  const json j = json::parse(r.body);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["id"].get<std::string>().rfind("cmpl-", 0), 0u);
  EXPECT_EQ(j["choices"][0]["index"], 0);
  EXPECT_TRUE(j["choices"][0]["text"].is_string());
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["choices"][0]["token_ids"].size(), 5u);
  EXPECT_EQ(j["choices"][0]["prompt_token_ids"], json::array({11, 12, 13, 14}));
  EXPECT_EQ(j["usage"], json::parse(R"({"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9})"));
  // Greedy decoding is reproducible.
  EXPECT_EQ(json::parse(post(e.port, "/v1/completions", request).body)["choices"][0]["token_ids"],
            j["choices"][0]["token_ids"]);

  struct Case {
    std::string path, body;
    int status;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"/v1/completions", "{not json", 400, "the request body is not valid JSON"},
      {"/v1/completions", "", 400, "the request body is empty"},
      {"/v1/completions", R"({"prompt": [1, 2], "temperature": "hot"})", 400,
       R"(temperature must be a number in [0, 2], got \"hot\")"},
      {"/v1/completions", R"({"prompt": [1, 2], "model": "gpt-4"})", 404, "The model `gpt-4` does not exist"},
      {"/v1/completions", json{{"prompt", std::vector<int32_t>(1000, 5)}, {"max_tokens", 100}}.dump(), 400,
       "maximum context length is 1024 tokens. However, you requested 1100 tokens (1000 in the prompt, 100 in "
       "the completion)"},
      {"/v1/completions", R"({"prompt": "text"})", 400, "this server runs without a tokenizer"},
      {"/v1/chat/completions", R"({"messages": [{"role": "robot", "content": "x"}]})", 400,
       R"(messages[0].role must be one of system, user, assistant, got \"robot\")"},
      {"/v1/nothing", "{}", 404, "no route for POST /v1/nothing"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.path + " " + c.body.substr(0, 80));
    const HttpResult bad = post(e.port, c.path, c.body);
    EXPECT_EQ(bad.status, c.status);
    EXPECT_EQ(bad.content_type, "application/json");
    EXPECT_NE(bad.body.find(c.message), std::string::npos) << bad.body;
    const json body = json::parse(bad.body, nullptr, false);
    ASSERT_FALSE(body.is_discarded());
    EXPECT_TRUE(body["error"]["message"].is_string());
  }

  const HttpResult metrics = get(e.port, "/metrics");
  ASSERT_EQ(metrics.status, 200);
  EXPECT_EQ(metrics.content_type.rfind("text/plain", 0), 0u);
  std::set<std::string> families;
  EXPECT_EQ(prometheus_problem(metrics.body, &families), "") << metrics.body;
  for (const char* f : {"dsv4_num_requests_running", "dsv4_num_requests_waiting", "dsv4_kv_cache_usage_ratio",
                        "dsv4_generation_tokens_total", "dsv4_prompt_tokens_total",
                        "dsv4_engine_finished_requests_total", "dsv4_num_preemptions_total", "dsv4_step_time_seconds",
                        "dsv4_generation_tokens_per_second", "dsv4_time_to_first_token_seconds",
                        "dsv4_e2e_request_latency_seconds", "dsv4_http_requests_total", "dsv4_request_finished_total",
                        "dsv4_build_info"})
    EXPECT_TRUE(families.count(f)) << f << " missing from\n" << metrics.body;
  auto delta = [&](const std::string& text, const std::string& sample) {
    return metric(text, sample) - metric(before, sample);
  };
  EXPECT_EQ(delta(metrics.body, "dsv4_generation_tokens_total"), 10) << metrics.body;
  EXPECT_EQ(delta(metrics.body, "dsv4_prompt_tokens_total"), 8);
  EXPECT_EQ(delta(metrics.body, "dsv4_request_finished_total{finished_reason=\"length\"}"), 2);
  EXPECT_EQ(metric(metrics.body, "dsv4_num_requests_running"), 0);
  EXPECT_EQ(metric(metrics.body, "dsv4_build_info{commit=\"0123456789ab\",dirty=\"false\",version=\"0.1.0\"}"), 1);
  // HTTP counts are taken after the response is written: poll briefly.
  const std::string bad_requests = "dsv4_http_requests_total{path=\"/v1/completions\",status=\"400\"}";
  std::string text = metrics.body;
  for (int i = 0; i < 100 && delta(text, bad_requests) != 5; ++i) {
    std::this_thread::sleep_for(10ms);
    text = get(e.port, "/metrics").body;
  }
  EXPECT_EQ(delta(text, bad_requests), 5) << text;
  EXPECT_TRUE(e.wait_idle(2s));
}

TEST_F(Serve, TextCompletionChatAndStopStrings) {
  REQUIRE_TOKENIZER();
  ServerEnv& e = env(/*with_tokenizer=*/true);
  // Greedy text for a prompt, then the same request with a stop string taken
  // from the middle of that text: the output ends right before it.
  const json base = {{"prompt", "The quick brown fox"}, {"max_tokens", 12}, {"temperature", 0},
                     {"ignore_eos", true},              {"return_token_ids", true}};
  const HttpResult full = post(e.port, "/v1/completions", base.dump());
  ASSERT_EQ(full.status, 200) << full.body;
  const json f = json::parse(full.body);
  const std::string text = f["choices"][0]["text"];
  const std::vector<int32_t> out_ids = f["choices"][0]["token_ids"];
  EXPECT_EQ(text, e.tokenizer->decode(out_ids, true));
  std::string stop;
  for (size_t i = 4; i < out_ids.size() && stop.empty(); ++i) {
    const std::string piece = e.tokenizer->decode({out_ids[i]}, true);
    if (piece.size() >= 2 && piece.find("\xEF\xBF\xBD") == std::string::npos) stop = piece;
  }
  if (!stop.empty()) {
    json with_stop = base;
    with_stop["stop"] = {stop};
    const HttpResult cut = post(e.port, "/v1/completions", with_stop.dump());
    ASSERT_EQ(cut.status, 200) << cut.body;
    const json c = json::parse(cut.body);
    EXPECT_EQ(c["choices"][0]["text"], text.substr(0, text.find(stop))) << "stop " << stop;
    EXPECT_EQ(c["choices"][0]["finish_reason"], "stop");
    EXPECT_LT(c["usage"]["completion_tokens"].get<int>(), 12);
  }

  // Greedy with logprobs: each token is its row's most likely, so its log-probability is the
  // first alternative's, and the text offsets follow the text.
  json with_logprobs = base;
  with_logprobs["logprobs"] = 3;
  const HttpResult scored = post(e.port, "/v1/completions", with_logprobs.dump());
  ASSERT_EQ(scored.status, 200) << scored.body;
  const json s = json::parse(scored.body)["choices"][0];
  EXPECT_EQ(s["text"], text);
  const json& lp = s["logprobs"];
  ASSERT_EQ(lp["tokens"].size(), out_ids.size()) << lp.dump();
  StreamingDetokenizer detok(*e.tokenizer, /*skip_special=*/true);
  int64_t offset = 0;  // characters of the text before token i
  for (size_t i = 0; i < out_ids.size(); ++i) {
    SCOPED_TRACE(i);
    const float logprob = lp["token_logprobs"][i];
    EXPECT_LE(logprob, 0.0f);
    // 3 names, fewer only where ids without a token (all named "") are among them
    ASSERT_GE(lp["top_logprobs"][i].size(), 1u);
    ASSERT_LE(lp["top_logprobs"][i].size(), 3u);
    float best = -INFINITY;
    for (const auto& [name, value] : lp["top_logprobs"][i].items()) best = std::max(best, value.get<float>());
    EXPECT_EQ(logprob, best);
    // (bytes that end inside a UTF-8 sequence are written as U+FFFD)
    EXPECT_EQ(lp["tokens"][i], json::parse(dump_json(std::string(e.tokenizer->token_bytes(out_ids[i])))));
    EXPECT_EQ(lp["text_offset"][i], offset);
    for (const char c : detok.push(out_ids[i])) offset += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  }

  // Echo scores a prompt as an evaluation harness sends it (token ids, echo, max_tokens 0): the
  // prompt is this request's prompt and its first 5 generated tokens, whose scores are the ones
  // they were generated with (a prefill row equals the decode row at its position), and the
  // text is the prompt's.
  const std::vector<int32_t> prompt_ids = f["choices"][0]["prompt_token_ids"];
  std::vector<int32_t> scored_ids = prompt_ids;
  scored_ids.insert(scored_ids.end(), out_ids.begin(), out_ids.begin() + 5);
  const json echo_body = {{"prompt", scored_ids}, {"max_tokens", 0}, {"logprobs", 3}, {"echo", true}};
  const HttpResult echo = post(e.port, "/v1/completions", echo_body.dump());
  ASSERT_EQ(echo.status, 200) << echo.body;
  const json ej = json::parse(echo.body);
  const json& elp = ej["choices"][0]["logprobs"];
  ASSERT_EQ(elp["token_logprobs"].size(), scored_ids.size()) << elp.dump();
  EXPECT_TRUE(elp["token_logprobs"][0].is_null());
  EXPECT_TRUE(elp["top_logprobs"][0].is_null());
  for (size_t i = 0; i < 5; ++i) {
    SCOPED_TRACE("generated token " + std::to_string(i));
    EXPECT_EQ(elp["token_logprobs"][prompt_ids.size() + i], lp["token_logprobs"][i]);
    EXPECT_EQ(elp["top_logprobs"][prompt_ids.size() + i], lp["top_logprobs"][i]);
  }
  EXPECT_EQ(ej["choices"][0]["text"], e.tokenizer->decode(scored_ids, true));
  EXPECT_EQ(ej["usage"]["completion_tokens"], 0);
  EXPECT_EQ(ej["usage"]["prompt_tokens"], scored_ids.size());

  const HttpResult chat = post(e.port, "/v1/chat/completions",
                               R"({"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hello!"}], "max_completion_tokens": 4,
                                   "logprobs": true, "top_logprobs": 2})");
  ASSERT_EQ(chat.status, 200) << chat.body;
  const json cj = json::parse(chat.body);
  EXPECT_EQ(cj["object"], "chat.completion");
  EXPECT_EQ(cj["id"].get<std::string>().rfind("chatcmpl-", 0), 0u);
  EXPECT_EQ(cj["choices"][0]["message"]["role"], "assistant");
  EXPECT_TRUE(cj["choices"][0]["message"]["content"].is_string());
  EXPECT_EQ(cj["usage"]["completion_tokens"].get<int>() + cj["usage"]["prompt_tokens"].get<int>(),
            cj["usage"]["total_tokens"].get<int>());
  const json& content = cj["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), cj["usage"]["completion_tokens"].get<size_t>()) << chat.body;
  for (const json& t : content) {
    EXPECT_TRUE(t["token"].is_string() && t["bytes"].is_array());
    EXPECT_EQ(t["top_logprobs"].size(), 2u);
    EXPECT_GE(t["top_logprobs"][0]["logprob"].get<float>(), t["top_logprobs"][1]["logprob"].get<float>());
    EXPECT_LE(t["logprob"].get<float>(), t["top_logprobs"][0]["logprob"].get<float>());
  }

  const HttpResult chat_stream =
      post(e.port, "/v1/chat/completions",
           R"({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": true, "stream": true,
               "stream_options": {"include_usage": true}})");
  ASSERT_EQ(chat_stream.status, 200);
  std::string problem;
  const auto events = sse_payloads(chat_stream.body, &problem);
  ASSERT_TRUE(problem.empty()) << problem;
  ASSERT_EQ(events.size(), 1u + 3u + 1u + 1u) << chat_stream.body;  // role, 3 tokens, usage, [DONE]
  EXPECT_EQ(json::parse(events[0])["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(json::parse(events[3])["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(json::parse(events[4])["usage"]["completion_tokens"], 3);
  EXPECT_EQ(events[5], "[DONE]");
  EXPECT_TRUE(e.wait_idle(2s));
}

// n choices and batches of prompts over HTTP: each choice is the request of its prompt alone
// with seed + j (the same tokens), streamed or not; min_p 1 gives the greedy tokens; min_tokens
// holds back a stop token; a batch
// scored with echo and logprobs, as lm-eval's loglikelihood requests send it, equals its
// prompts scored one at a time.
TEST_F(Serve, ChoicesAndBatchesEqualTheirRequestsAlone) {
  ServerEnv& e = env();
  const json base = {{"prompt", {11, 12, 13, 14}}, {"max_tokens", 6}, {"ignore_eos", true},
                     {"return_token_ids", true},    {"temperature", 0.9}, {"seed", 40}};
  json three = base;
  three["n"] = 3;
  const HttpResult r = post(e.port, "/v1/completions", three.dump());
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = json::parse(r.body);
  ASSERT_EQ(j["choices"].size(), 3u);
  EXPECT_EQ(j["usage"], json::parse(R"({"prompt_tokens": 4, "completion_tokens": 18, "total_tokens": 22})"));
  for (int c = 0; c < 3; ++c) {
    json alone = base;
    alone["seed"] = 40 + c;
    const json a = json::parse(post(e.port, "/v1/completions", alone.dump()).body);
    EXPECT_EQ(j["choices"][c]["index"], c);
    EXPECT_EQ(j["choices"][c]["token_ids"], a["choices"][0]["token_ids"]) << "choice " << c;
  }
  EXPECT_NE(j["choices"][0]["token_ids"], j["choices"][1]["token_ids"]);  // (6 draws at T 0.9 from 129280)
  json penalized = base;  // (the rows' arithmetic: EngineCoreTest.PenalizedRowsAreTheRawRowsPenalizedByTheTokensSeen)
  penalized["presence_penalty"] = 1.5;
  penalized["frequency_penalty"] = 0.5;
  penalized["repetition_penalty"] = 1.2;
  penalized["logit_bias"] = {{"11", -100}, {"500", 5}};
  const HttpResult pr = post(e.port, "/v1/completions", penalized.dump());
  ASSERT_EQ(pr.status, 200) << pr.body;
  EXPECT_EQ(json::parse(pr.body)["choices"][0]["token_ids"].size(), 6u);
  // min_p 1 keeps the most likely token alone: a sampled request then gives the greedy tokens.
  json only_likeliest = base, greedy = base;
  only_likeliest["min_p"] = 1;
  greedy["temperature"] = 0;
  const HttpResult mr = post(e.port, "/v1/completions", only_likeliest.dump());
  ASSERT_EQ(mr.status, 200) << mr.body;
  EXPECT_EQ(json::parse(mr.body)["choices"][0]["token_ids"],
            json::parse(post(e.port, "/v1/completions", greedy.dump()).body)["choices"][0]["token_ids"]);
  // min_tokens 3 holds back a stop token id biased to the top: it ends the request as the 4th token.
  json held = base;
  held["stop_token_ids"] = {700};
  held["logit_bias"] = {{"700", 100}};
  for (int min_tokens : {0, 3}) {
    held["min_tokens"] = min_tokens;
    const HttpResult hr = post(e.port, "/v1/completions", held.dump());
    ASSERT_EQ(hr.status, 200) << hr.body;
    const json hj = json::parse(hr.body);
    EXPECT_EQ(hj["choices"][0]["finish_reason"], "stop") << "min_tokens " << min_tokens;
    EXPECT_EQ(hj["usage"]["completion_tokens"], min_tokens + 1) << "min_tokens " << min_tokens;
  }

  json streamed = three;
  streamed["stream"] = true;
  const HttpResult s = post(e.port, "/v1/completions", streamed.dump());
  ASSERT_EQ(s.status, 200);
  std::string problem;
  const auto chunks = sse_payloads(s.body, &problem);
  ASSERT_TRUE(problem.empty()) << problem;
  std::vector<json> ids(3, json::array());
  int done = 0;
  for (const std::string& c : chunks) {
    if (c == "[DONE]") {
      ++done;
      continue;
    }
    const json chunk = json::parse(c)["choices"][0];
    for (const auto& id : chunk["token_ids"]) ids[chunk["index"].get<size_t>()].push_back(id);
  }
  EXPECT_EQ(done, 1);
  EXPECT_EQ(chunks.back(), "[DONE]");
  for (int c = 0; c < 3; ++c) EXPECT_EQ(ids[size_t(c)], j["choices"][c]["token_ids"]) << "choice " << c;

  const std::vector<std::vector<int32_t>> prompts = {{5, 6, 7, 8, 9}, {21, 22}, {31, 32, 33}};
  const json batch = {{"prompt", prompts}, {"max_tokens", 0}, {"echo", true}, {"logprobs", 1}, {"temperature", 0}};
  const HttpResult scored = post(e.port, "/v1/completions", batch.dump());
  ASSERT_EQ(scored.status, 200) << scored.body;
  const json sj = json::parse(scored.body);
  ASSERT_EQ(sj["choices"].size(), 3u);
  EXPECT_EQ(sj["usage"], json::parse(R"({"prompt_tokens": 10, "completion_tokens": 0, "total_tokens": 10})"));
  for (size_t i = 0; i < prompts.size(); ++i) {
    json alone = batch;
    alone["prompt"] = prompts[i];
    const json a = json::parse(post(e.port, "/v1/completions", alone.dump()).body);
    EXPECT_EQ(sj["choices"][i]["logprobs"], a["choices"][0]["logprobs"]) << "prompt " << i;
    EXPECT_EQ(sj["choices"][i]["logprobs"]["token_logprobs"].size(), prompts[i].size());
  }
}

TEST_F(Serve, ClientThatDisconnectsHasItsRequestCancelled) {
  ServerEnv& e = env();
  // Streaming: read three token chunks, then hang up. The server notices at its
  // next write and cancels; 1000 tokens would take seconds.
  int64_t before = e.engine->stats().generated_tokens;
  const std::string cancelled_before = get(e.port, "/metrics").body;
  const json body = {{"prompt", random_prompt(8, 7)}, {"max_tokens", 1000}, {"ignore_eos", true}, {"stream", true}};
  const auto start = std::chrono::steady_clock::now();
  const HttpResult r = post(e.port, "/v1/completions", body.dump(),
                            [](const std::string& so_far) { return count_of(so_far, "data: ") < 3; });
  EXPECT_EQ(r.error, httplib::Error::Canceled);
  ASSERT_TRUE(e.wait_idle(5s)) << "the streaming request still runs after its client left";
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
  EXPECT_LT(e.engine->stats().generated_tokens - before, 200) << "tokens generated before the cancel took effect";
  const HttpResult metrics = get(e.port, "/metrics");
  EXPECT_EQ(metric(metrics.body, "dsv4_num_requests_running"), 0);
  EXPECT_EQ(metric(metrics.body, "dsv4_kv_cache_free_pages"), kPages);
  EXPECT_EQ(metric(metrics.body, "dsv4_request_finished_total{finished_reason=\"cancelled\"}") -
                metric(cancelled_before, "dsv4_request_finished_total{finished_reason=\"cancelled\"}"),
            1)
      << metrics.body;

  // Not streaming: the server watches the idle connection (about once a second).
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(uint16_t(e.port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const std::string plain = json{{"prompt", random_prompt(8, 9)}, {"max_tokens", 1000}, {"ignore_eos", true}}.dump();
  const std::string request = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                              "Content-Length: " +
                              std::to_string(plain.size()) + "\r\n\r\n" + plain;
  ASSERT_EQ(send(fd, request.data(), request.size(), 0), ssize_t(request.size()));
  before = e.engine->stats().generated_tokens;
  for (int i = 0; i < 500 && e.engine->stats().running == 0; ++i) std::this_thread::sleep_for(10ms);
  ASSERT_EQ(e.engine->stats().running, 1);
  close(fd);
  EXPECT_TRUE(e.wait_idle(5s)) << "the non-streaming request still runs after its client left";
  EXPECT_LT(e.engine->stats().generated_tokens - before, 900);
}

TEST_F(Serve, ShutdownDrainsInFlightRequestsThenCancelsAfterTheGracePeriod) {
  ServerEnv& e = env();
  // A server of its own over the shared engine, so the shutdown leaves the fixture's.
  auto streaming_clients = [&](int port, int count, int max_tokens, std::vector<HttpResult>& results,
                               std::atomic<int>& streaming) {
    std::vector<std::thread> clients;
    for (int i = 0; i < count; ++i)
      clients.emplace_back([&, port, max_tokens, i] {
        const json body = {{"prompt", random_prompt(8, 100 + uint64_t(i))}, {"max_tokens", max_tokens},
                           {"ignore_eos", true},                           {"stream", true},
                           {"stream_options", {{"include_usage", true}}},  {"return_token_ids", true}};
        bool counted = false;
        results[size_t(i)] = post(port, "/v1/completions", body.dump(), [&](const std::string& so_far) {
          if (!counted && so_far.find("data: ") != std::string::npos) {
            counted = true;
            ++streaming;
          }
          return true;
        });
      });
    return clients;
  };
  {
    HttpServerOptions so = ServerEnv::options();
    so.shutdown_grace_s = 60;
    HttpServer server(*e.engine, nullptr, so);
    const int port = server.start();
    constexpr int kClients = 3, kTokens = 20;
    std::atomic<int> streaming{0};
    std::vector<HttpResult> results(kClients);
    auto clients = streaming_clients(port, kClients, kTokens, results, streaming);
    for (int i = 0; i < 3000 && streaming < kClients; ++i) std::this_thread::sleep_for(5ms);
    ASSERT_EQ(streaming.load(), kClients);
    std::thread stopper([&] { server.shutdown(); });
    for (int i = 0; i < 1000 && server.healthy(); ++i) std::this_thread::sleep_for(1ms);
    // Draining: health says so, new requests are refused, running ones go on.
    EXPECT_EQ(get(port, "/health").status, 503);
    const HttpResult refused = post(port, "/v1/completions", R"({"prompt": [1, 2], "max_tokens": 1})");
    EXPECT_EQ(refused.status, 503);
    EXPECT_NE(refused.body.find("shutting down"), std::string::npos);
    for (auto& t : clients) t.join();
    stopper.join();
    for (int i = 0; i < kClients; ++i) {
      std::string id;
      EXPECT_EQ(check_stream(results[size_t(i)], 8, kTokens, &id), "") << "client " << i;
    }
    EXPECT_TRUE(e.wait_idle(2s));
  }
  {
    HttpServerOptions so = ServerEnv::options();
    so.shutdown_grace_s = 0.2;
    HttpServer server(*e.engine, nullptr, so);
    const int port = server.start();
    std::atomic<int> streaming{0};
    std::vector<HttpResult> results(1);
    auto clients = streaming_clients(port, 1, 1000, results, streaming);
    for (int i = 0; i < 3000 && streaming < 1; ++i) std::this_thread::sleep_for(5ms);
    ASSERT_EQ(streaming.load(), 1);
    const auto start = std::chrono::steady_clock::now();
    server.shutdown();
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 10.0);
    clients[0].join();
    EXPECT_EQ(results[0].status, 200);
    std::string problem;
    const auto events = sse_payloads(results[0].body, &problem);
    EXPECT_TRUE(problem.empty()) << problem;
    ASSERT_GE(events.size(), 2u);
    EXPECT_EQ(events.back(), "[DONE]");
    EXPECT_NE(events[events.size() - 2].find("shutting down"), std::string::npos) << events[events.size() - 2];
    EXPECT_TRUE(e.wait_idle(3s));
  }
}

}  // namespace
}  // namespace dsv4::serve
