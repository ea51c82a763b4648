#include "serve/tokenizer.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <unordered_map>

#include "core/error.h"

namespace dsv4::serve {
namespace {

using nlohmann::json;
using core::fail;

// ---------------------------------------------------------------------------------------
// Unicode classes

// The only distinctions the pre-tokenizer regexes make. kSpace is Oniguruma's \s; the
// whitespace characters all lie outside L/M/N/P/S, so one class per code point suffices.
enum CharClass : uint8_t { kOther = 0, kLetter, kMark, kNumber, kPunct, kSymbol, kSpace };

struct ClassRange {
  uint32_t first;
  uint32_t last;
  CharClass cls;
};

constexpr ClassRange kClassRanges[] = {
#include "serve/unicode_table.inc"
};

// Code point given to a byte that is not part of valid UTF-8; classed as kOther.
constexpr uint32_t kInvalidCodePoint = 0x110000;

CharClass char_class(uint32_t cp) {
  // Almost all text is in the BMP: a flat table there, binary search above.
  static const std::array<CharClass, 0x10000> bmp = [] {
    std::array<CharClass, 0x10000> table{};
    for (const ClassRange& r : kClassRanges) {
      if (r.first >= 0x10000) break;
      for (uint32_t cp = r.first; cp <= std::min<uint32_t>(r.last, 0xFFFF); ++cp) table[cp] = r.cls;
    }
    return table;
  }();
  if (cp < 0x10000) return bmp[cp];
  auto it = std::upper_bound(std::begin(kClassRanges), std::end(kClassRanges), cp,
                             [](uint32_t v, const ClassRange& r) { return v < r.first; });
  if (it == std::begin(kClassRanges)) return kOther;
  --it;
  return cp <= it->last ? it->cls : kOther;
}

// ---------------------------------------------------------------------------------------
// UTF-8

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Decodes `in` into valid UTF-8 the way WHATWG's decoder (and Rust's from_utf8_lossy)
// does: each maximal invalid subpart becomes one U+FFFD. With final=false a sequence
// cut off by the end of `in` is left alone; returns how many bytes were consumed.
size_t decode_utf8_lossy(std::string_view in, std::string& out, bool final) {
  const size_t n = in.size();
  size_t i = 0;
  while (i < n) {
    const auto b = static_cast<uint8_t>(in[i]);
    if (b < 0x80) {
      out += static_cast<char>(b);
      ++i;
      continue;
    }
    int need = 0;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) {
      need = 1;
    } else if (b >= 0xE0 && b <= 0xEF) {
      need = 2;
      if (b == 0xE0) lo = 0xA0;  // overlong
      if (b == 0xED) hi = 0x9F;  // surrogates
    } else if (b >= 0xF0 && b <= 0xF4) {
      need = 3;
      if (b == 0xF0) lo = 0x90;  // overlong
      if (b == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      out += kReplacement;
      ++i;
      continue;
    }
    size_t j = i + 1;
    bool bad = false;
    for (int k = 0; k < need; ++k, ++j) {
      if (j >= n) {
        if (!final) return i;
        out += kReplacement;
        return n;
      }
      const auto c = static_cast<uint8_t>(in[j]);
      if (c < lo || c > hi) {
        bad = true;
        break;
      }
      lo = 0x80;
      hi = 0xBF;
    }
    if (bad) {
      out += kReplacement;  // the byte at j starts over
    } else {
      out.append(in.substr(i, j - i));
    }
    i = j;
  }
  return n;
}

// One code point of the text being encoded, with where its bytes start.
struct Unit {
  uint32_t cp;
  CharClass cls;
  size_t offset;
};

// Strict decoding for pre-tokenization; a byte that does not start a valid sequence
// becomes a unit of its own so that byte-level BPE still sees every input byte.
void decode_units(std::string_view text, std::vector<Unit>& units) {
  units.clear();
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const auto b = static_cast<uint8_t>(text[i]);
    uint32_t cp = kInvalidCodePoint;
    size_t len = 1;
    if (b < 0x80) {
      cp = b;
    } else {
      int need = 0;
      uint8_t lo = 0x80, hi = 0xBF;
      uint32_t value = 0;
      if (b >= 0xC2 && b <= 0xDF) {
        need = 1, value = b & 0x1F;
      } else if (b >= 0xE0 && b <= 0xEF) {
        need = 2, value = b & 0x0F;
        if (b == 0xE0) lo = 0xA0;
        if (b == 0xED) hi = 0x9F;
      } else if (b >= 0xF0 && b <= 0xF4) {
        need = 3, value = b & 0x07;
        if (b == 0xF0) lo = 0x90;
        if (b == 0xF4) hi = 0x8F;
      }
      if (need > 0 && i + need < n) {
        bool ok = true;
        for (int k = 1; ok && k <= need; ++k) {
          const auto c = static_cast<uint8_t>(text[i + k]);
          if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xBF)) ok = false;
          value = (value << 6) | (c & 0x3F);
        }
        if (ok) cp = value, len = 1 + need;
      }
    }
    units.push_back({cp, cp == kInvalidCodePoint ? kOther : char_class(cp), i});
    i += len;
  }
}

