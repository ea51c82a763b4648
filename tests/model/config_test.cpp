#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/config.h"

namespace dsv4::model {
namespace {

using nlohmann::json;

// Expects parse_config to fail with a message containing every fragment.
void expect_error(const json& j, std::initializer_list<const char*> fragments) {
  try {
    parse_config(j, "cfg.json");
    ADD_FAILURE() << "no error for " << j.dump();
  } catch (const core::Error& e) {
    for (const char* f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
  }
}

TEST(Config, RoundTripsEveryPreset) {
  for (const auto& name : preset_names()) {
    const ModelConfig c = preset_config(name);
    const ModelConfig d = parse_config(config_to_json(c), name);
    EXPECT_EQ(config_to_json(c), config_to_json(d)) << name;
  }
}

TEST(Config, FlashLayerRoles) {
  const ModelConfig c = preset_config("v4-flash");
  EXPECT_EQ(c.compress_ratios.size(), 44u);
  EXPECT_EQ(c.attention_kind(0), AttentionKind::kSlidingWindow);
  EXPECT_EQ(c.attention_kind(1), AttentionKind::kSlidingWindow);
  EXPECT_EQ(c.attention_kind(2), AttentionKind::kCompressedSparse);
  EXPECT_EQ(c.attention_kind(3), AttentionKind::kHeavilyCompressed);
  EXPECT_EQ(c.attention_kind(42), AttentionKind::kCompressedSparse);
  EXPECT_EQ(c.compress_ratio(43), 0);  // MTP
  EXPECT_TRUE(c.is_hash_layer(2));
  EXPECT_FALSE(c.is_hash_layer(3));
  EXPECT_FALSE(c.is_hash_layer(43));
  const ModelConfig p = preset_config("v4-pro");
  EXPECT_EQ(p.compress_ratios.size(), 62u);
  EXPECT_EQ(p.attention_kind(0), AttentionKind::kHeavilyCompressed);
  EXPECT_EQ(p.index_topk, 1024);
}

TEST(Config, AcceptsExtraCompressRatiosAndUnknownKeys) {
  json j = config_to_json(preset_config("tiny"));
  j["compress_ratios"] = {0, 4, 128, 4, 0, 0, 0};  // e.g. a re-release with drafter stages
  j["dspark_num_stages"] = 3;
  EXPECT_NO_THROW(parse_config(j, "cfg.json"));
}

TEST(Config, ErrorsNameTheFieldAndTheExpectation) {
  const json base = config_to_json(preset_config("tiny"));
  json j = base;
  j.erase("hidden_size");
  expect_error(j, {"cfg.json", "hidden_size", "missing"});
  j = base;
  j["hidden_size"] = 250;
  expect_error(j, {"hidden_size", "multiple of 128", "250"});
  j = base;
  j["compress_ratios"] = {0, 4, 128};
  expect_error(j, {"compress_ratios", "at least", "5"});
  j = base;
  j["compress_ratios"] = {0, 4, 64, 4, 0};
  expect_error(j, {"compress_ratios", "[2]", "64"});
  j = base;
  j["model_type"] = "deepseek_v41";
  expect_error(j, {"model_type", "deepseek_v4"});
  j = base;
  j["num_attention_heads"] = "four";
  expect_error(j, {"num_attention_heads", "wrong type"});
  j = base;
  j["quantization_config"]["weight_block_size"] = {32, 32};
  expect_error(j, {"weight_block_size", "[128, 128]"});
  j = base;
  j["rope_scaling"].erase("factor");
  expect_error(j, {"rope_scaling", "factor"});
  j = base;
  j["o_groups"] = 3;
  expect_error(j, {"o_groups", "divisor"});
}

TEST(Config, UnknownPresetListsKnownOnes) {
  try {
    preset_config("huge");
    FAIL();
  } catch (const core::Error& e) {
    EXPECT_NE(std::string(e.what()).find("bench-1g"), std::string::npos);
  }
}

}  // namespace
}  // namespace dsv4::model
