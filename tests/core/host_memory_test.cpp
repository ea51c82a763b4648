#include <gtest/gtest.h>

#include "core/host_memory.h"

namespace dsv4::core {
namespace {

TEST(HostMemory, ParsesMemAvailableInKilobytes) {
  const char* meminfo =
      "MemTotal:       32768000 kB\n"
      "MemFree:         1000000 kB\n"
      "MemAvailable:   24137216 kB\n"
      "Buffers:          123456 kB\n";
  EXPECT_EQ(parse_mem_available(meminfo), std::optional<uint64_t>(24137216ull * 1024));
}

TEST(HostMemory, NoLineOrNoNumberIsUnknown) {
  EXPECT_EQ(parse_mem_available("MemTotal: 1000 kB\nMemFree: 10 kB\n"), std::nullopt);
  EXPECT_EQ(parse_mem_available("MemAvailable:   kB\n"), std::nullopt);
  EXPECT_EQ(parse_mem_available("MemAvailable: 12 MB\n"), std::nullopt);  // (a unit this parser does not know)
  EXPECT_EQ(parse_mem_available(""), std::nullopt);
  // A similar key is not the line.
  EXPECT_EQ(parse_mem_available("XMemAvailable: 5 kB\n"), std::nullopt);
}

TEST(HostMemory, LastLineWithoutNewline) {
  EXPECT_EQ(parse_mem_available("MemFree: 1 kB\nMemAvailable: 7 kB"), std::optional<uint64_t>(7 * 1024));
}

TEST(HostMemory, ThisHostReportsSomething) {
  // Linux CI and the devices have /proc/meminfo; elsewhere the check is skipped, not failed.
  const auto available = host_memory_available();
  if (!available) GTEST_SKIP() << "no readable MemAvailable in /proc/meminfo on this host";
  EXPECT_GT(*available, 0u);
}

}  // namespace
}  // namespace dsv4::core