// ---------------------------------------------------------------------------------------
// Pre-tokenizer patterns. Each matcher looks at units[i] within a piece ending at `end`
// and returns where the regex match starting at i ends (i when there is none), with
// the backtracking semantics of Oniguruma/JS for that exact pattern.

enum class SplitPattern {
  kDigits,     // \p{N}{1,3}
  kCjk,        // [\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+
  kDeepSeek,   // the word/punctuation/whitespace alternation, see match_deepseek
};

const std::string kDigitsPattern = R"(\p{N}{1,3})";
const std::string kCjkPattern = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+";
// tokenizer.json writes CR/LF in the classes as the raw characters.
const std::string kDeepSeekPattern =
    R"re([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^)re" "\r\n"
    R"re(\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[)re" "\r\n"
    R"re(]*|\s*[)re" "\r\n" R"re(]+|\s+(?!\S)|\s+)re";

size_t match_digits(const std::vector<Unit>& u, size_t i, size_t end) {
  size_t j = i;
  while (j < end && j - i < 3 && u[j].cls == kNumber) ++j;
  return j;
}

bool is_cjk(uint32_t cp) {
  return (cp >= 0x4E00 && cp <= 0x9FA5) || (cp >= 0x3040 && cp <= 0x309F) ||
         (cp >= 0x30A0 && cp <= 0x30FF);
}

size_t match_cjk(const std::vector<Unit>& u, size_t i, size_t end) {
  size_t j = i;
  while (j < end && is_cjk(u[j].cp)) ++j;
  return j;
}

