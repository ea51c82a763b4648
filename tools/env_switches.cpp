#include "tools/env_switches.h"

#include <algorithm>
#include <charconv>
#include <cstdint>

#include <fmt/format.h>

extern char** environ;

namespace dsv4::tools {

namespace {

// What a switch takes (EnvValues), by kind.
constexpr EnvValues words(std::string_view w) {
  EnvValues v;
  v.words = w;
  return v;
}
constexpr EnvValues integers(int64_t min, int64_t max) {
  EnvValues v;
  v.min = min, v.max = max;
  return v;
}
constexpr EnvValues any(std::string_view shown) {
  EnvValues v;
  v.any = shown;
  return v;
}
constexpr EnvValues kOnOff = words("0|1");
constexpr std::string_view kCuda = "CUDA backend";

// The CUDA backend's switches are A/B and diagnostic knobs: every default is the measured
// choice (docs/BENCHMARKS.md), and most forms they select compute the same bits.
constexpr EnvSwitch kSwitches[] = {
    // The step as a whole.
    {"DSV4_CUDA_KERNELS", kCuda, words("simple"), "the fast kernels",
     "simple: the scalar reference kernels for the linears, compressors, indexer and attention (slow; to check the "
     "fast ones)"},
    {"DSV4_CUDA_LANES", kCuda, words("1|2|3"), "3", "streams a step's stages spread over (stage lanes)", true},
    {"DSV4_CUDA_PDL", kCuda, kOnOff, "1", "0: plain graph edges between kernels, no programmatic dependent launch"},
    {"DSV4_CUDA_PDL_LANES", kCuda, words("join|fork|chain|all|0"),
     "chain up to DSV4_CUDA_PDL_CHAIN_ROWS rows, join beyond",
     "which lane edges of a captured step become programmatic (chain: the joins' and each fork's edge toward its "
     "longest chain)", true},
    {"DSV4_CUDA_PDL_CHAIN_ROWS", kCuda, integers(0, int64_t(1) << 20), "2",
     "the rows up to which a captured step takes the chain lane edges where DSV4_CUDA_PDL_LANES is unset", true},
    {"DSV4_GRAPH_EDGES", kCuda, any("PREFIX"), "nothing written",
     "writes each captured graph's nodes and edges to PREFIX.N.tsv (for scripts/graph_trace_summary.py --edges)"},
    // Linears.
    {"DSV4_CUDA_QUANT8", kCuda, kOnOff, "1", "0: activations quantized a warp a 128-value block, not a half warp"},
    {"DSV4_CUDA_WIDE_GEMM", kCuda, kOnOff, "by shape (from 128 rows)",
     "FP8 and bf16 GEMMs in wide two-warpgroup tiles: 0 never, 1 at every row count"},
    {"DSV4_CUDA_WIDE_WO_A", kCuda, kOnOff, "1", "0: wo_a (the grouped FP8-as-bf16 GEMM) keeps its small tiles"},
    {"DSV4_CUDA_WIDE_BF16_256", kCuda, kOnOff, "1", "0: bf16 GEMMs of one K slice (the LM head) keep 128-row tiles"},
    {"DSV4_CUDA_WIDE_WS", kCuda, words("0|1|2"), "2",
     "wide FP8 tiles: 0 the lockstep kernel, 1 warp-specialised with one tile a CTA, 2 with CTAs walking tiles"},
    {"DSV4_CUDA_WIDE_WS_GRID", kCuda, words("even|sms"), "even",
     "mode 2's grid: even, as few CTAs as its rounds of tiles need; sms, one an SM"},
    {"DSV4_CUDA_WIDE_WS_WO_A", kCuda, kOnOff, "1", "0: wo_a's wide tiles on the lockstep kernel"},
    {"DSV4_CUDA_WIDE_WS_BF16", kCuda, kOnOff, "1", "0: bf16's 256-row tiles on the lockstep kernel"},
    {"DSV4_CUDA_WIDE_MC", kCuda, kOnOff, "1", "0: bf16's 256-row tiles without clusters of two (TMA multicast)"},
    {"DSV4_CUDA_FOLD_QUANT", kCuda, kOnOff, "1", "0: wo_a's fold leaves wo_b's quantization to its own launch"},
    {"DSV4_CUDA_NT1_ROWS", kCuda, integers(1, 8), "4",
     "the most rows a plain GEMM runs in 8-row tiles; more take 16-row tiles (the same bits)", true},
    {"DSV4_CUDA_CLUSTER_FOLD", kCuda, kOnOff, "1",
     "0: split 16-row GEMM tiles folded by split_fold_kernel, not clusters"},
    {"DSV4_CUDA_LAST_CTA_FOLD", kCuda, integers(0, int64_t(1) << 20), "64",
     "the most partials a thread of a tile's last CTA folds in 16- and 32-row tiles (0: split_fold_kernel)", true},
    {"DSV4_CUDA_LAST_CTA_FOLD_8ROW", kCuda, integers(0, int64_t(1) << 20), "32",
     "the most partials (slices x rows) a tile's last CTA folds in 8-row tiles, one after another (0: "
     "split_fold_kernel)", true},
    {"DSV4_CUDA_FOLD_HALF_ROWS", kCuda, kOnOff, "1",
     "0: a 16-row tile holding at most 8 rows folds its slices in full-width slabs, not half-width ones twice "
     "as deep (the same bits)"},
    {"DSV4_CUDA_ENTRY_RELEASE_ROWS", kCuda, integers(0, 65536), "4",
     "up to this many rows the plain GEMMs of at most DSV4_CUDA_ENTRY_RELEASE_MB and rms_norm_quant let their "
     "dependents launch at entry, before their own wait (0: never)", true},
    {"DSV4_CUDA_ENTRY_RELEASE_MB", kCuda, integers(0, 1 << 20), "64",
     "the weight megabytes up to which a plain GEMM releases at entry (DSV4_CUDA_ENTRY_RELEASE_ROWS)", true},
    // Token choice.
    {"DSV4_CUDA_CHOOSE_AGGREGATE", kCuda, kOnOff, "weighed passes only",
     "how choose_tokens' and token_logprobs' radix histograms add their keys: 0 a shared atomic a key, 1 a thread's "
     "keys of a bin summed in registers in every pass (the default does so only where the keys are weighed, top_p)"},
    {"DSV4_CUDA_CHOOSE_CTAS", kCuda, words("1|2|4|8"), "8",
     "the most CTAs (a cluster) choose_tokens and token_logprobs spread a row over, where the rows' clusters are "
     "resident at once (1: a CTA a row)"},
    // Router and routed experts.
    {"DSV4_CUDA_ROUTER_FOLD", kCuda, kOnOff, "1",
     "0: the router's logits folded by a launch, not by the select kernel"},
    {"DSV4_CUDA_ROUTER_EARLY", kCuda, kOnOff, "1", "0: the select kernel reads its tables after its dependency wait"},
    {"DSV4_CUDA_ROUTER_RANK", kCuda, kOnOff, "where the select does not fold (1-2 rows)",
     "the router's top k ranked by the select kernel's block, not chosen in k rounds on one warp: 0 never, 1 "
     "also where the select folds the GEMM's partials"},
    {"DSV4_CUDA_ROUTER_ONE_LAUNCH_ROWS", kCuda, integers(0, 16), "0",
     "the rows up to which the router's GEMM and select run as one launch (0: two launches; measured slower)", true},
    {"DSV4_CUDA_PREP_THREADS", kCuda, words("256|512|1024"), "512", "moe_prep_kernel's block size", true},
    {"DSV4_CUDA_PREP_WARP", kCuda, kOnOff, "1",
     "0: moe_prep's tile list by its block's counting sort, also where the pairs fit one warp"},
    {"DSV4_CUDA_PREP_ONE_LAUNCH_ROWS", kCuda, integers(0, 65536), "64",
     "the rows up to which moe_prep also quantizes x and zeroes the non-local pairs in one launch", true},
    {"DSV4_CUDA_PREP_ZERO", kCuda, kOnOff, "1", "0: the non-local pairs zeroed by a launch of their own"},
    {"DSV4_CUDA_TMA", kCuda, kOnOff, "1", "0: FP4 expert weights by cp.async, not TMA bulk copies"},
    {"DSV4_CUDA_SHARED_DECODE", kCuda, kOnOff, "by rows per expert",
     "FP4 expert tiles of 16 rows sharing each weight decode: 0 never, 1 always"},
    {"DSV4_CUDA_FUSED_EXPERTS", kCuda, kOnOff, "by shape (3-20 rows)",
     "the routed gate/up and down GEMMs as one launch: 0 never, 1 wherever the shapes allow"},
    {"DSV4_CUDA_SPLIT_FUSED_EXPERTS", kCuda, kOnOff, "0",
     "1: where both routed expert GEMMs split their K slices alike over clusters (1 row), they run as one launch, "
     "not as separate launches with SwiGLU between (measured slower)"},
    {"DSV4_CUDA_EXPERT_READY_FLAGS", kCuda, kOnOff, "0",
     "1: where both routed expert GEMMs split their K slices alike over clusters (1 row), the last gate/up cluster of "
     "each list tile runs its SwiGLU and sets a flag the down clusters wait on, in place of the SwiGLU launch "
     "(measured slower)"},
    {"DSV4_CUDA_EXPERT_SPLIT", kCuda, kOnOff, "by shape", "0: an expert GEMM never splits its K slices over CTAs"},
    {"DSV4_CUDA_EXPERT_CLUSTER_FOLD", kCuda, kOnOff, "1", "0: split FP4 expert launches fold by their last CTA"},
    {"DSV4_CUDA_SPLIT_SCALE_GROUPS", kCuda, kOnOff, "1", "0: split FP4 launches copy 4 scale bytes a stage"},
    {"DSV4_CUDA_EXPERT_EARLY_WEIGHTS", kCuda, kOnOff, "by shape",
     "the down GEMM's first weight stages before its wait (or, with DSV4_CUDA_EXPERT_READY_FLAGS=1, its flag): "
     "0 never, 1 wherever it runs 8-row tiles"},
    {"DSV4_CUDA_EXPERT_LAUNCHES", kCuda, integers(1, 8), "1",
     "a diagnostic: each expert GEMM walking its K slices runs as N launches (what a boundary costs)", true},
    // mHC.
    {"DSV4_CUDA_HC_ROW_MIX", kCuda, kOnOff, "1", "0: the mHC mix keeps a lane a mix at 32 rows and more"},
    {"DSV4_CUDA_HC_ROW_SPLIT", kCuda, words("1|2|4"), "2", "warps a row's mHC mixes spread over", true},
    {"DSV4_CUDA_HC_FUSED_ROWS", kCuda, integers(0, 16), "4",
     "the rows up to which the mHC mix and finish run as one launch (0: never)", true},
    {"DSV4_CUDA_HC_CLUSTER_ROWS", kCuda, integers(0, 2), "0",
     "the rows up to which the mHC mix and finish run in one cluster of 16 CTAs, no global hand-over (0: never; "
     "D a multiple of 2048 up to 4096; measured slower)", true},
    {"DSV4_CUDA_HC_QUICK_HAND_OVER", kCuda, kOnOff, "1", "0: the fused mHC launch's last arrival polls as the others"},
    {"DSV4_CUDA_HC_ROW_FINISHERS", kCuda, integers(0, 2), "0 (two at 2 rows, else one)",
     "CTAs that finish a row of the fused mHC launch, each storing its half of x, the norm and the codes "
     "(1 or 2: at every row count)", true},
    {"DSV4_CUDA_HC_SLOT_ROWS", kCuda, integers(0, 16), "16",
     "the rows up to which the mHC mix sums the MoE slots itself (else moe_reduce first)", true},
    {"DSV4_CUDA_HC_POST_SLOTS", kCuda, kOnOff, "1", "0: beyond 16 rows moe_reduce and hc_post as two launches"},
    // Norms.
    {"DSV4_CUDA_NORM_EARLY", kCuda, kOnOff, "1",
     "0: rms_norm's and rms_norm_linear's norm kernels load their weights after the row's sum, not before their "
     "dependency wait"},
    // Compressors, indexer, attention.
    {"DSV4_CUDA_COMPRESS_RATIO4_CTAS", kCuda, integers(1, 16), "4",
     "the most CTAs a ratio-4 compressor row's pooling spreads over", true},
    {"DSV4_CUDA_SCORE_PAGES", kCuda, words("1|2|4"), "by shape",
     "64-row index pages a scoring CTA of the indexer takes", true},
    {"DSV4_CUDA_SCORE_EARLY", kCuda, kOnOff, "1", "0: the indexer's scoring reads its tables after its wait"},
    {"DSV4_CUDA_SELECT_EARLY", kCuda, kOnOff, "1", "0: the top-k selection reads its tables after its wait"},
    {"DSV4_CUDA_ATTN_WGMMA", kCuda, kOnOff, "1", "0: the sparse attention on mma.sync, not wgmma"},
    {"DSV4_CUDA_ATTN_WGMMA_SPLIT", kCuda, kOnOff, "1", "0: the wgmma attention never spreads a row over CTAs"},
    {"DSV4_CUDA_ATTN_SPLIT_CTAS", kCuda, integers(0, 1024), "0 (the cost model)",
     "N > 0: a split attention row over min(N, its key segments) CTAs", true},
    {"DSV4_CUDA_ATTN_SPLIT_MAX_MB", kCuda, integers(1, int64_t(1) << 20), "64",
     "the most partial MiB a split attention launch may write", true},
    {"DSV4_CUDA_ATTN_SPLIT_ZERO_FOLD", kCuda, words("0|1"), "0",
     "1: split CTAs that leave a partial a segment zero their fold state too (the older form)"},
    {"DSV4_CUDA_ATTN_LEAD_FOLD", kCuda, words("2|all|off"), "2",
     "where the wgmma split takes the lead fold: splits over two CTAs, every split, none", true},
    {"DSV4_CUDA_ATTN_PAIR", kCuda, [] {
       EnvValues v = integers(1, INT64_MAX);
       v.words = "off|auto|all", v.ranges = true;
       return v;
     }(), "auto",
     "the wgmma attention's pair form (a row over a cluster of two CTAs): never, by cost, always, or at N / A-B rows",
     true},
    {"DSV4_CUDA_ATTN_EARLY", kCuda, kOnOff, "1",
     "0: the attention's split launches, register fold, mma.sync kernel and combine read their metadata after their "
     "wait"},
    {"DSV4_CUDA_ATTN_FOLD_REGS", kCuda, kOnOff, "1",
     "0: the wgmma attention's one-CTA-a-row launches keep the fold in local memory (both P.V tiles at once; the same "
     "bits)"},
    // Any backend.
    {"DSV4_GEMM_MIN_SLICE_STAGES", "ops", words("1|2|4|8"), "2",
     "the fewest 128-wide stages a GEMM's K slice keeps (CPU model and CUDA alike: changes the bits)", true},
    {"DSV4_GEMM_MIN_QUANT_SLICE_STAGES", "ops", words("1|2|4|8"), "DSV4_GEMM_MIN_SLICE_STAGES",
     "the same for the quantized GEMMs alone", true},
    {"DSV4_REPEAT_OPS", "ops", any("OP,OP,..."), "none",
     "runs each call of the named pure ops twice (outputs unchanged): an op's cost inside the graph step", true},
    {"DSV4_SEPARATE_METADATA", "engine", kOnOff, "0",
     "1: each of a step's metadata arrays in a device buffer of its own, uploaded on its own (slower; for "
     "compute-sanitizer, which then sees a kernel read past one array)"},
    // Programs and tools.
    {"DSV4_TOKENIZER_DIR", "serve", any("DIR"), "--model's directory, then the fetched one",
     "the directory of tokenizer.json for dsv4 serve (scripts/run.sh sets it)"},
    {"DSV4_GRAPH_TRACE", "graph trace", any("FILE"), "nothing recorded",
     "where the LD_PRELOAD library tools/graph_trace writes every kernel of the graph replays"},
    {"DSV4_TEST_SEED", "tests", any("SEED"), "a fresh seed, printed",
     "replays a test's random inputs"},
    {"DSV4_TEST_TMP", "tests", any("DIR"), "the system's temporary folder", "where tests write files (CTest sets it)"},
    {"DSV4_MMA_DUMP", "tests", any("DIR"), "the dump test skips", "where a study test dumps wgmma results"},
    {"DSV4_NODE", "tests", any("FILE"), "node from the PATH", "the node binary of the tokenizer's reference test"},
    {"DSV4_BUILD_TYPE", "scripts", any("TYPE"), "Release", "CMake's build type of scripts/setup.sh (run.sh, test.sh)"},
    {"DSV4_CMAKE_ARGS", "scripts", any("ARGS"), "none", "more arguments to scripts/setup.sh's cmake (-DDSV4_CUDA=OFF)"},
    {"DSV4_CACHE", "scripts", any("DIR"), "<repo>/.cache", "where scripts/fetch_tokenizer.sh keeps the tokenizer"},
    {"DSV4_COMMIT", "scripts", any("REV"), "git HEAD",
     "the commit scripts/gpu_suite.sh reports, and the build records (dsv4 --version) where the tree has no git"},
};

bool parse_int(std::string_view text, int64_t& out) {
  const char* end = text.data() + text.size();
  const auto r = std::from_chars(text.data(), end, out);
  return r.ec == std::errc() && r.ptr == end;
}

bool in_words(std::string_view words, std::string_view value) {
  size_t begin = 0;
  while (begin <= words.size()) {
    size_t end = words.find('|', begin);
    if (end == std::string_view::npos) end = words.size();
    if (words.substr(begin, end - begin) == value) return true;
    begin = end + 1;
  }
  return false;
}

// Edit distance (insertions, deletions, substitutions), for "did you mean".
size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

}  // namespace

std::span<const EnvSwitch> env_switches() { return kSwitches; }

const EnvSwitch* find_env_switch(std::string_view name) {
  for (const EnvSwitch& s : kSwitches)
    if (s.name == name) return &s;
  return nullptr;
}

std::string env_values_text(const EnvSwitch& s) {
  const EnvValues& v = s.values;
  if (!v.any.empty()) return std::string(v.any);
  std::string out;
  for (char c : v.words) out += c == '|' ? std::string(" | ") : std::string(1, c);
  if (v.min <= v.max) {
    if (!out.empty()) out += " | ";
    out += v.max == INT64_MAX ? fmt::format("N ({}..)", v.min)
           : v.words.empty()  ? fmt::format("{}..{}", v.min, v.max)
                              : fmt::format("N ({}..{})", v.min, v.max);
    if (v.ranges) out += " | A-B";
  }
  return out;
}

bool env_value_accepted(const EnvSwitch& s, std::string_view value) {
  const EnvValues& v = s.values;
  if (value.empty() || !v.any.empty() || in_words(v.words, value)) return true;
  if (v.min > v.max) return false;
  int64_t n = 0;
  if (parse_int(value, n)) return n >= v.min && n <= v.max;
  const size_t dash = value.find('-', 1);
  int64_t a = 0, b = 0;
  return v.ranges && dash != std::string_view::npos && parse_int(value.substr(0, dash), a) &&
         parse_int(value.substr(dash + 1), b) && a >= v.min && a <= b && b <= v.max;
}

std::vector<std::pair<std::string, std::string>> dsv4_environment() {
  std::vector<std::pair<std::string, std::string>> out;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string_view entry(*e);
    const size_t eq = entry.find('=');
    if (eq == std::string_view::npos || !entry.starts_with("DSV4_")) continue;
    out.emplace_back(std::string(entry.substr(0, eq)), std::string(entry.substr(eq + 1)));
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> environment_warnings(const std::vector<std::pair<std::string, std::string>>& env) {
  std::vector<std::string> out;
  for (const auto& [name, value] : env) {
    if (const EnvSwitch* s = find_env_switch(name)) {
      if (env_value_accepted(*s, value)) continue;
      std::string line = fmt::format("{}='{}' is not a value it takes ({})", name, value, env_values_text(*s));
      line += s->strict ? fmt::format("; the {} stops with an error when it reads it", s->reader)
                        : fmt::format("; the {} reads it as unset: {}", s->reader, s->unset);
      out.push_back(line);
      continue;
    }
    const EnvSwitch* nearest = nullptr;
    size_t best = 3;  // two letters off at most
    for (const EnvSwitch& s : kSwitches) {
      const size_t d = edit_distance(name, s.name);
      if (d < best) best = d, nearest = &s;
    }
    out.push_back(fmt::format("{} is not a variable dsv4 reads{}; `dsv4 env` lists them", name,
                              nearest ? fmt::format(" (did you mean {}?)", nearest->name) : std::string()));
  }
  return out;
}

}  // namespace dsv4::tools
