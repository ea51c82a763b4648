// safetensors files: a memory-mapped reader and a streaming writer.
// Format: u64 little-endian header length, JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, data.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/dtype.h"
#include "core/mapped_file.h"
#include "core/tensor.h"

namespace dsv4::model {

struct SafetensorsEntry {
  std::string name;
  core::DType dtype = core::DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the data section
  uint64_t end = 0;

  uint64_t nbytes() const { return end - begin; }
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Maps and validates the header and every entry's extent; errors name the file
  // (and the tensor) and say what is wrong: truncated, corrupt header, bad dtype...
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return file_.path(); }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const SafetensorsEntry* find(const std::string& name) const;
  const uint8_t* data(const SafetensorsEntry& entry) const { return data_ + entry.begin; }
  core::Tensor tensor(const SafetensorsEntry& entry) const;  // a view into the mapping
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  core::MappedFile file_;
  const uint8_t* data_ = nullptr;
  std::vector<SafetensorsEntry> entries_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

struct TensorDecl {
  std::string name;
  core::DType dtype;
  std::vector<int64_t> shape;
};

// Writes a file whose layout is fixed up front, so tensors can be produced in any
// order and in pieces (the whole model is never held in memory).
class SafetensorsWriter {
 public:
  SafetensorsWriter(const std::string& path, const std::vector<TensorDecl>& tensors,
                    const std::map<std::string, std::string>& metadata = {{"format", "pt"}});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const SafetensorsEntry& entry(const std::string& name) const;
  // Writes `bytes` at byte `offset` inside tensor `name`.
  void write(const std::string& name, uint64_t offset, const void* bytes, uint64_t size);
  // Checks every byte of every tensor was written, then closes the file.
  void finish();
  uint64_t data_bytes() const { return data_bytes_; }

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t data_start_ = 0;
  uint64_t data_bytes_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::vector<uint64_t> written_;
  std::unordered_map<std::string, size_t> index_;
};

}  // namespace dsv4::model