bool is_ascii_punct(uint32_t cp) {
  return (cp >= 0x21 && cp <= 0x2F) || (cp >= 0x3A && cp <= 0x40) ||
         (cp >= 0x5B && cp <= 0x60) || (cp >= 0x7B && cp <= 0x7E);
}
bool is_ascii_alpha(uint32_t cp) { return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z'; }
bool is_newline(uint32_t cp) { return cp == '\r' || cp == '\n'; }
bool is_letter_or_mark(CharClass c) { return c == kLetter || c == kMark; }
bool is_punct_or_symbol(CharClass c) { return c == kPunct || c == kSymbol; }

// [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+
// | [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
// | ?[\p{P}\p{S}]+[\r\n]*
// | \s*[\r\n]+
// | \s+(?!\S)
// | \s+
size_t match_deepseek(const std::vector<Unit>& u, size_t i, size_t end) {
  const Unit& c = u[i];
  const bool has_next = i + 1 < end;
  // Punctuation glued to an ASCII word ("'s", ".com", "_name").
  if (is_ascii_punct(c.cp) && has_next && is_ascii_alpha(u[i + 1].cp)) {
    size_t j = i + 2;
    while (j < end && is_ascii_alpha(u[j].cp)) ++j;
    return j;
  }
  // A word, with one optional leading non-letter (space, mark, control...). When the
  // optional character cannot be followed by a letter the engine backtracks to
  // matching without it, which succeeds only if c itself is a letter or mark.
  const bool optional_ok = !is_newline(c.cp) && c.cls != kLetter && c.cls != kPunct &&
                           c.cls != kSymbol;
  if (optional_ok && has_next && is_letter_or_mark(u[i + 1].cls)) {
    size_t j = i + 2;
    while (j < end && is_letter_or_mark(u[j].cls)) ++j;
    return j;
  }
  if (is_letter_or_mark(c.cls)) {
    size_t j = i + 1;
    while (j < end && is_letter_or_mark(u[j].cls)) ++j;
    return j;
  }
  // Punctuation/symbol run with an optional leading space and trailing newlines.
  size_t p = i;
  if (c.cp == ' ' && has_next && is_punct_or_symbol(u[i + 1].cls)) p = i + 1;
  if (is_punct_or_symbol(u[p].cls)) {
    size_t j = p + 1;
    while (j < end && is_punct_or_symbol(u[j].cls)) ++j;
    while (j < end && is_newline(u[j].cp)) ++j;
    return j;
  }
  // Whitespace: the greedy \s* backtracks to the last newline of the run; without a
  // newline, \s+(?!\S) leaves the run's last space to prefix the next word.
  size_t run = i;
  size_t last_newline = end;
  while (run < end && u[run].cls == kSpace) {
    if (is_newline(u[run].cp)) last_newline = run;
    ++run;
  }
  if (run == i) return i;                            // not whitespace: no alternative matched
  if (last_newline != end) return last_newline + 1;  // \s*[\r\n]+
  if (run == end) return run;                        // \s+(?!\S) at the end of the piece
  if (run - i >= 2) return run - 1;                  // \s+(?!\S), backed off by one
  return run;                                        // \s+
}

size_t match_pattern(SplitPattern p, const std::vector<Unit>& u, size_t i, size_t end) {
  switch (p) {
    case SplitPattern::kDigits: return match_digits(u, i, end);
    case SplitPattern::kCjk: return match_cjk(u, i, end);
    case SplitPattern::kDeepSeek: return match_deepseek(u, i, end);
  }
  return i;
}

// ---------------------------------------------------------------------------------------
// Byte-level mapping (GPT-2's bytes_to_unicode): printable bytes stand for themselves,
// the others are shifted to U+0100.. so that no token contains a space or control.

std::array<uint32_t, 256> make_byte_to_char() {
  std::array<uint32_t, 256> table{};
  uint32_t shifted = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    table[b] = printable ? b : shifted++;
  }
  return table;
}

const std::array<uint32_t, 256>& byte_to_char() {
  static const std::array<uint32_t, 256> table = make_byte_to_char();
  return table;
}

// HF's ByteLevel decoder: a token whose characters are all byte-level characters is
// mapped back to bytes; any other token (e.g. <｜User｜>) is taken as it is.
std::string token_to_bytes(const std::string& token) {
  // Byte-level characters are all below U+0144.
  static const std::array<int16_t, 0x144> char_to_byte = [] {
    std::array<int16_t, 0x144> table;
    table.fill(-1);
    for (uint32_t b = 0; b < 256; ++b) table[byte_to_char()[b]] = static_cast<int16_t>(b);
    return table;
  }();
  std::string bytes;
  size_t i = 0;
  while (i < token.size()) {
    const auto b0 = static_cast<uint8_t>(token[i]);
    uint32_t cp = b0;
    size_t len = 1;
    if (b0 >= 0xC0 && b0 < 0xE0 && i + 1 < token.size()) {
      cp = ((b0 & 0x1Fu) << 6) | (static_cast<uint8_t>(token[i + 1]) & 0x3Fu);
      len = 2;
    } else if (b0 >= 0x80) {
      return token;  // three- or four-byte characters are never byte-level ones
    }
    if (cp >= char_to_byte.size() || char_to_byte[cp] < 0) return token;
    bytes += static_cast<char>(char_to_byte[cp]);
    i += len;
  }
  return bytes;
}

