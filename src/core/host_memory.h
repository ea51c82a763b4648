// The host memory a process can still take, for checks made before large
// allocations (synthetic weights drawn in host memory), so that a model that does
// not fit fails at once with the numbers instead of being killed hours in.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace dsv4::core {

// MemAvailable of /proc/meminfo in bytes (the kernel's estimate of what can be
// allocated without swapping), or nothing where it cannot be read.
std::optional<uint64_t> host_memory_available();

// The MemAvailable line of a /proc/meminfo text ("MemAvailable:   123 kB"), in bytes.
std::optional<uint64_t> parse_mem_available(std::string_view meminfo);

}  // namespace dsv4::core
