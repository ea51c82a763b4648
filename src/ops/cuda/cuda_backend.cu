// CUDA backend: device memory, streams, caches, graph capture, scratch.
#include "ops/cuda/cuda_backend.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cxxabi.h>
#include <map>
#include <string>
#include <vector>

#include "ops/cuda/cuda_check.h"
#include "ops/cuda/cuda_test_hooks.h"
#include "ops/cuda/fp4_device_layout.h"
#include "ops/cuda/fp8_bf16_layout.h"
#include "ops/cuda/graph_chain.h"
#include "ops/kv_format.h"

namespace dsv4::ops {

using core::DType;
using core::Tensor;

struct CudaBackend::Scratch {
  struct Buffer {
    Tensor tensor;
    uint64_t captures_before = 0;  // captures begun before this buffer was allocated
  };
  std::map<std::string, Buffer> buffers;
  uint64_t captures = 0;  // captures begun on this backend
  // Buffers a larger one replaced after a capture: a graph may still point at them (its
  // kernels' arguments hold the address), so they live as long as the backend.
  std::vector<Tensor> kept_for_graphs;
};

bool cuda_device_available(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    if (why)
      *why = e == cudaErrorInsufficientDriver
                 ? fmt::format("no NVIDIA driver, or one older than this build's CUDA runtime needs ({})",
                               cudaGetErrorString(e))
             : e != cudaSuccess && e != cudaErrorNoDevice ? std::string(cudaGetErrorString(e))
                                                          : std::string("no CUDA device");
    cudaGetLastError();
    return false;
  }
  return true;
}

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

CudaBackend::CudaBackend(int device) : device_(device), scratch_(std::make_unique<Scratch>()) {
  num_lanes();  // a bad DSV4_CUDA_LANES fails here, at start-up, not at the first step
  std::string why;
  if (!cuda_device_available(&why))
    core::fail("CUDA backend: no usable GPU: {}; it needs an NVIDIA Hopper GPU (sm_90) and its driver", why);
  DSV4_CUDA_CHECK(cudaSetDevice(device));
  DSV4_CUDA_CHECK(cudaGetDeviceProperties(&props_, device));
  if (props_.major != 9)
    core::fail("CUDA backend: device {} ({}) has compute capability {}.{}; this build targets Hopper (sm_90a)", device,
               props_.name, props_.major, props_.minor);
  DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&own_stream_, cudaStreamNonBlocking));
  stream_ = own_stream_;
  DSV4_CUBLAS_CHECK(cublasLtCreate(&cublaslt_));
  workspace_ = empty_bytes(64ull << 20);
}

CudaBackend::~CudaBackend() {
  if (own_stream_) cudaStreamSynchronize(own_stream_);
  for (auto& [main, side] : side_streams_) {
    cudaStreamSynchronize(side);
    cudaStreamDestroy(side);
  }
  for (cudaEvent_t e : marks_) cudaEventDestroy(e);
  scratch_.reset();
  workspace_ = Tensor();
  if (cublaslt_) cublasLtDestroy(cublaslt_);
  if (own_stream_) cudaStreamDestroy(own_stream_);
}

std::optional<uint64_t> CudaBackend::memory_available() const {
  size_t free_b = 0, total_b = 0;
  if (cudaSetDevice(device_) != cudaSuccess || cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
    cudaGetLastError();
    return std::nullopt;
  }
  return uint64_t(free_b);
}

Tensor CudaBackend::empty_bytes(size_t bytes) { return empty(DType::kU8, {int64_t(bytes)}); }

Tensor CudaBackend::empty(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t(nullptr, dtype, shape, core::Device::kCuda);
  void* p = nullptr;
  const size_t bytes = std::max<size_t>(t.nbytes(), 256);
  DSV4_CUDA_CHECK(cudaSetDevice(device_));
  cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    core::fail("out of GPU memory on device {}: allocating {:.3f} GB for a tensor of shape {} ({:.3f} GB free of {:.3f})",
               device_, double(bytes) / 1e9, t.shape_string(), double(free_b) / 1e9, double(total_b) / 1e9);
  }
  const int dev = device_;
  std::shared_ptr<void> owner(p, [dev](void* q) {
    cudaSetDevice(dev);
    cudaFree(q);
  });
  return Tensor(p, dtype, t.shape(), t.ndim(), core::Device::kCuda, owner);
}

