// The CTA probe's host side and self test (cta_probe.h).
#include "ops/cuda/cta_probe.h"

// Whether the ops kernels carry their marks is the build option's; this unit always
// does, for the self test below.
#if defined(DSV4_CUDA_CTA_PROBE)
#define DSV4_CTA_PROBE_KERNELS_MARKED true
#else
#define DSV4_CTA_PROBE_KERNELS_MARKED false
#define DSV4_CUDA_CTA_PROBE 1
#endif
#include "ops/cuda/cta_probe.cuh"

#include <mutex>
#include <string>

#include "core/error.h"
#include "ops/cuda/cuda_check.h"

namespace dsv4::ops {

namespace {

struct Registry {
  std::mutex mu;
  std::vector<CtaProbeSinkSetter> setters;
  bool attached = false;
};
// (a function's static: units register during static initialisation, in any order)
Registry& registry() {
  static Registry r;
  return r;
}

void set_all(const CtaProbeSink& sink) {
  Registry& r = registry();
  for (CtaProbeSinkSetter set : r.setters) set(sink);
}

// Mark names by site, index = mark (0 is every site's first stamp).
struct SiteNames {
  const char* site;
  std::vector<const char*> marks;
};
const std::vector<SiteNames>& site_names() {
  static const std::vector<SiteNames> names = {
      {"self_test", {"entry"}},
      {"hc_mix_finish",
       {"entry", "slice_done", "counted", "handed_over", "staged", "sums", "x_done", "waited", "norm_sum", "norm_factor",
        "xn_done"}},
      {"hc_mix_partial", {"entry", "waited"}},
      {"hc_finish_row",
       {"entry", "m1", "m2", "handed_over", "staged", "sums", "x_done", "m7", "norm_sum", "norm_factor", "xn_done"}},
      // (6-9: router_gemm_select_kernel's hand-over and its finishers' rows)
      {"gemm_tile",
       {"entry", "waited", "stages_done", "partial_stored", "last_cta", "first_stage", "counted", "handed_over",
        "folded", "selected"}},
      {"expert_gemm", {"entry", "tile_known"}},
      {"expert_fused", {"entry", "item_taken", "tile_ready"}},
      {"attention", {"entry", "waited", "staged", "first_issued", "tiles_done", "out_staged"}},
      {"attn_combine", {"entry", "waited"}},
      {"compress_emit",
       {"entry", "waited", "loaded", "max", "exps", "sum", "pooled", "arrived", "gathered", "normed", "roped"}},
      {"router_select", {"entry", "waited", "folded", "selected"}},
      {"hc_cluster",
       {"entry", "waited", "x_formed", "fn_landed", "pushed", "partials_in", "sums", "x_done", "ss_in", "xn_done"}},
  };
  return names;
}

__global__ void cta_probe_self_test_kernel(int marks, uint32_t spin_ns, uint32_t tag) {
  const void* t = reinterpret_cast<const void*>(uintptr_t(tag) | (uintptr_t(0x7f) << 40));  // (a 64-bit tag)
  DSV4_CTA_PROBE_SCOPE(CtaProbeSite::kSelfTest, t);
  for (int m = 1; m <= marks; ++m) {
    if (threadIdx.x == 0) {
      uint64_t start, now;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start)::"memory");
      do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)::"memory");
      } while (now - start < spin_ns);
    }
    __syncthreads();
    DSV4_CTA_PROBE(CtaProbeSite::kSelfTest, uint8_t(m), t);
  }
}

}  // namespace

void register_cta_probe_sink_setter(CtaProbeSinkSetter setter) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.setters.push_back(setter);
}

int cta_probe_registered_units() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return int(r.setters.size());
}

bool cta_probe_kernels_marked() { return DSV4_CTA_PROBE_KERNELS_MARKED; }

const char* cta_probe_site_name(int site) {
  const auto& names = site_names();
  static_assert(int(CtaProbeSite::kCount) == 12, "a name for every site");
  return site >= 0 && site < int(names.size()) ? names[size_t(site)].site : "unknown";
}

