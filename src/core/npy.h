// NumPy .npy files (format 1.0, little-endian float32, C order): a streaming
// writer for logits dumps and a reader for tests.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace dsv4::core {

class NpyWriter {
 public:
  // Writes the header for a float32 array of `shape`; rows are appended in C order.
  NpyWriter(const std::string& path, const std::vector<int64_t>& shape);
  ~NpyWriter();
  NpyWriter(const NpyWriter&) = delete;
  NpyWriter& operator=(const NpyWriter&) = delete;

  void append(const float* values, size_t count);
  // Checks that exactly the promised number of elements was written, then closes.
  void close();

 private:
  std::string path_;
  FILE* file_ = nullptr;
  uint64_t expected_ = 0;
  uint64_t written_ = 0;
};

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

NpyArray read_npy_f32(const std::string& path);

}  // namespace dsv4::core
