// The CUDA backend's environment readers (ops/cuda/cuda_check.h), host code only: they run
// without a GPU. A value outside a switch's range must fail naming it, never stand in for
// another (an A/B run would measure something it did not ask for).
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "core/error.h"
#include "ops/cuda/cuda_check.h"

namespace dsv4::ops {
namespace {

// A switch the backend reads once (and caches): this process never reaches that reader.
constexpr const char* kName = "DSV4_CUDA_EXPERT_LAUNCHES";

std::string error_of(const char* value) {
  setenv(kName, value, 1);
  std::string out;
  try {
    env_integer(kName, 1, 1, 8);
  } catch (const core::Error& e) {
    out = e.what();
  }
  unsetenv(kName);
  return out;
}

TEST(CudaEnvSwitches, IntegerTakesItsRangeAndRejectsTheRest) {
  unsetenv(kName);
  EXPECT_EQ(env_integer(kName, 3, 1, 8), 3);  // unset: the fallback
  setenv(kName, "", 1);
  EXPECT_EQ(env_integer(kName, 3, 1, 8), 3);  // empty: unset
  setenv(kName, "8", 1);
  EXPECT_EQ(env_integer(kName, 3, 1, 8), 8);
  unsetenv(kName);
  for (const char* bad : {"9", "0", "-1", "2x", "two", " 2", "99999999999999999999999"}) {
    const std::string e = error_of(bad);
    EXPECT_NE(e.find(std::string(kName) + "='" + bad + "': expected an integer 1..8"), std::string::npos)
        << "value '" << bad << "': " << e;
  }
}

TEST(CudaEnvSwitches, FlagReadersTakeTheirValues) {
  setenv("DSV4_CUDA_TMA", "0", 1);
  EXPECT_TRUE(env_is("DSV4_CUDA_TMA", "0"));
  EXPECT_EQ(env_mode("DSV4_CUDA_TMA"), 0);
  setenv("DSV4_CUDA_TMA", "1", 1);
  EXPECT_EQ(env_mode("DSV4_CUDA_TMA"), 1);
  setenv("DSV4_CUDA_TMA", "off", 1);  // not a value it takes: the automatic choice (dsv4 warns at start-up)
  EXPECT_EQ(env_mode("DSV4_CUDA_TMA"), -1);
  unsetenv("DSV4_CUDA_TMA");
  EXPECT_EQ(env_mode("DSV4_CUDA_TMA"), -1);
}

}  // namespace
}  // namespace dsv4::ops