// ---------------------------------------------------------------------------------------
// Loading helpers

std::string json_type(const json& j) { return j.type_name(); }

// (`where` by value: g++ 13 takes a reference to a temporary "" for a dangling result.)
const json& require(const json& obj, const char* field, std::string_view where, const std::string& path) {
  const std::string at(where);
  if (!obj.is_object()) {
    fail("{}: {} must be an object, got {}", path, at.empty() ? "top level" : "field '" + at + "'", json_type(obj));
  }
  auto it = obj.find(field);
  if (it == obj.end()) fail("{}: missing field '{}{}'", path, at.empty() ? "" : at + ".", field);
  return *it;
}

std::string require_string(const json& obj, const char* field, const std::string& where,
                           const std::string& path) {
  const json& v = require(obj, field, where, path);
  if (!v.is_string()) {
    fail("{}: field '{}{}' must be a string, got {}", path, where.empty() ? "" : where + ".",
         field, json_type(v));
  }
  return v.get<std::string>();
}

bool optional_bool(const json& obj, const char* field, bool fallback) {
  auto it = obj.find(field);
  return it != obj.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

// "\r" written as a regex escape means the same as the raw character.
std::string normalize_pattern(std::string p) {
  std::string out;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == '\\' && i + 1 < p.size() && (p[i + 1] == 'r' || p[i + 1] == 'n')) {
      out += p[i + 1] == 'r' ? '\r' : '\n';
      ++i;
    } else {
      out += p[i];
    }
  }
  return out;
}

json read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open file", path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return json::parse(buffer.str());
  } catch (const json::exception& e) {
    fail("{}: invalid JSON: {}", path, e.what());
  }
}

std::string token_content(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return v["content"].get<std::string>();
  }
  return {};
}

struct MergeInfo {
  int32_t rank;
  int32_t merged;
};

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// Byte trie over the added tokens for leftmost-longest matching.
struct TrieNode {
  std::vector<std::pair<uint8_t, int32_t>> children;  // sorted by byte
  int32_t token = -1;
};

}  // namespace

struct Tokenizer::Impl {
  std::unordered_map<std::string, int32_t> vocab;        // model vocabulary
  std::unordered_map<std::string, int32_t> added;        // added tokens
  std::vector<std::string> id_to_token;                  // "" where no token
  std::vector<std::string> id_to_bytes;
  std::vector<uint8_t> special;                          // per id
  std::unordered_map<uint64_t, MergeInfo> merges;
  std::array<int32_t, 256> byte_ids{};
  std::vector<SplitPattern> splits;
  std::vector<TrieNode> trie{1};
  std::array<bool, 256> trie_first{};
  int32_t bos = -1;
  int32_t eos = -1;

  // Longest added token starting at text[i]: {length, id}, length 0 when none.
  std::pair<size_t, int32_t> match_added(std::string_view text, size_t i) const {
    size_t best_len = 0;
    int32_t best_id = -1;
    int32_t node = 0;
    for (size_t j = i; j < text.size(); ++j) {
      const auto& ch = trie[node].children;
      const auto b = static_cast<uint8_t>(text[j]);
      auto it = std::lower_bound(ch.begin(), ch.end(), b,
                                 [](const auto& c, uint8_t v) { return c.first < v; });
      if (it == ch.end() || it->first != b) break;
      node = it->second;
      if (trie[node].token >= 0) best_len = j + 1 - i, best_id = trie[node].token;
    }
    return {best_len, best_id};
  }