namespace {

// Packed FP4 tensors and their row scales live in fp4_device_layout.h's order on the
// GPU: checked and converted here, where they cross between host and device. The
// order depends on the matrix shape (the last dimension is a row's bytes, the one
// before it the rows; a 1-D tensor is one row), so they cross whole, in their final
// shape.
struct StoredMatrices {  // a stored tensor as matrices (FP4 weights and scales; the grouped linear's FP8 weights)
  int64_t rows = 1, row_bytes = 0;
};
StoredMatrices fp4_matrices(const Tensor& t, size_t bytes, bool scales, const char* what) {
  StoredMatrices m;
  if (t.ndim() >= 1) m.row_bytes = t.size(t.ndim() - 1);
  if (t.ndim() >= 2) m.rows = t.size(t.ndim() - 2);
  const char* kind = scales ? "FP4 row-scale (UE8M0)" : "packed FP4 (I8)";
  DSV4_CHECK(bytes == t.nbytes(),
             "{} of {} bytes of a {} tensor {} of {} bytes: the CUDA backend stores FP4 matrices in its own order "
             "(ops/cuda/fp4_device_layout.h), so they cross whole",
             what, bytes, kind, t.shape_string(), t.nbytes());
  DSV4_CHECK(!scales || t.dtype() == DType::kF8E8M0, "{} of FP4 row scales into a {} tensor {} (UE8M0 expected)", what,
             core::dtype_name(t.dtype()), t.shape_string());
  const int64_t row_unit = scales ? 4 : fp4_layout::kBlockBytes;  // bytes of one 128-element stage of a row
  DSV4_CHECK(m.row_bytes % row_unit == 0 && reinterpret_cast<uintptr_t>(t.data()) % 16 == 0,
             "{} of {} bytes of a {} tensor {}: the CUDA backend stores FP4 rows in {}-byte blocks "
             "(K a multiple of 128, rows 16-byte aligned)",
             what, bytes, kind, t.shape_string(), row_unit);
  return m;
}

// One thread per 64-byte block of `in` (checkpoint order), written to its place in out.
__global__ void fp4_to_device_layout_kernel(const uint4* __restrict__ in, uint8_t* __restrict__ out, int64_t blocks,
                                            int64_t rows, int64_t stages) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= blocks) return;
  const int64_t per_matrix = rows * stages, m = b / per_matrix, n = (b % per_matrix) / stages, s = b % stages;
  uint32_t src[16], dst[16];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 v = in[4 * b + i];
    src[4 * i] = v.x, src[4 * i + 1] = v.y, src[4 * i + 2] = v.z, src[4 * i + 3] = v.w;
  }
  fp4_layout::block_to_device(src, dst, n);
  uint4* o = reinterpret_cast<uint4*>(out + m * per_matrix * fp4_layout::kBlockBytes +
                                      fp4_layout::block_offset(n, s, rows, stages));
#pragma unroll
  for (int i = 0; i < 4; ++i) o[i] = make_uint4(dst[4 * i], dst[4 * i + 1], dst[4 * i + 2], dst[4 * i + 3]);
}

// One thread per 4-byte stage word of the scales `in` (checkpoint order), to its place in out.
__global__ void fp4_scales_to_device_layout_kernel(const uint32_t* __restrict__ in, uint8_t* __restrict__ out,
                                                   int64_t words, int64_t rows, int64_t stages) {
  const int64_t w = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (w >= words) return;
  const int64_t per_matrix = rows * stages, m = w / per_matrix, n = (w % per_matrix) / stages, s = w % stages;
  *reinterpret_cast<uint32_t*>(out + m * per_matrix * 4 + fp4_layout::scale_offset(n, s, rows, stages)) = in[w];
}

