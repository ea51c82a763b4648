// The DeepSeek-V3/V4 tokenizer: a byte-level BPE that reads the Hugging Face
// tokenizer.json, plus a streaming detokenizer for token-by-token output.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dsv4::serve {

// Byte-level BPE with the semantics of HF `tokenizers` for the DeepSeek tokenizer.json:
//   1. added tokens (special or not) are cut out first, leftmost-longest;
//   2. the rest goes through the pre-tokenizer Sequence (Split regexes, then ByteLevel);
//   3. each piece is merged by BPE rank.
// No BOS/EOS is added by encode(): tokenizer.json's post-processor is a plain ByteLevel
// one, and the chat template writes the BOS as text.
//
// Only the pre-tokenizer regexes DeepSeek uses are implemented (by hand-written matchers
// with an embedded Unicode class table, see unicode_table.inc); load() rejects any other
// pattern rather than tokenizing it wrongly.
//
// Immutable after load(); copies share the data and may be used from several threads.
class Tokenizer {
 public:
  // Reads tokenizer.json; bos/eos come from tokenizer_config.json in the same directory
  // when present, else from the DeepSeek defaults. Throws core::Error naming the file
  // and the offending field.
  static Tokenizer load(const std::string& tokenizer_json_path);

  // allow_special=true matches every added token (special or not) in the text, as HF
  // does. allow_special=false treats the whole text as plain text, so user content can
  // never produce a control token such as <｜User｜>.
  // Invalid UTF-8 is tolerated: each bad byte is encoded as its own byte-level symbol.
  std::vector<int32_t> encode(std::string_view text, bool allow_special = true) const;

  // Concatenates the bytes of the tokens and decodes them as UTF-8, invalid sequences
  // becoming U+FFFD. Ids without a token are skipped (as HF does); skip_special drops
  // the tokens marked special in tokenizer.json (<｜User｜> & co. are not special).
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  int32_t bos_id() const;
  int32_t eos_id() const;
  // One past the largest token id (128815 for DeepSeek); the model's embedding table is
  // padded beyond that (129280 rows), those extra ids have no token.
  int32_t vocab_size() const;
  // Added tokens and vocabulary entries, in their tokenizer.json spelling ("Ġthe").
  std::optional<int32_t> token_to_id(std::string_view token) const;
  // The tokenizer.json spelling of a token; throws core::Error for an id without one.
  std::string id_to_token(int32_t id) const;
  bool is_special(int32_t id) const;
  // The raw bytes a token stands for (byte-level mapping undone); empty for ids
  // without a token. May end in the middle of a UTF-8 sequence.
  std::string_view token_bytes(int32_t id) const;

 private:
  struct Impl;
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// Turns a stream of token ids into text. Byte-level tokens can end inside a UTF-8
// sequence (an emoji or a rare CJK character spans several tokens), so bytes of an
// incomplete sequence are held back until it completes. Emitted text is always valid
// UTF-8, and the concatenation of all push() results and flush() equals
// Tokenizer::decode of the same ids.
class StreamingDetokenizer {
 public:
  explicit StreamingDetokenizer(Tokenizer tokenizer, bool skip_special = false)
      : tokenizer_(std::move(tokenizer)), skip_special_(skip_special) {}

  // Returns the text completed by this token (often empty mid-sequence).
  std::string push(int32_t id);
  // Returns what is held back, an incomplete sequence becoming U+FFFD, and resets.
  std::string flush();

 private:
  Tokenizer tokenizer_;
  bool skip_special_;
  std::string pending_;  // bytes of a UTF-8 sequence not yet complete
};

}  // namespace dsv4::serve