  void add_to_trie(const std::string& content, int32_t id) {
    int32_t node = 0;
    for (char c : content) {
      const auto b = static_cast<uint8_t>(c);
      auto& ch = trie[node].children;
      auto it = std::lower_bound(ch.begin(), ch.end(), b,
                                 [](const auto& x, uint8_t v) { return x.first < v; });
      if (it != ch.end() && it->first == b) {
        node = it->second;
      } else {
        const auto next = static_cast<int32_t>(trie.size());
        ch.insert(it, {b, next});
        trie.emplace_back();
        node = next;
      }
    }
    trie[node].token = id;
    trie_first[static_cast<uint8_t>(content[0])] = true;
  }

  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t left;
    int32_t right;
    int32_t merged;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  struct Scratch {
    std::vector<Unit> units;
    std::vector<Symbol> symbols;
    std::vector<Candidate> heap;
  };

  void push_candidate(Scratch& s, int32_t pos) const {
    const int32_t next = s.symbols[pos].next;
    if (next < 0) return;
    auto it = merges.find(pair_key(s.symbols[pos].id, s.symbols[next].id));
    if (it == merges.end()) return;
    s.heap.push_back({it->second.rank, pos, s.symbols[pos].id, s.symbols[next].id,
                      it->second.merged});
    std::push_heap(s.heap.begin(), s.heap.end(), std::greater<>{});
  }

  // BPE over one pre-tokenized piece: repeatedly merge the lowest-ranked adjacent pair,
  // leftmost first among equal ranks (as HF does), with a heap of candidate merges and
  // lazy invalidation, O(n log n) in the piece length.
  void bpe(std::string_view bytes, std::vector<int32_t>& out, Scratch& s) const {
    const auto n = static_cast<int32_t>(bytes.size());
    if (n == 1) {
      out.push_back(byte_ids[static_cast<uint8_t>(bytes[0])]);
      return;
    }
    s.symbols.resize(n);
    for (int32_t i = 0; i < n; ++i) {
      s.symbols[i] = {byte_ids[static_cast<uint8_t>(bytes[i])], i - 1, i + 1 < n ? i + 1 : -1};
    }
    s.heap.clear();
    for (int32_t i = 0; i + 1 < n; ++i) push_candidate(s, i);
    while (!s.heap.empty()) {
      std::pop_heap(s.heap.begin(), s.heap.end(), std::greater<>{});
      const Candidate c = s.heap.back();
      s.heap.pop_back();
      Symbol& left = s.symbols[c.pos];
      if (left.id != c.left || left.next < 0) continue;  // stale
      Symbol& right = s.symbols[left.next];
      if (right.id != c.right) continue;
      left.id = c.merged;
      right.id = -1;
      left.next = right.next;
      if (left.next >= 0) s.symbols[left.next].prev = c.pos;
      if (left.prev >= 0) push_candidate(s, left.prev);
      push_candidate(s, c.pos);
    }
    for (int32_t i = 0; i >= 0; i = s.symbols[i].next) out.push_back(s.symbols[i].id);
  }

  // Applies splits[step..] to units [b, e) of `text`, then BPE to each final piece.
  void pre_tokenize(std::string_view text, size_t step, size_t b, size_t e,
                    std::vector<int32_t>& out, Scratch& s) const {
    if (step == splits.size()) {
      const size_t from = s.units[b].offset;
      const size_t to = e < s.units.size() ? s.units[e].offset : text.size();
      bpe(text.substr(from, to - from), out, s);
      return;
    }
    // Split with behavior "Isolated": matches and the gaps between them are pieces.
    size_t gap = b;
    size_t i = b;
    while (i < e) {
      const size_t m = match_pattern(splits[step], s.units, i, e);
      if (m == i) {
        ++i;
        continue;
      }
      if (gap < i) pre_tokenize(text, step + 1, gap, i, out, s);
      pre_tokenize(text, step + 1, i, m, out, s);
      i = gap = m;
    }
    if (gap < e) pre_tokenize(text, step + 1, gap, e, out, s);
  }