// grouped_linear's e4m3 weights (TensorRole::kGroupedFp8Weight) live in
// fp8_bf16_layout.h's order where their rows are whole 64-byte blocks; like FP4
// matrices they cross whole, in their final shape. Returns whether the order applies.
bool grouped_fp8_matrices(const Tensor& t, size_t bytes, const char* what, StoredMatrices* m) {
  DSV4_CHECK(t.dtype() == DType::kF8E4M3 && t.ndim() == 2,
             "{} of a grouped linear's FP8 weight into a {} tensor {} (F8_E4M3 [N, K] expected)", what,
             core::dtype_name(t.dtype()), t.shape_string());
  DSV4_CHECK(bytes == t.nbytes(),
             "{} of {} bytes of a grouped linear's FP8 weight {} of {} bytes: the CUDA backend stores it in its "
             "own order (ops/cuda/fp8_bf16_layout.h), so it crosses whole",
             what, bytes, t.shape_string(), t.nbytes());
  m->rows = t.size(0);
  m->row_bytes = t.size(1);
  return fp8_bf16_layout::applies(m->row_bytes) && m->rows > 0;
}

// One thread per 64-byte block of `in` (checkpoint order), written to its place in out.
__global__ void fp8_bf16_to_device_layout_kernel(const uint4* __restrict__ in, uint8_t* __restrict__ out,
                                                 int64_t blocks, int64_t rows, int64_t stages) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= blocks) return;
  const int64_t n = b / stages, s = b % stages;
  uint4 src[4], dst[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) src[i] = in[4 * b + i];
  fp8_bf16_layout::block_to_device(reinterpret_cast<const uint8_t*>(src), reinterpret_cast<uint8_t*>(dst));
  uint4* o = reinterpret_cast<uint4*>(out + fp4_layout::block_offset(n, s, rows, stages));
#pragma unroll
  for (int i = 0; i < 4; ++i) o[i] = dst[i];
}

}  // namespace

void CudaBackend::upload(const Tensor& dst, const void* host, size_t bytes, TensorRole role) {
  DSV4_CHECK(bytes <= dst.nbytes(), "upload of {} bytes into a tensor of {}", bytes, dst.nbytes());
  const bool scales = role == TensorRole::kFp4Scales, fp4 = scales || dst.dtype() == DType::kI8;
  StoredMatrices shape;
  if (fp4) shape = fp4_matrices(dst, bytes, scales, "upload");
  const bool reorder = role == TensorRole::kGroupedFp8Weight && grouped_fp8_matrices(dst, bytes, "upload", &shape);
  if (bytes == 0) return;
  // Pageable host memory: the copy is staged before the call returns, so the
  // caller may reuse its buffer at once.
  if (!fp4 && !reorder) {
    DSV4_CUDA_CHECK(cudaMemcpyAsync(dst.data(), host, bytes, cudaMemcpyHostToDevice, stream_));
    return;
  }
  // Stored in the backend's order: checkpoint bytes into a stream-ordered scratch
  // buffer, placed from there.
  void* scratch = nullptr;
  DSV4_CUDA_CHECK(cudaMallocAsync(&scratch, bytes, stream_));
  DSV4_CUDA_CHECK(cudaMemcpyAsync(scratch, host, bytes, cudaMemcpyHostToDevice, stream_));
  if (scales) {
    const int64_t words = int64_t(bytes / 4);
    fp4_scales_to_device_layout_kernel<<<unsigned((words + 255) / 256), 256, 0, stream_>>>(
        static_cast<const uint32_t*>(scratch), static_cast<uint8_t*>(dst.data()), words, shape.rows,
        shape.row_bytes / 4);
  } else {
    // (FP4's blocks and the grouped FP8 order's are both 64 bytes: fp8_bf16_layout.h)
    const int64_t blocks = int64_t(bytes / fp4_layout::kBlockBytes);
    const auto kernel = fp4 ? fp4_to_device_layout_kernel : fp8_bf16_to_device_layout_kernel;
    kernel<<<unsigned((blocks + 255) / 256), 256, 0, stream_>>>(static_cast<const uint4*>(scratch),
                                                                 static_cast<uint8_t*>(dst.data()), blocks, shape.rows,
                                                                 shape.row_bytes / fp4_layout::kBlockBytes);
  }
  DSV4_CUDA_CHECK(cudaGetLastError());
  DSV4_CUDA_CHECK(cudaFreeAsync(scratch, stream_));
}

