#include <gtest/gtest.h>

#include <filesystem>
#include <cstring>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/checkpoint.h"
#include "model/checkpoint_writer.h"
#include "model/safetensors.h"
#include "model/weight_spec.h"
#include "model/synthetic_weights.h"
#include "model/weights.h"
#include "test_util.h"

namespace dsv4::model {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// The tiny checkpoint, written once with small shards so there are several.
const std::string& tiny_dir() {
  static const std::string dir = [] {
    std::string d = testing::temp_dir("ckpt_tiny");
    CheckpointWriteOptions o;
    o.out_dir = d;
    o.seed = 1;
    o.max_shard_bytes = 24ull << 20;
    write_checkpoint(preset_config("tiny"), o);
    return d;
  }();
  return dir;
}

json read_json(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}

// A copy of the tiny checkpoint whose shards are symlinks, so tests can edit the
// index or replace single files cheaply.
std::string linked_copy(const std::string& name) {
  std::string d = testing::temp_dir(name);
  for (const auto& e : fs::directory_iterator(tiny_dir())) {
    if (e.path().extension() == ".safetensors") fs::create_symlink(e.path(), fs::path(d) / e.path().filename());
    else fs::copy_file(e.path(), fs::path(d) / e.path().filename());
  }
  return d;
}

std::string load_error(const std::string& dir) {
  try {
    Checkpoint c(dir);
    c.validate(checkpoint_tensor_specs(c.config()));
  } catch (const core::Error& e) {
    return e.what();
  }
  return "";
}

// Replaces tensor `name` by one of another dtype/shape in a new shard, and points the index at it.
void replace_tensor(const std::string& dir, const std::string& name, core::DType dtype, std::vector<int64_t> shape) {
  const std::string file = "model-bad.safetensors";
  SafetensorsWriter w((fs::path(dir) / file).string(), {{name, dtype, shape}});
  std::vector<uint8_t> zeros(w.entry(name).nbytes(), 0);
  w.write(name, 0, zeros.data(), zeros.size());
  w.finish();
  json index = read_json(fs::path(dir) / "model.safetensors.index.json");
  index["weight_map"][name] = file;
  std::ofstream(fs::path(dir) / "model.safetensors.index.json") << index.dump();
}

TEST(Checkpoint, WriterProducesTheOfficialLayout) {
  const fs::path d = tiny_dir();
  json index = read_json(d / "model.safetensors.index.json");
  ASSERT_TRUE(index.contains("weight_map"));
  const ModelConfig config = preset_config("tiny");
  const auto specs = checkpoint_tensor_specs(config);
  EXPECT_EQ(index["weight_map"].size(), specs.size());
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total_bytes(specs));
  std::set<std::string> files;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) files.insert(it->get<std::string>());
  EXPECT_GE(files.size(), 3u);
  for (const auto& f : files) {
    EXPECT_TRUE(fs::exists(d / f)) << f;
    EXPECT_EQ(f.substr(0, 6), "model-");
    EXPECT_NE(f.find("-of-"), std::string::npos);
  }
  Checkpoint c(d.string());
  EXPECT_NO_THROW(c.validate(specs));
  // Spec §8 dtypes of a few representative tensors.
  EXPECT_EQ(c.get("layers.0.ffn.experts.3.w1.weight").dtype(), core::DType::kI8);
  EXPECT_EQ(c.get("layers.0.ffn.experts.3.w1.scale").dtype(), core::DType::kF8E8M0);
  EXPECT_EQ(c.get("layers.0.ffn.experts.3.w2.weight").size(1), 64);  // [D, I/2]
  EXPECT_EQ(c.get("layers.1.attn.wq_b.weight").dtype(), core::DType::kF8E4M3);
  EXPECT_EQ(c.get("layers.1.ffn.gate.tid2eid").dtype(), core::DType::kI64);
  EXPECT_EQ(c.get("layers.1.attn.indexer.compressor.ape").size(1), 256);
  EXPECT_EQ(c.get("layers.2.attn.compressor.ape").size(0), 128);
  EXPECT_EQ(c.get("hc_head_fn").dtype(), core::DType::kF32);
  EXPECT_EQ(c.get("mtp.0.e_proj.scale").size(0), 2);
  EXPECT_EQ(c.find("layers.2.ffn.gate.tid2eid"), nullptr);  // layer 2 is not a hash layer
  EXPECT_NE(c.find("layers.2.ffn.gate.bias"), nullptr);
}

TEST(Checkpoint, StreamingWriterMatchesInMemoryGenerator) {
  Checkpoint c(tiny_dir());
  const auto& mem = testing::tiny_weights();
  for (const char* name : {"embed.weight", "layers.1.attn.wq_b.weight", "layers.1.attn.wq_b.scale",
                           "layers.3.ffn.experts.7.w2.weight", "layers.3.ffn.experts.7.w2.scale",
                           "layers.0.ffn.gate.tid2eid", "mtp.0.hc_attn_fn", "head.weight"}) {
    const core::Tensor& a = c.get(name);
    const core::Tensor b = mem.get(name);
    ASSERT_EQ(a.nbytes(), b.nbytes()) << name;
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.nbytes()), 0) << name;
  }
}

