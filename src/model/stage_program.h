// A layer's forward as a short list of stages, each tagged compute or comm and
// declaring the buffers it reads and writes (DESIGN.md §4). Run in order they are
// the plain forward; two-batch overlap (src/tbo) interleaves two micro-batches'
// programs without touching model code, deriving stream events from the
// declared buffers.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace dsv4::model {

enum class StageKind { kCompute, kComm };

// A declared buffer: its name (for messages and lint) and its identity.
struct BufferRef {
  const char* name;
  const void* data;
};

struct Stage {
  std::string name;  // "L3.attn_core"
  StageKind kind = StageKind::kCompute;
  std::vector<BufferRef> reads;
  std::vector<BufferRef> writes;
  std::function<void()> run;
};

using StageProgram = std::vector<Stage>;

// Runs every stage in program order; `around`, if set, is called before (after =
// false) and after (after = true) each stage (debugging, benchmark breakdowns).
void run_in_order(const StageProgram& program,
                  const std::function<void(const Stage&, bool after)>& around = nullptr);

// For each stage, the earlier stages it must follow: those that write a buffer it
// reads or writes, or read a buffer it writes (by identity; null buffers are
// ignored). Ascending indices.
std::vector<std::vector<int>> stage_dependencies(const StageProgram& program);

}  // namespace dsv4::model