std::shared_ptr<void> CudaBackend::host_buffer(size_t bytes) {
  void* p = nullptr;
  DSV4_CUDA_CHECK(cudaSetDevice(device_));
  if (cudaHostAlloc(&p, std::max<size_t>(bytes, 1), cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();  // (a limit on locked memory: plain memory still works, slower)
    return Backend::host_buffer(bytes);
  }
  return std::shared_ptr<void>(p, [](void* q) { cudaFreeHost(q); });
}

void CudaBackend::download(void* host, const Tensor& src, size_t bytes, TensorRole role) {
  DSV4_CHECK(bytes <= src.nbytes(), "download of {} bytes from a tensor of {}", bytes, src.nbytes());
  const bool scales = role == TensorRole::kFp4Scales, fp4 = scales || src.dtype() == DType::kI8;
  StoredMatrices shape;
  if (fp4) shape = fp4_matrices(src, bytes, scales, "download");
  const bool reorder = role == TensorRole::kGroupedFp8Weight && grouped_fp8_matrices(src, bytes, "download", &shape);
  if (bytes == 0) return;
  std::vector<uint8_t> stored(fp4 || reorder ? bytes : 0);
  DSV4_CUDA_CHECK(cudaMemcpyAsync(fp4 || reorder ? stored.data() : host, src.data(), bytes, cudaMemcpyDeviceToHost,
                                  stream_));
  DSV4_CUDA_CHECK(cudaStreamSynchronize(stream_));
  uint8_t* out = static_cast<uint8_t*>(host);
  if (scales) fp4_layout::scales_to_checkpoint(stored.data(), out, bytes, shape.rows, shape.row_bytes);
  else if (fp4) fp4_layout::matrices_to_checkpoint(stored.data(), out, bytes, shape.rows, shape.row_bytes);
  else if (reorder) fp8_bf16_layout::matrices_to_checkpoint(stored.data(), out, bytes, shape.rows, shape.row_bytes);
}

void CudaBackend::fill_zero(const Tensor& t) {
  if (t.nbytes()) DSV4_CUDA_CHECK(cudaMemsetAsync(t.data(), 0, t.nbytes(), stream_));
}

void CudaBackend::synchronize() { DSV4_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

LayerCache CudaBackend::allocate_cache(const CacheGeometry& g, int64_t ratio) {
  (void)fp8_cache_cost(g, ratio);  // (fails on a rope_dim the record layout does not take)
  LayerCache c;
  c.ratio = ratio;
  const int64_t row = kv_row_bytes(g.head_dim, g.rope_dim);
  c.window = empty(DType::kU8, {g.num_slots, g.window, row});
  fill_zero(c.window);
  if (ratio > 0) {
    const int64_t coff = ratio == 4 ? 2 : 1;
    c.rows = empty(DType::kU8, {g.num_pages, kPageTokens / ratio, row});
    c.kv_state = empty(DType::kF32, {g.num_slots, coff * ratio, coff * g.head_dim});
    c.score_state = empty(DType::kF32, {g.num_slots, coff * ratio, coff * g.head_dim});
    fill_zero(c.rows);
    fill_zero(c.kv_state);
    fill_zero(c.score_state);
  }
  if (ratio == 4) {
    c.index_rows = empty(DType::kU8, {g.num_pages, kPageTokens / 4, index_row_bytes(g.index_head_dim)});
    c.index_kv_state = empty(DType::kF32, {g.num_slots, 8, 2 * g.index_head_dim});
    c.index_score_state = empty(DType::kF32, {g.num_slots, 8, 2 * g.index_head_dim});
    fill_zero(c.index_rows);
    fill_zero(c.index_kv_state);
    fill_zero(c.index_score_state);
  }
  return c;
}

Backend::CacheCost CudaBackend::cache_cost(const CacheGeometry& g, int64_t ratio) const {
  return fp8_cache_cost(g, ratio);
}

namespace {
class CudaGraph final : public Graph {
 public:
  CudaGraph(cudaGraphExec_t exec, cudaStream_t stream) : exec_(exec), stream_(stream) {}
  ~CudaGraph() override { cudaGraphExecDestroy(exec_); }
  void replay() override { DSV4_CUDA_CHECK(cudaGraphLaunch(exec_, stream_)); }

 private:
  cudaGraphExec_t exec_;
  cudaStream_t stream_;
};
}  // namespace

namespace {
// DSV4_CUDA_PDL=0 keeps captured graphs' plain edges (read once).
bool programmatic_launch_enabled() {
  static const bool on = !env_is("DSV4_CUDA_PDL", "0");
  return on;
}

// The mangled name of a kernel node's function, or null where the runtime cannot name it.
const char* kernel_node_name(cudaGraphNode_t node) {
  cudaKernelNodeParams params{};
  DSV4_CUDA_CHECK(cudaGraphKernelNodeGetParams(node, &params));
  const char* name = nullptr;
  if (cudaFuncGetName(&name, params.func) != cudaSuccess || name == nullptr) {
    cudaGetLastError();  // clear the error it left
    return nullptr;
  }
  return name;
}

bool is_ops_kernel(cudaGraphNode_t node) {
  cudaGraphNodeType type{};
  DSV4_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
  if (type != cudaGraphNodeTypeKernel) return false;
  const char* name = kernel_node_name(node);
  return name != nullptr && std::strncmp(name, "_ZN4dsv4", 8) == 0;  // namespace dsv4
}

// A captured graph's edges and the number of edges into and out of each node.
struct GraphEdges {
  std::vector<cudaGraphNode_t> from, to;
  std::vector<cudaGraphEdgeData> data;
  std::map<cudaGraphNode_t, int> out_degree, in_degree;
};

GraphEdges graph_edges(cudaGraph_t graph) {
  size_t n = 0;
  DSV4_CUDA_CHECK(cudaGraphGetEdges(graph, nullptr, nullptr, nullptr, &n));
  GraphEdges e;
  e.from.resize(n);
  e.to.resize(n);
  e.data.resize(n);
  DSV4_CUDA_CHECK(cudaGraphGetEdges(graph, e.from.data(), e.to.data(), e.data.data(), &n));
  for (size_t i = 0; i < n; ++i) {
    ++e.out_degree[e.from[i]];
    ++e.in_degree[e.to[i]];
  }
  return e;
}

int count_joins(const GraphEdges& e) {
  int joins = 0;
  for (const auto& [node, d] : e.in_degree) joins += d >= 2 ? 1 : 0;
  return joins;
}

// Programmatic dependent launch for a captured graph: each edge between two of our
// kernels (every one calls wait_for_predecessor(), grid_dependency.cuh) becomes a
// programmatic edge, so the downstream kernel is launched once every block of the
// upstream one has exited or called allow_dependents_to_launch() (the GEMMs, after
// their main loop) instead of after the whole grid has finished and flushed. Edges
// to or from other kernels (CUB; NCCL, whose collectives were not run this way on
// two GPUs) and memset or copy nodes stay plain. The edge from
// the upstream kernel's launch completion (its blocks have all started) was measured
// first and was slower (bench-1g batch 1: 2.94 ms against 2.49 ms without PDL):
// every waiting kernel counts as started, so whole chains of small kernels became
// resident at once, waiting, and held the SMs' resources.
// Where lanes fork or join (engine/stage_lanes.h): DSV4_CUDA_PDL_LANES (read once)
// says which of those edges are converted too: `join` the edges into a join whose every
// way in is from one of our kernels, `fork` the edges out of a fork, `all` both, `0`
// neither (only an edge that is its upstream node's one way out and its downstream
// node's one way in), `chain` the joins and of each fork's edges the one toward the child
// heading the longest chain (graph_chain.h), so that the critical chain's kernel launches
// under the fork's tail and the side lanes' do not take SM slots early. Unset: `chain` in
// captures of up to DSV4_CUDA_PDL_CHAIN_ROWS rows (default 2; CaptureInfo::rows), `join`
// in the others. Measured (bench-1g, H200, 3 rounds; docs/BENCHMARKS.md, thirty-seventh
// session): join -0.5 / -0.1 / -0.1 / -0.1% a step at 1 / 16 / 64 / 256 rows; fork -0.2 /
// -0.3 / -0.1 / +0.2%; all -0.3 / -0.4 / -0.1 / +0.3%. Against join on an H100
// (seventy-eighth session, 2 rounds, two A/Bs): chain -1.5 and -2.0% at 1 row, +0.5% at 4,
// +0.2% at 16, -0.1% at 64 and 256; all 0.0 / +0.3 / -0.1 / 0.0 / -0.1% at 1 / 4 / 16 /
// 64 / 256. The rule by rows against join (seventy-ninth session, H100, 2 rounds): chain
// +0.0 / -1.4 / -0.3 / +0.4% at 1 / 2 / 8 / 16 rows (join +1.5% at 1 row against the rule).
// The rule that keeps them correct is the single edge's: every kernel triggers its
// dependents only after its own wait, so a kernel launched through programmatic edges
// finds every grandparent finished, and its own wait (griddepcontrol.wait: all
// prerequisite grids) covers each parent (GPU test CudaGraphLanes.JoinWaitsForEveryLane).
enum class LaneEdges { kSingle, kFork, kJoin, kAll, kChain, kByRows };
// One of DSV4_CUDA_PDL_LANES' words (empty: by rows); `source` names it in the error.
LaneEdges lane_edges_of(const std::string& v, const char* source) {
  if (v.empty()) return LaneEdges::kByRows;
  if (v == "join") return LaneEdges::kJoin;
  if (v == "0") return LaneEdges::kSingle;
  if (v == "fork") return LaneEdges::kFork;
  if (v == "chain") return LaneEdges::kChain;
  DSV4_CHECK(v == "all", "{}='{}': expected join, fork, chain, all or 0 (unset: chain or join by rows)", source, v);
  return LaneEdges::kAll;
}
std::atomic<int> g_force_lane_edges{-1};  // (cuda_force_pdl_lanes)
// The form for a capture of `rows` rows (0: not said, which takes `join` where unset).
LaneEdges lane_edges_mode(int64_t rows) {
  static const LaneEdges from_env = [] {
    const char* v = std::getenv("DSV4_CUDA_PDL_LANES");
    return lane_edges_of(v ? v : "", "DSV4_CUDA_PDL_LANES");
  }();
  static const int64_t chain_rows = env_integer("DSV4_CUDA_PDL_CHAIN_ROWS", 2, 0, int64_t(1) << 20);
  const int forced = g_force_lane_edges.load(std::memory_order_relaxed);
  const LaneEdges mode = forced >= 0 ? LaneEdges(forced) : from_env;
  if (mode != LaneEdges::kByRows) return mode;
  return rows >= 1 && rows <= chain_rows ? LaneEdges::kChain : LaneEdges::kJoin;
}

// Returns the number of edges converted.
int make_kernel_edges_programmatic(cudaGraph_t graph, GraphEdges& e, int64_t rows) {
  const size_t n = e.from.size();
  auto& from = e.from;
  auto& to = e.to;
  auto& data = e.data;
  std::map<cudaGraphNode_t, bool> ours;
  auto is_ours = [&](cudaGraphNode_t node) {
    auto it = ours.find(node);
    if (it == ours.end()) it = ours.emplace(node, is_ops_kernel(node)).first;
    return it->second;
  };
  const LaneEdges mode = lane_edges_mode(rows);
  const bool forks = mode == LaneEdges::kFork || mode == LaneEdges::kAll;
  const bool joins = mode == LaneEdges::kJoin || mode == LaneEdges::kAll || mode == LaneEdges::kChain;
  // kChain: each fork's edge toward its longest chain, in nodes, then in the kernels' blocks.
  std::vector<bool> chain_edge(n, false);
  if (mode == LaneEdges::kChain) {
    std::map<cudaGraphNode_t, int64_t> index;
    std::vector<int64_t> blocks;
    auto at = [&](cudaGraphNode_t node) {
      const auto [it, added] = index.emplace(node, int64_t(index.size()));
      if (added) {
        cudaGraphNodeType type;
        DSV4_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
        cudaKernelNodeParams params{};
        if (type == cudaGraphNodeTypeKernel) DSV4_CUDA_CHECK(cudaGraphKernelNodeGetParams(node, &params));
        blocks.push_back(type == cudaGraphNodeTypeKernel
                             ? int64_t(params.gridDim.x) * params.gridDim.y * params.gridDim.z
                             : 0);
      }
      return it->second;
    };
    std::vector<int64_t> a(n), b(n);
    for (size_t i = 0; i < n; ++i) {
      a[i] = at(from[i]);
      b[i] = at(to[i]);
    }
    chain_edge = fork_chain_edges(int64_t(index.size()), a, b, blocks);
  }
  // A join is converted only where every way in is from one of our kernels.
  std::map<cudaGraphNode_t, int> ours_in;
  for (size_t i = 0; i < n; ++i)
    if (data[i].type == cudaGraphDependencyTypeDefault && is_ours(from[i])) ++ours_in[to[i]];
  int converted = 0;
  for (size_t i = 0; i < n; ++i) {
    if (data[i].type != cudaGraphDependencyTypeDefault || !is_ours(to[i]) || !is_ours(from[i])) continue;
    const int in = e.in_degree[to[i]];
    if (e.out_degree[from[i]] != 1 && !forks && !chain_edge[i]) continue;
    if (in != 1 && !(joins && ours_in[to[i]] == in)) continue;
    DSV4_CUDA_CHECK(cudaGraphRemoveDependencies(graph, &from[i], &to[i], &data[i], 1));
    cudaGraphEdgeData edge{};
    edge.from_port = cudaGraphKernelNodePortProgrammatic;
    edge.type = cudaGraphDependencyTypeProgrammatic;
    DSV4_CUDA_CHECK(cudaGraphAddDependencies(graph, &from[i], &to[i], &edge, 1));
    ++converted;
  }
  return converted;
}

const char* graph_node_type_name(cudaGraphNodeType type) {
  switch (type) {
    case cudaGraphNodeTypeKernel: return "kernel";
    case cudaGraphNodeTypeMemcpy: return "memcpy";
    case cudaGraphNodeTypeMemset: return "memset";
    case cudaGraphNodeTypeHost: return "host";
    case cudaGraphNodeTypeGraph: return "child_graph";
    case cudaGraphNodeTypeEmpty: return "empty";
    case cudaGraphNodeTypeWaitEvent: return "wait_event";
    case cudaGraphNodeTypeEventRecord: return "event_record";
    default: return "other";
  }
}

// DSV4_GRAPH_EDGES=PREFIX writes each captured graph, as it will be instantiated (after
// the programmatic conversion), to PREFIX.N.tsv, N counting this process's captures (on any GPU):
// a line per node (`node`, index in cudaGraphGetNodes order, type, demangled kernel name) and a
// line per edge (`edge`, from, to, `programmatic` or `plain`). For reading beside the
// graph trace which launches wait for a whole predecessor, and whether a step holds
// anything but kernels.
void dump_graph_edges(cudaGraph_t graph) {
  const char* prefix = std::getenv("DSV4_GRAPH_EDGES");
  if (prefix == nullptr || *prefix == '\0') return;
  static std::atomic<int> captures{0};  // across backends: ranks capture on threads of their own
  const std::string path = std::string(prefix) + "." + std::to_string(captures.fetch_add(1)) + ".tsv";
  size_t n = 0;
  DSV4_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &n));
  std::vector<cudaGraphNode_t> nodes(n);
  DSV4_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &n));
  std::FILE* f = std::fopen(path.c_str(), "w");
  DSV4_CHECK(f != nullptr, "DSV4_GRAPH_EDGES: cannot write {}", path);
  std::map<cudaGraphNode_t, size_t> index;
  for (size_t i = 0; i < n; ++i) {
    index[nodes[i]] = i;
    cudaGraphNodeType type{};
    DSV4_CUDA_CHECK(cudaGraphNodeGetType(nodes[i], &type));
    std::string name;
    if (type == cudaGraphNodeTypeKernel) {
      const char* mangled = kernel_node_name(nodes[i]);
      if (mangled == nullptr) mangled = "?";
      int status = 0;
      char* demangled = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
      name = status == 0 && demangled ? demangled : mangled;  // as the graph trace names kernels
      std::free(demangled);
    }
    std::fprintf(f, "node\t%zu\t%s\t%s\n", i, graph_node_type_name(type), name.c_str());
  }
  const GraphEdges e = graph_edges(graph);
  for (size_t i = 0; i < e.from.size(); ++i)
    std::fprintf(f, "edge\t%zu\t%zu\t%s\n", index.at(e.from[i]), index.at(e.to[i]),
                 e.data[i].type == cudaGraphDependencyTypeProgrammatic ? "programmatic" : "plain");
  DSV4_CHECK(std::fclose(f) == 0, "DSV4_GRAPH_EDGES: cannot write {}", path);
}

}  // namespace