const char* cta_probe_mark_name(int site, int mark) {
  if (mark == kCtaProbeExit) return "exit";
  const auto& names = site_names();
  if (site >= 0 && site < int(names.size()) && mark >= 0 && mark < int(names[size_t(site)].marks.size()))
    return names[size_t(site)].marks[size_t(mark)];
  static const std::vector<std::string> numbered = [] {
    std::vector<std::string> v;
    for (int i = 0; i < 256; ++i) v.push_back("m" + std::to_string(i));
    return v;
  }();
  return mark >= 0 && mark < 256 ? numbered[size_t(mark)].c_str() : "unknown";
}

CtaProbe::CtaProbe(int64_t capacity) {
  if (capacity < int64_t(kCtaProbeSlots))
    core::fail("CtaProbe: capacity {} records; needs at least {} (one CTA's slots)", capacity, kCtaProbeSlots);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (r.attached) core::fail("CtaProbe: another probe is alive (one at a time)");
  try {
    DSV4_CUDA_CHECK(cudaMalloc(&sink_.records, size_t(capacity) * sizeof(CtaProbeRecord)));
    DSV4_CUDA_CHECK(cudaMalloc(&sink_.count, 2 * sizeof(unsigned long long)));
    sink_.overflow = sink_.count + 1;
    sink_.capacity = static_cast<unsigned long long>(capacity);
    reset();  // (zeroed before any kernel stamps)
    set_all(sink_);
  } catch (...) {  // (no probe then: every sink null again, the buffers freed)
    try {
      set_all(CtaProbeSink{});
    } catch (...) {
    }
    cudaFree(sink_.records);
    cudaFree(sink_.count);
    throw;
  }
  r.attached = true;
}

CtaProbe::~CtaProbe() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  // (no throwing from a destructor: a failing device leaves nothing to reset, and errors here are dropped)
  if (cudaDeviceSynchronize() == cudaSuccess) {
    try {
      set_all(CtaProbeSink{});
    } catch (const std::exception&) {
    }
  }
  cudaFree(sink_.records);
  cudaFree(sink_.count);
  r.attached = false;
}

void CtaProbe::reset() {
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  DSV4_CUDA_CHECK(cudaMemset(sink_.records, 0, size_t(sink_.capacity) * sizeof(CtaProbeRecord)));
  DSV4_CUDA_CHECK(cudaMemset(sink_.count, 0, 2 * sizeof(unsigned long long)));
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
}

std::vector<CtaProbeRecord> CtaProbe::collect(Lost* lost) {
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  unsigned long long counts[2] = {0, 0};
  DSV4_CUDA_CHECK(cudaMemcpy(counts, sink_.count, sizeof counts, cudaMemcpyDeviceToHost));
  const unsigned long long usable = sink_.capacity / kCtaProbeSlots * kCtaProbeSlots;  // whole CTAs' slots
  const unsigned long long taken = counts[0] < usable ? counts[0] : usable;
  std::vector<CtaProbeRecord> slots(static_cast<size_t>(taken));
  if (taken > 0)
    DSV4_CUDA_CHECK(cudaMemcpy(slots.data(), sink_.records, size_t(taken) * sizeof(CtaProbeRecord), cudaMemcpyDeviceToHost));
  std::vector<CtaProbeRecord> out;
  out.reserve(slots.size() / 4);
  for (const CtaProbeRecord& r : slots)
    if (r.ns != 0) out.push_back(r);
  if (lost) {
    lost->ctas = int64_t((counts[0] - taken) / kCtaProbeSlots);
    lost->marks = int64_t(counts[1]);
  }
  return out;
}

std::vector<CtaProbeRecord> run_cta_probe_self_test(int ctas, int marks, uint32_t spin_ns, uint32_t tag,
                                                    int64_t capacity, CtaProbe::Lost* lost) {
  if (ctas < 1 || marks < 0 || marks > 254)
    core::fail("run_cta_probe_self_test: ctas {} (>= 1), marks {} (0-254)", ctas, marks);
  CtaProbe probe(capacity);
  probe.reset();
  cta_probe_self_test_kernel<<<ctas, 64>>>(marks, spin_ns, tag);
  DSV4_CUDA_CHECK(cudaGetLastError());
  return probe.collect(lost);
}

}  // namespace dsv4::ops
