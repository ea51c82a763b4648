#include "core/npy.h"

#include <cstring>

#include "core/error.h"

namespace dsv4::core {

NpyWriter::NpyWriter(const std::string& path, const std::vector<int64_t>& shape) : path_(path) {
  std::string dims;
  expected_ = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    dims += std::to_string(shape[i]);
    dims += (shape.size() == 1 || i + 1 < shape.size()) ? "," : "";
    if (i + 1 < shape.size()) dims += " ";
    expected_ *= uint64_t(shape[i]);
  }
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  // Magic (6) + version (2) + header length (2) + header, padded with spaces to a
  // multiple of 64 and terminated by a newline.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  file_ = std::fopen(path.c_str(), "wb");
  if (file_ == nullptr) fail("cannot open {} for writing: {}", path, std::strerror(errno));
  const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  uint16_t len = uint16_t(header.size());
  if (std::fwrite(magic, 1, 8, file_) != 8 || std::fwrite(&len, 2, 1, file_) != 1 ||
      std::fwrite(header.data(), 1, header.size(), file_) != header.size())
    fail("write error on {}", path);
}

NpyWriter::~NpyWriter() {
  if (file_ != nullptr) std::fclose(file_);
}

void NpyWriter::append(const float* values, size_t count) {
  DSV4_CHECK(written_ + count <= expected_, "{}: writing {} values past the declared {}", path_,
             written_ + count, expected_);
  if (count > 0 && std::fwrite(values, sizeof(float), count, file_) != count)
    fail("write error on {}: {}", path_, std::strerror(errno));
  written_ += count;
}

void NpyWriter::close() {
  DSV4_CHECK(written_ == expected_, "{}: wrote {} of {} values", path_, written_, expected_);
  if (std::fclose(file_) != 0) fail("cannot close {}: {}", path_, std::strerror(errno));
  file_ = nullptr;
}

NpyArray read_npy_f32(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) fail("cannot open {}: {}", path, std::strerror(errno));
  char magic[8];
  uint16_t len = 0;
  if (std::fread(magic, 1, 8, f) != 8 || std::memcmp(magic, "\x93NUMPY", 6) != 0 ||
      std::fread(&len, 2, 1, f) != 1) {
    std::fclose(f);
    fail("{} is not a .npy file", path);
  }
  std::string header(len, '\0');
  if (std::fread(header.data(), 1, len, f) != len) {
    std::fclose(f);
    fail("{}: truncated header", path);
  }
  if (header.find("'<f4'") == std::string::npos || header.find("False") == std::string::npos) {
    std::fclose(f);
    fail("{}: only little-endian float32 C-order arrays are supported", path);
  }
  NpyArray out;
  size_t open = header.find('('), close = header.find(')');
  std::string dims = header.substr(open + 1, close - open - 1);
  size_t pos = 0;
  int64_t count = 1;
  while (pos < dims.size()) {
    size_t comma = dims.find(',', pos);
    std::string item = dims.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (item.find_first_not_of(' ') != std::string::npos) {
      out.shape.push_back(std::stoll(item));
      count *= out.shape.back();
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  out.data.resize(size_t(count));
  size_t got = std::fread(out.data.data(), sizeof(float), out.data.size(), f);
  std::fclose(f);
  if (got != out.data.size()) fail("{}: expected {} values, found {}", path, out.data.size(), got);
  return out;
}

}  // namespace dsv4::core