void cuda_force_pdl_lanes(const char* mode) {
  g_force_lane_edges.store(mode ? int(lane_edges_of(mode, "cuda_force_pdl_lanes")) : -1, std::memory_order_relaxed);
}

std::unique_ptr<Graph> CudaBackend::capture(const std::function<void()>& body, const CaptureInfo& info) {
  DSV4_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  ++scratch_->captures;
  try {
    body();
  } catch (...) {
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(stream_, &g);
    if (g) cudaGraphDestroy(g);
    throw;
  }
  cudaGraph_t graph = nullptr;
  DSV4_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
  cudaGraphExec_t exec = nullptr;
  GraphEdges edges = graph_edges(graph);
  last_capture_joins_ = count_joins(edges);
  last_capture_programmatic_edges_ =
      programmatic_launch_enabled() ? make_kernel_edges_programmatic(graph, edges, info.rows) : 0;
  dump_graph_edges(graph);
  DSV4_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaGraphDestroy(graph);
  return std::make_unique<CudaGraph>(exec, stream_);
}

void* CudaBackend::scratch(const char* name, size_t bytes, bool* fresh) {
  // One buffer per (name, stream): ops issued on two streams of one backend (the two
  // micro-batches of two-batch overlap) never share one.
  char key[192];
  std::snprintf(key, sizeof key, "%s@%p", name, static_cast<void*>(stream_));
  Scratch::Buffer& b = scratch_->buffers[key];
  Tensor& t = b.tensor;
  // A default Tensor is a 4-byte scalar without storage: test the pointer too.
  if (t.data() == nullptr || t.nbytes() < bytes) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    DSV4_CUDA_CHECK(cudaStreamIsCapturing(stream_, &status));
    DSV4_CHECK(status == cudaStreamCaptureStatusNone,
               "scratch '{}' must grow to {} bytes during graph capture; run the step eagerly first", name, bytes);
    DSV4_CUDA_CHECK(cudaStreamSynchronize(stream_));
    // A graph captured since this buffer was allocated may hold its address (a decode
    // bucket's graph, then a longer prefill that needs more): freeing it would leave the
    // graph's next replay writing freed memory, or memory another buffer has taken since.
    if (t.data() != nullptr && scratch_->captures != b.captures_before) scratch_->kept_for_graphs.push_back(t);
    t = empty_bytes(bytes);
    b.captures_before = scratch_->captures;
    if (fresh != nullptr) *fresh = true;
  } else if (fresh != nullptr) {
    *fresh = false;
  }
  return t.data();
}

