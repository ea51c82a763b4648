// graph_trace: an LD_PRELOAD library that records every kernel a program runs, inside
// CUDA graph replays too, through CUPTI's activity API, and writes one line a kernel
// to the file named by DSV4_GRAPH_TRACE (tab-separated: graph id, correlation id of
// the launch, graph node id, stream id, start ns, end ns, blocks, threads a block,
// demangled name). Nsight Systems does not run on the lent machines (KINDS.md), and
// ncu times kernels one at a time, outside the graph; this sees the graph step as it
// runs, lanes and dependent launches included. scripts/graph_trace_summary.py reads
// the file. Built on the GPU machine against the CUPTI it has (gpu_suite.sh, step
// `trace`); the kernel record type comes in as GRAPH_TRACE_KERNEL_RECORD, the newest
// CUpti_ActivityKernelN of those headers.
#include <cupti.h>
#include <cxxabi.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#ifndef GRAPH_TRACE_KERNEL_RECORD
#error "define GRAPH_TRACE_KERNEL_RECORD as the newest CUpti_ActivityKernelN of cupti_activity.h"
#endif

namespace {

constexpr size_t kBufferBytes = size_t(16) << 20;

std::mutex g_mutex;
FILE* g_out = nullptr;
std::atomic<uint64_t> g_kernels{0}, g_dropped{0};

void fail(const char* what, CUptiResult r) {
  const char* msg = nullptr;
  cuptiGetResultString(r, &msg);
  std::fprintf(stderr, "graph_trace: %s failed: %s\n", what, msg != nullptr ? msg : "(unknown CUPTI error)");
  std::exit(3);
}
#define GRAPH_TRACE_CHECK(call)                  \
  do {                                           \
    const CUptiResult r_ = (call);               \
    if (r_ != CUPTI_SUCCESS) fail(#call, r_);    \
  } while (0)

std::string demangled(const char* name) {
  if (name == nullptr) return "(no name)";
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string s = status == 0 && d != nullptr ? d : name;
  std::free(d);
  for (char& c : s)
    if (c == '\t' || c == '\n') c = ' ';
  return s;
}

void finish();

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  // The flush must run before the CUDA runtime's own exit handler, which the program's
  // first CUDA call registered: exit handlers run last-registered first, and the first
  // buffer is asked for after that call.
  static std::once_flag registered;
  std::call_once(registered, [] { std::atexit(finish); });
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(g_mutex);
  CUpti_Activity* rec = nullptr;
  // (g_out is closed once finish() ran: a buffer CUPTI returns later, at the context's
  // teardown, is dropped.)
  while (g_out != nullptr && cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
    const auto* k = reinterpret_cast<const GRAPH_TRACE_KERNEL_RECORD*>(rec);
    std::fprintf(g_out, "%u\t%u\t%llu\t%u\t%llu\t%llu\t%lld\t%d\t%s\n", unsigned(k->graphId),
                 unsigned(k->correlationId), static_cast<unsigned long long>(k->graphNodeId), unsigned(k->streamId),
                 static_cast<unsigned long long>(k->start), static_cast<unsigned long long>(k->end),
                 static_cast<long long>(k->gridX) * k->gridY * k->gridZ, k->blockX * k->blockY * k->blockZ,
                 demangled(k->name).c_str());
    g_kernels.fetch_add(1, std::memory_order_relaxed);
  }
  size_t dropped = 0;
  if (cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped) == CUPTI_SUCCESS)
    g_dropped.fetch_add(dropped, std::memory_order_relaxed);
  std::free(buffer);
}

void finish() {
  if (g_out == nullptr) return;
  // An exit handler must not exit: a failed flush is reported and the file kept as it is.
  if (const CUptiResult r = cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED); r != CUPTI_SUCCESS) {
    const char* msg = nullptr;
    cuptiGetResultString(r, &msg);
    std::fprintf(stderr, "graph_trace: the last records were not flushed: %s\n", msg != nullptr ? msg : "?");
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  std::fclose(g_out);
  g_out = nullptr;
  std::fprintf(stderr, "graph_trace: %llu kernels written, %llu records dropped\n",
               static_cast<unsigned long long>(g_kernels.load()), static_cast<unsigned long long>(g_dropped.load()));
}

__attribute__((constructor)) void start() {
  const char* path = std::getenv("DSV4_GRAPH_TRACE");
  if (path == nullptr || *path == '\0') return;  // preloaded but not asked: record nothing
  g_out = std::fopen(path, "w");
  if (g_out == nullptr) {
    std::fprintf(stderr, "graph_trace: cannot write %s: %s\n", path, std::strerror(errno));
    std::exit(3);
  }
  std::fprintf(g_out, "graph\tcorrelation\tnode\tstream\tstart_ns\tend_ns\tblocks\tthreads\tname\n");
  GRAPH_TRACE_CHECK(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed));
  GRAPH_TRACE_CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL));
  std::atexit(finish);  // (a program that never runs a kernel; finish() runs once)
}

}  // namespace