  void encode_plain(std::string_view text, std::vector<int32_t>& out, Scratch& s) const {
    if (text.empty()) return;
    decode_units(text, s.units);
    pre_tokenize(text, 0, 0, s.units.size(), out, s);
  }
};

namespace {

void load_pre_tokenizer(const json& node, const std::string& where, const std::string& path,
                        std::vector<SplitPattern>& splits, bool& byte_level) {
  const std::string type = require_string(node, "type", where, path);
  if (type == "Sequence") {
    const json& list = require(node, "pretokenizers", where, path);
    if (!list.is_array()) fail("{}: field '{}.pretokenizers' must be an array", path, where);
    for (size_t i = 0; i < list.size(); ++i) {
      load_pre_tokenizer(list[i], fmt::format("{}.pretokenizers[{}]", where, i), path, splits,
                         byte_level);
    }
  } else if (type == "Split") {
    if (byte_level) fail("{}: {}: a Split after ByteLevel is not supported", path, where);
    const json& pattern = require(node, "pattern", where, path);
    const std::string regex = normalize_pattern(require_string(pattern, "Regex", where + ".pattern", path));
    const std::string behavior = require_string(node, "behavior", where, path);
    if (behavior != "Isolated") {
      fail("{}: field '{}.behavior' is '{}', only 'Isolated' is supported", path, where, behavior);
    }
    if (optional_bool(node, "invert", false)) fail("{}: field '{}.invert' must be false", path, where);
    if (regex == kDigitsPattern) {
      splits.push_back(SplitPattern::kDigits);
    } else if (regex == kCjkPattern) {
      splits.push_back(SplitPattern::kCjk);
    } else if (regex == normalize_pattern(kDeepSeekPattern)) {
      splits.push_back(SplitPattern::kDeepSeek);
    } else {
      fail("{}: field '{}.pattern.Regex' is an unsupported pattern: {}", path, where, regex);
    }
  } else if (type == "ByteLevel") {
    if (optional_bool(node, "add_prefix_space", false)) {
      fail("{}: field '{}.add_prefix_space' must be false", path, where);
    }
    if (optional_bool(node, "use_regex", true)) {
      fail("{}: field '{}.use_regex' must be false (the GPT-2 regex is not implemented)", path, where);
    }
    byte_level = true;
  } else {
    fail("{}: field '{}.type' is '{}', an unsupported pre-tokenizer", path, where, type);
  }
}

}  // namespace

