#include "model/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace dsv4::model {

using core::fail;
using nlohmann::json;

int64_t SafetensorsEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(path) {
  const size_t size = file_.size();
  if (size < 8) fail("{}: truncated safetensors file ({} bytes, the header length alone needs 8)", path, size);
  uint64_t header_len = 0;
  std::memcpy(&header_len, file_.data(), 8);
  if (header_len > size - 8)
    fail("{}: truncated or corrupt safetensors file: header claims {} bytes but the file has {} after the length",
         path, header_len, size - 8);
  json header;
  try {
    header = json::parse(file_.data() + 8, file_.data() + 8 + header_len);
  } catch (const json::exception& e) {
    fail("{}: corrupt safetensors header (not valid JSON): {}", path, e.what());
  }
  if (!header.is_object()) fail("{}: corrupt safetensors header (not a JSON object)", path);
  data_ = file_.data() + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it->is_object())
        for (auto m = it->begin(); m != it->end(); ++m)
          if (m->is_string()) metadata_[m.key()] = m->get<std::string>();
      continue;
    }
    const json& v = it.value();
    SafetensorsEntry e;
    e.name = it.key();
    try {
      std::string dtype = v.at("dtype").get<std::string>();
      if (!core::dtype_from_name(dtype, &e.dtype))
        fail("{}: tensor {} has unsupported dtype {}", path, e.name, dtype);
      e.shape = v.at("shape").get<std::vector<int64_t>>();
      auto offsets = v.at("data_offsets").get<std::vector<uint64_t>>();
      if (offsets.size() != 2) fail("{}: tensor {} has malformed data_offsets", path, e.name);
      e.begin = offsets[0];
      e.end = offsets[1];
    } catch (const json::exception& ex) {
      fail("{}: corrupt header entry for tensor {}: {}", path, e.name, ex.what());
    }
    for (int64_t d : e.shape)
      if (d < 0) fail("{}: tensor {} has a negative dimension", path, e.name);
    if (e.end < e.begin) fail("{}: tensor {} has data_offsets [{}, {}] (end before begin)", path, e.name, e.begin, e.end);
    uint64_t expected = uint64_t(e.numel()) * core::dtype_size(e.dtype);
    if (e.nbytes() != expected)
      fail("{}: tensor {} occupies {} bytes but shape {} of {} needs {}", path, e.name, e.nbytes(),
           core::shape_string(e.shape.data(), int(e.shape.size())), core::dtype_name(e.dtype), expected);
    if (e.end > data_size)
      fail("{}: truncated file: tensor {} ends at byte {} of the data section, which has only {} bytes", path, e.name,
           e.end, data_size);
    index_[e.name] = entries_.size();
    entries_.push_back(std::move(e));
  }
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

core::Tensor SafetensorsFile::tensor(const SafetensorsEntry& e) const {
  return core::Tensor(const_cast<uint8_t*>(data(e)), e.dtype, e.shape.data(), int(e.shape.size()));
}

SafetensorsWriter::SafetensorsWriter(const std::string& path, const std::vector<TensorDecl>& tensors,
                                     const std::map<std::string, std::string>& metadata)
    : path_(path) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    SafetensorsEntry e;
    e.name = t.name;
    e.dtype = t.dtype;
    e.shape = t.shape;
    e.begin = offset;
    e.end = offset + uint64_t(e.numel()) * core::dtype_size(t.dtype);
    offset = e.end;
    if (index_.count(e.name)) fail("{}: tensor {} declared twice", path, e.name);
    header[e.name] = {{"dtype", std::string(core::dtype_name(e.dtype))},
                      {"shape", e.shape},
                      {"data_offsets", {e.begin, e.end}}};
    index_[e.name] = entries_.size();
    entries_.push_back(std::move(e));
  }
  data_bytes_ = offset;
  written_.assign(entries_.size(), 0);
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data section 8-byte aligned
  uint64_t len = text.size();
  data_start_ = 8 + len;
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail("cannot create {}: {}", path, std::strerror(errno));
  if (::ftruncate(fd_, off_t(data_start_ + data_bytes_)) != 0)
    fail("cannot size {} to {} bytes: {}", path, data_start_ + data_bytes_, std::strerror(errno));
  if (::pwrite(fd_, &len, 8, 0) != 8 || ::pwrite(fd_, text.data(), text.size(), 8) != ssize_t(text.size()))
    fail("write error on {}: {}", path, std::strerror(errno));
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) ::close(fd_);
}

const SafetensorsEntry& SafetensorsWriter::entry(const std::string& name) const {
  auto it = index_.find(name);
  DSV4_CHECK(it != index_.end(), "{}: tensor {} was not declared", path_, name);
  return entries_[it->second];
}

void SafetensorsWriter::write(const std::string& name, uint64_t offset, const void* bytes, uint64_t size) {
  auto it = index_.find(name);
  DSV4_CHECK(it != index_.end(), "{}: tensor {} was not declared", path_, name);
  const SafetensorsEntry& e = entries_[it->second];
  DSV4_CHECK(offset + size <= e.nbytes(), "{}: write of [{}, {}) past the end of tensor {} ({} bytes)", path_, offset,
             offset + size, name, e.nbytes());
  const char* p = static_cast<const char*>(bytes);
  uint64_t pos = data_start_ + e.begin + offset, left = size;
  while (left > 0) {
    ssize_t n = ::pwrite(fd_, p, left, off_t(pos));
    if (n <= 0) fail("write error on {} (tensor {}): {}", path_, name, std::strerror(errno));
    p += n;
    pos += uint64_t(n);
    left -= uint64_t(n);
  }
  written_[it->second] += size;
}

void SafetensorsWriter::finish() {
  for (size_t i = 0; i < entries_.size(); ++i)
    DSV4_CHECK(written_[i] == entries_[i].nbytes(), "{}: tensor {} got {} of {} bytes", path_, entries_[i].name,
               written_[i], entries_[i].nbytes());
  if (::close(fd_) != 0) fail("cannot close {}: {}", path_, std::strerror(errno));
  fd_ = -1;
}

}  // namespace dsv4::model