size_t CudaBackend::scratch_bytes_kept_for_graphs() const {
  size_t bytes = 0;
  for (const Tensor& t : scratch_->kept_for_graphs) bytes += t.nbytes();
  return bytes;
}

int CudaBackend::num_lanes() const {
  static const int lanes = [] {
    const char* v = std::getenv("DSV4_CUDA_LANES");
    if (v == nullptr || *v == '\0') return 3;
    const std::string s(v);
    if (s != "1" && s != "2" && s != "3") core::fail("DSV4_CUDA_LANES='{}': expected 1, 2 or 3 (lanes of a step)", s);
    return s[0] - '0';
  }();
  return lanes;
}

void CudaBackend::set_lane(int lane) {
  Backend::set_lane(lane);
  if (lane == lane_) return;
  if (lane_ == 0) lane0_stream_ = stream_;
  if (lane == 0) {
    stream_ = lane0_stream_;
  } else {
    cudaStream_t& side = side_streams_[{lane0_stream_, lane}];
    if (side == nullptr) DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
    stream_ = side;
  }
  lane_ = lane;
}

int CudaBackend::mark_lane() {
  if (next_mark_ == int(marks_.size())) {
    cudaEvent_t e = nullptr;
    DSV4_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    marks_.push_back(e);
  }
  DSV4_CUDA_CHECK(cudaEventRecord(marks_[size_t(next_mark_)], stream_));
  return next_mark_++;
}

void CudaBackend::wait_for_mark(int mark) {
  DSV4_CHECK(mark >= 0 && mark < next_mark_, "lane mark {} was not made (marks made: {})", mark, next_mark_);
  DSV4_CUDA_CHECK(cudaStreamWaitEvent(stream_, marks_[size_t(mark)], 0));
}

}  // namespace dsv4::ops
