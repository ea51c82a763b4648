#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "core/error.h"
#include "core/npy.h"

namespace dsv4::core {
namespace {

std::string tmp_path(const char* name) {
  const char* dir = std::getenv("DSV4_TEST_TMP");
  return std::string(dir ? dir : "/tmp") + "/" + name;
}

TEST(Npy, WriteThenReadRoundTrips) {
  const std::string path = tmp_path("npy_round_trip.npy");
  std::vector<float> values(2 * 3 * 5);
  for (size_t i = 0; i < values.size(); ++i) values[i] = float(i) * 0.5f - 3.0f;
  NpyWriter w(path, {2, 3, 5});
  w.append(values.data(), 10);
  w.append(values.data() + 10, 20);
  w.close();
  NpyArray a = read_npy_f32(path);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3, 5}));
  EXPECT_EQ(a.data, values);
}

TEST(Npy, HeaderIsPaddedTo64Bytes) {
  const std::string path = tmp_path("npy_header.npy");
  NpyWriter w(path, {7});
  float v[7] = {};
  w.append(v, 7);
  w.close();
  FILE* f = std::fopen(path.c_str(), "rb");
  ASSERT_NE(f, nullptr);
  std::fseek(f, 0, SEEK_END);
  const long header = std::ftell(f) - 7 * 4;
  EXPECT_EQ(header % 64, 0) << header;
  std::fclose(f);
}

TEST(Npy, ClosingEarlyIsAnError) {
  NpyWriter w(tmp_path("npy_short.npy"), {4});
  float v[2] = {};
  w.append(v, 2);
  EXPECT_THROW(w.close(), Error);
}

}  // namespace
}  // namespace dsv4::core
