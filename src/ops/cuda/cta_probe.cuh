// The device side of the CTA probe (cta_probe.h). In a translation unit compiled with
// DSV4_CUDA_CTA_PROBE defined (the whole CUDA library under -DDSV4_CUDA_CTA_PROBE=ON),
// thread 0 of a CTA stamps the time at each DSV4_CTA_PROBE(site, mark, tag) it passes,
// and DSV4_CTA_PROBE_SCOPE(site, tag) stamps mark 0 where it stands and kCtaProbeExit
// wherever the function returns (site: a CtaProbeSite; kNone stamps nothing). Elsewhere both expand to nothing and their arguments are
// not evaluated, so a kernel's code without the option is what it was without the marks.
// A stamp is an atomic add and a 32-byte store by one thread; only while a CtaProbe is
// alive (a null sink otherwise: one load and a branch).
#pragma once

#include "ops/cuda/cta_probe.h"

#if defined(DSV4_CUDA_CTA_PROBE)
#include "ops/cuda/cuda_check.h"

namespace dsv4::ops::cta_probe_detail {

// This unit's sink: internal linkage, one per translation unit (no relocatable device
// code), pointed at the records by the setter it registers.
static __device__ CtaProbeSink g_sink;
static void set_sink(const CtaProbeSink& s) { DSV4_CUDA_CHECK(cudaMemcpyToSymbol(g_sink, &s, sizeof s)); }
struct Registration {
  Registration() { register_cta_probe_sink_setter(&set_sink); }
};
static const Registration g_registration;

__device__ __forceinline__ void mark(CtaProbeSite site, uint8_t m, const void* tag) {
  if (site == CtaProbeSite::kNone || (threadIdx.x | threadIdx.y | threadIdx.z) != 0) return;
  const CtaProbeSink s = g_sink;
  if (s.records == nullptr) return;
  uint64_t ns, clk;
  uint32_t sm;
  // ("memory": the stamp stays between the memory operations before and after it)
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns)::"memory");
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(clk)::"memory");
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  const unsigned long long i = atomicAdd(s.count, 1ull);
  if (i >= s.capacity) return;
  CtaProbeRecord r;
  r.ns = ns;
  r.clock = clk;
  r.tag = uint32_t(reinterpret_cast<uintptr_t>(tag));
  r.cta = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  r.sm = uint16_t(sm);
  r.site = uint8_t(site);
  r.mark = m;
  r.pad = 0;
  s.records[i] = r;
}

struct Scope {
  CtaProbeSite site;
  const void* tag;
  __device__ __forceinline__ Scope(CtaProbeSite s, const void* t) : site(s), tag(t) { mark(site, 0, tag); }
  __device__ __forceinline__ ~Scope() { mark(site, kCtaProbeExit, tag); }
};

}  // namespace dsv4::ops::cta_probe_detail

#define DSV4_CTA_PROBE(site, m, tag) ::dsv4::ops::cta_probe_detail::mark(site, m, tag)
#define DSV4_CTA_PROBE_SCOPE(site, tag) const ::dsv4::ops::cta_probe_detail::Scope dsv4_cta_probe_scope_(site, tag)
#else
#define DSV4_CTA_PROBE(site, m, tag) ((void)0)
#define DSV4_CTA_PROBE_SCOPE(site, tag) ((void)0)
#endif