TEST(Checkpoint, SyntheticWeightsExerciseManyScales) {
  const auto& mem = testing::tiny_weights();
  std::set<uint8_t> fp8_scales, fp4_scales;
  const core::Tensor s8 = mem.get("layers.1.attn.wq_a.scale");
  for (int64_t i = 0; i < s8.numel(); ++i) fp8_scales.insert(s8.as<uint8_t>()[i]);
  const core::Tensor s4 = mem.get("layers.1.ffn.experts.0.w1.scale");
  for (int64_t i = 0; i < s4.numel(); ++i) fp4_scales.insert(s4.as<uint8_t>()[i]);
  EXPECT_GE(fp8_scales.size(), 2u);
  EXPECT_GE(fp4_scales.size(), 2u);
  // Hash-routing rows hold distinct valid experts.
  const core::Tensor ids = mem.get("layers.0.ffn.gate.tid2eid");
  for (int64_t t = 0; t < 1000; ++t) {
    const int64_t* r = ids.as<int64_t>() + t * 2;
    EXPECT_NE(r[0], r[1]);
    EXPECT_TRUE(r[0] >= 0 && r[0] < 8 && r[1] >= 0 && r[1] < 8);
  }
}

// A checkpoint larger than the free space fails before anything is written or created, with
// the folder and both sizes (v4-pro: 865 GB; skipped where this file system has that much).
TEST(Checkpoint, AWriteThatDoesNotFitFailsBeforeWritingAnything) {
  try {
    check_checkpoint_fits("ckpt", 160'000'000'000ull, 60'000'000'000ull);
    ADD_FAILURE() << "160 GB into 60 GB passed";
  } catch (const core::Error& e) {
    EXPECT_NE(std::string(e.what()).find("checkpoint ckpt: its tensors take 160.00 GB and 60.00 GB are free there"),
              std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(check_checkpoint_fits("ckpt", 1'000'000, 1'000'000'000));

  const ModelConfig pro = preset_config("v4-pro");
  const fs::path base = testing::temp_dir("checkpoint_fit");
  const uint64_t needed = needed_weight_bytes(pro);
  if (fs::space(base).available >= needed) GTEST_SKIP() << "this file system has room for v4-pro";
  CheckpointWriteOptions o;
  o.out_dir = (base / "a" / "v4-pro").string();
  std::string error;
  try {
    write_checkpoint(pro, o);
  } catch (const core::Error& e) {
    error = e.what();
  }
  EXPECT_NE(error.find("GB are free there"), std::string::npos) << error;
  EXPECT_FALSE(fs::exists(base / "a"));  // nothing created
}

TEST(Checkpoint, MissingTensorNamesTensorAndConfig) {
  const std::string d = linked_copy("ckpt_missing");
  json index = read_json(fs::path(d) / "model.safetensors.index.json");
  index["weight_map"].erase("layers.2.attn.compressor.wgate.weight");
  std::ofstream(fs::path(d) / "model.safetensors.index.json") << index.dump();
  const std::string e = load_error(d);
  EXPECT_NE(e.find("layers.2.attn.compressor.wgate.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("missing"), std::string::npos) << e;
  EXPECT_NE(e.find("compress_ratio=128"), std::string::npos) << e;
}

TEST(Checkpoint, WrongShapeNamesTensorFileAndExpectedShape) {
  const std::string d = linked_copy("ckpt_shape");
  replace_tensor(d, "layers.3.attn.indexer.wq_b.weight", core::DType::kF8E4M3, {512, 256});
  const std::string e = load_error(d);
  EXPECT_NE(e.find("layers.3.attn.indexer.wq_b.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("model-bad.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("[512, 256]"), std::string::npos) << e;
  EXPECT_NE(e.find("expected [512, 128]"), std::string::npos) << e;
  EXPECT_NE(e.find("index_n_heads=4"), std::string::npos) << e;
}

TEST(Checkpoint, WrongDtypeNamesBoth) {
  const std::string d = linked_copy("ckpt_dtype");
  replace_tensor(d, "layers.0.ffn.gate.tid2eid", core::DType::kI32, {129280, 2});
  const std::string e = load_error(d);
  EXPECT_NE(e.find("layers.0.ffn.gate.tid2eid"), std::string::npos) << e;
  EXPECT_NE(e.find("I32"), std::string::npos) << e;
  EXPECT_NE(e.find("expected I64"), std::string::npos) << e;
}

TEST(Checkpoint, TruncatedShardIsAClearError) {
  const std::string d = linked_copy("ckpt_truncated");
  json index = read_json(fs::path(d) / "model.safetensors.index.json");
  const std::string victim = index["weight_map"]["head.weight"].get<std::string>();
  fs::remove(fs::path(d) / victim);
  fs::copy_file(fs::path(tiny_dir()) / victim, fs::path(d) / victim);
  fs::resize_file(fs::path(d) / victim, fs::file_size(fs::path(d) / victim) - 1000);
  const std::string e = load_error(d);
  EXPECT_NE(e.find(victim), std::string::npos) << e;
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;
}

TEST(Checkpoint, CorruptHeaderAndMissingShardAreClearErrors) {
  const std::string d = linked_copy("ckpt_corrupt");
  json index = read_json(fs::path(d) / "model.safetensors.index.json");
  const std::string victim = index["weight_map"]["norm.weight"].get<std::string>();
  fs::remove(fs::path(d) / victim);
  {
    std::ofstream f(fs::path(d) / victim, std::ios::binary);
    uint64_t len = 16;
    f.write(reinterpret_cast<const char*>(&len), 8);
    f << "{\"not json...   ";
  }
  std::string e = load_error(d);
  EXPECT_NE(e.find(victim), std::string::npos) << e;
  EXPECT_NE(e.find("corrupt"), std::string::npos) << e;
  fs::remove(fs::path(d) / victim);
  e = load_error(d);
  EXPECT_NE(e.find(victim), std::string::npos) << e;
  EXPECT_NE(e.find("missing"), std::string::npos) << e;
  // A file shorter than the header length field.
  std::ofstream(fs::path(d) / victim) << "abc";
  e = load_error(d);
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;
}

TEST(Checkpoint, SingleFileCheckpointsLoad) {
  // model.safetensors without an index (as small HF repos ship).
  const std::string d = testing::temp_dir("ckpt_single");
  const ModelConfig config = preset_config("tiny");
  std::ofstream(fs::path(d) / "config.json") << config_to_json(config).dump();
  Checkpoint full(tiny_dir());
  std::vector<TensorDecl> decls;
  const auto specs = checkpoint_tensor_specs(config);
  for (const auto& s : specs) decls.push_back({s.name, s.dtype, s.shape});
  SafetensorsWriter w((fs::path(d) / "model.safetensors").string(), decls);
  for (const auto& s : specs) w.write(s.name, 0, full.get(s.name).data(), full.get(s.name).nbytes());
  w.finish();
  Checkpoint single(d);
  EXPECT_NO_THROW(single.validate(specs));
  EXPECT_EQ(single.num_files(), 1u);
}

// Every checkpoint tensor belongs to one decode stage (the MTP block to none), so
// `bench decode` counts each weight byte once against the stage that reads it.
TEST(WeightSpec, EveryTensorHasADecodeStage) {
  const std::set<std::string> stages = {"attn_in", "attn_q",  "index_in",      "attn_kv", "compress", "attn_core",
                                        "attn_out", "router", "shared_expert", "experts", "logits",   "embed"};
  for (const char* preset : {"tiny", "bench-1g"}) {
    std::map<std::string, uint64_t> bytes;
    for (const TensorSpec& s : checkpoint_tensor_specs(preset_config(preset))) {
      const std::string stage = decode_stage_of_tensor(s.name);
      if (s.name.rfind("mtp.", 0) == 0) {
        EXPECT_EQ(stage, "") << s.name;
        continue;
      }
      EXPECT_TRUE(stages.count(stage)) << preset << ": " << s.name << " -> '" << stage << "'";
      bytes[stage] += total_bytes({s});
    }
    for (const std::string& st : stages) EXPECT_GT(bytes[st], 0u) << preset << ": no weights in " << st;
  }
  const std::pair<const char*, const char*> expected[] = {
      {"layers.3.attn.wq_b.scale", "attn_q"},
      {"layers.3.attn.indexer.wq_b.weight", "attn_q"},
      {"layers.3.attn.indexer.compressor.ape", "index_in"},
      {"layers.3.attn.compressor.wkv.weight", "compress"},
      {"layers.3.attn.kv_norm.weight", "attn_kv"},
      {"layers.3.attn.wkv.weight", "attn_in"},
      {"layers.3.hc_attn_fn", "attn_in"},
      {"layers.3.attn.wo_b.weight", "attn_out"},
      {"layers.3.attn.attn_sink", "attn_core"},
      {"layers.0.ffn.gate.tid2eid", "router"},
      {"layers.12.hc_ffn_base", "attn_out"},
      {"layers.1.ffn.experts.7.w2.scale", "experts"},
      {"hc_head_fn", "logits"},
  };
  for (const auto& [tensor, stage] : expected) EXPECT_EQ(decode_stage_of_tensor(tensor), stage) << tensor;
  EXPECT_THROW(decode_stage_of_tensor("layers.0.ffn.mystery.weight"), core::Error);
  EXPECT_THROW(decode_stage_of_tensor("lm_head.weight"), core::Error);
}

}  // namespace
}  // namespace dsv4::model