Tokenizer Tokenizer::load(const std::string& path) {
  const json root = read_json(path);
  if (!root.is_object()) fail("{}: top level must be an object", path);
  auto impl = std::make_shared<Impl>();

  // Normalizer: none, or an empty Sequence.
  if (auto it = root.find("normalizer"); it != root.end() && !it->is_null()) {
    const std::string type = require_string(*it, "type", "normalizer", path);
    const bool empty_sequence = type == "Sequence" && it->contains("normalizers") &&
                                (*it)["normalizers"].is_array() && (*it)["normalizers"].empty();
    if (!empty_sequence) fail("{}: field 'normalizer' ({}) is not supported", path, type);
  }

  bool byte_level = false;
  load_pre_tokenizer(require(root, "pre_tokenizer", "", path), "pre_tokenizer", path,
                     impl->splits, byte_level);
  if (!byte_level) fail("{}: field 'pre_tokenizer' has no ByteLevel step", path);

  if (auto it = root.find("decoder"); it != root.end() && !it->is_null()) {
    const std::string type = require_string(*it, "type", "decoder", path);
    if (type != "ByteLevel") fail("{}: field 'decoder.type' is '{}', expected 'ByteLevel'", path, type);
  }

  const json& model = require(root, "model", "", path);
  const std::string model_type = require_string(model, "type", "model", path);
  if (model_type != "BPE") fail("{}: field 'model.type' is '{}', expected 'BPE'", path, model_type);
  if (auto it = model.find("dropout"); it != model.end() && !it->is_null()) {
    fail("{}: field 'model.dropout' must be null", path);
  }
  for (const char* field : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(field);
    if (it != model.end() && !it->is_null() && !(it->is_string() && it->get<std::string>().empty())) {
      fail("{}: field 'model.{}' is not supported", path, field);
    }
  }
  if (optional_bool(model, "byte_fallback", false)) fail("{}: field 'model.byte_fallback' must be false", path);
  if (optional_bool(model, "ignore_merges", false)) fail("{}: field 'model.ignore_merges' must be false", path);

  const json& vocab = require(model, "vocab", "model", path);
  if (!vocab.is_object()) fail("{}: field 'model.vocab' must be an object", path);
  int32_t max_id = -1;
  impl->vocab.reserve(vocab.size());
  for (const auto& [token, id_json] : vocab.items()) {
    if (!id_json.is_number_integer() || id_json.get<int64_t>() < 0 || id_json.get<int64_t>() > INT32_MAX) {
      fail("{}: field 'model.vocab' maps '{}' to {}, not a token id", path, token, id_json.dump());
    }
    const auto id = id_json.get<int32_t>();
    impl->vocab.emplace(token, id);
    max_id = std::max(max_id, id);
  }

  const json& added = require(root, "added_tokens", "", path);
  if (!added.is_array()) fail("{}: field 'added_tokens' must be an array", path);
  for (size_t i = 0; i < added.size(); ++i) {
    const std::string where = fmt::format("added_tokens[{}]", i);
    const json& id_json = require(added[i], "id", where, path);
    if (!id_json.is_number_integer() || id_json.get<int64_t>() < 0 || id_json.get<int64_t>() > INT32_MAX) {
      fail("{}: field '{}.id' is not a token id", path, where);
    }
    const std::string content = require_string(added[i], "content", where, path);
    if (content.empty()) fail("{}: field '{}.content' is empty", path, where);
    for (const char* flag : {"lstrip", "rstrip", "single_word"}) {
      if (optional_bool(added[i], flag, false)) {
        fail("{}: field '{}.{}' is true, which is not supported", path, where, flag);
      }
    }
    max_id = std::max(max_id, id_json.get<int32_t>());
  }

  const size_t size = static_cast<size_t>(max_id) + 1;
  impl->id_to_token.assign(size, {});
  impl->special.assign(size, 0);
  for (const auto& [token, id] : impl->vocab) impl->id_to_token[id] = token;
  for (const json& a : added) {
    const auto id = a["id"].get<int32_t>();
    const std::string content = a["content"].get<std::string>();
    impl->added[content] = id;
    impl->id_to_token[id] = content;
    impl->special[id] = optional_bool(a, "special", false) ? 1 : 0;
    impl->add_to_trie(content, id);
  }
  impl->id_to_bytes.resize(size);
  for (size_t id = 0; id < size; ++id) impl->id_to_bytes[id] = token_to_bytes(impl->id_to_token[id]);

  for (uint32_t b = 0; b < 256; ++b) {
    std::string ch;
    append_utf8(ch, byte_to_char()[b]);
    auto it = impl->vocab.find(ch);
    if (it == impl->vocab.end()) {
      fail("{}: field 'model.vocab' lacks the byte-level token '{}' for byte 0x{:02X}", path, ch, b);
    }
    impl->byte_ids[b] = it->second;
  }

  const json& merges = require(model, "merges", "model", path);
  if (!merges.is_array()) fail("{}: field 'model.merges' must be an array", path);
  impl->merges.reserve(merges.size() * 2);
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const json& m = merges[rank];
    std::string left, right;
    if (m.is_string()) {
      // Legacy "a b" form; byte-level tokens never contain a space.
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        fail("{}: field 'model.merges[{}]' ('{}') is not two tokens separated by a space", path, rank, s);
      }
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      fail("{}: field 'model.merges[{}]' is neither \"a b\" nor [\"a\", \"b\"]", path, rank);
    }
    auto find = [&](const std::string& token) {
      auto it = impl->vocab.find(token);
      if (it == impl->vocab.end()) {
        fail("{}: field 'model.merges[{}]' uses '{}', which is not in model.vocab", path, rank, token);
      }
      return it->second;
    };
    const int32_t a = find(left), b = find(right), merged = find(left + right);
    // The first occurrence of a pair wins, as a rank map built in order would keep.
    impl->merges.emplace(pair_key(a, b), MergeInfo{static_cast<int32_t>(rank), merged});
  }

  // bos/eos are not in tokenizer.json; tokenizer_config.json names them.
  std::string bos = "<\uFF5Cbegin\u2581of\u2581sentence\uFF5C>";
  std::string eos = "<\uFF5Cend\u2581of\u2581sentence\uFF5C>";
  const auto config_path = std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  if (std::filesystem::exists(config_path)) {
    const json config = read_json(config_path.string());
    if (config.is_object()) {
      if (auto it = config.find("bos_token"); it != config.end() && !token_content(*it).empty()) bos = token_content(*it);
      if (auto it = config.find("eos_token"); it != config.end() && !token_content(*it).empty()) eos = token_content(*it);
    }
  }
  Tokenizer tokenizer(impl);
  const auto bos_id = tokenizer.token_to_id(bos);
  const auto eos_id = tokenizer.token_to_id(eos);
  if (!bos_id) fail("{}: bos token '{}' is not in the vocabulary", path, bos);
  if (!eos_id) fail("{}: eos token '{}' is not in the vocabulary", path, eos);
  impl->bos = *bos_id;
  impl->eos = *eos_id;
  return tokenizer;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool allow_special) const {
  // BPE indexes symbols with int32.
  if (text.size() > static_cast<size_t>(INT32_MAX)) fail("cannot encode a text of {} bytes", text.size());
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  Impl::Scratch scratch;
  if (!allow_special || impl_->added.empty()) {
    impl_->encode_plain(text, out, scratch);
    return out;
  }
  size_t start = 0;
  size_t i = 0;
  while (i < text.size()) {
    if (!impl_->trie_first[static_cast<uint8_t>(text[i])]) {
      ++i;
      continue;
    }
    const auto [len, id] = impl_->match_added(text, i);
    if (len == 0) {
      ++i;
      continue;
    }
    impl_->encode_plain(text.substr(start, i - start), out, scratch);
    out.push_back(id);
    i += len;
    start = i;
  }
  impl_->encode_plain(text.substr(start), out, scratch);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) {
    if (skip_special && is_special(id)) continue;
    bytes += token_bytes(id);
  }
  std::string text;
  text.reserve(bytes.size());
  decode_utf8_lossy(bytes, text, /*final=*/true);
  return text;
}

int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_to_token.size()); }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  const std::string key(token);
  if (auto it = impl_->added.find(key); it != impl_->added.end()) return it->second;
  if (auto it = impl_->vocab.find(key); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= vocab_size() || impl_->id_to_token[id].empty()) {
    fail("token id {} has no token (vocabulary has {} ids)", id, vocab_size());
  }
  return impl_->id_to_token[id];
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->special[id] != 0;
}

std::string_view Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return impl_->id_to_bytes[id];
}

std::string StreamingDetokenizer::push(int32_t id) {
  if (skip_special_ && tokenizer_.is_special(id)) return {};
  pending_ += tokenizer_.token_bytes(id);
  std::string text;
  const size_t used = decode_utf8_lossy(pending_, text, /*final=*/false);
  pending_.erase(0, used);
  return text;
}

std::string StreamingDetokenizer::flush() {
  std::string text;
  decode_utf8_lossy(pending_, text, /*final=*/true);
  pending_.clear();
  return text;
}

}  // namespace dsv4::serve
