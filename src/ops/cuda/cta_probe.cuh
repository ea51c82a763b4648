// The device side of the CTA probe (cta_probe.h). In a translation unit compiled with
// DSV4_CUDA_CTA_PROBE defined (the whole CUDA library under -DDSV4_CUDA_CTA_PROBE=ON),
// a kernel opens with DSV4_CTA_PROBE_SCOPE(site, tag): thread 0 takes kCtaProbeSlots
// record slots for its CTA (one atomic add, at entry: in the graphs, before the
// dependency wait, where it hides) and stamps mark 0; each DSV4_CTA_PROBE(site, mark,
// tag) that thread 0 passes later stamps the next slot (a clock read and a store, no
// round trip), and the scope's end stamps kCtaProbeExit in the last slot wherever the
// kernel returns. A mark outside a kernel with a scope reads an unset slot base: every
// marked kernel opens with one. site: a CtaProbeSite (kNone stamps nothing).
// Without DSV4_CUDA_CTA_PROBE both macros expand to nothing and their arguments are not
// evaluated, so a kernel's code is what it was without the marks.
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

struct CtaSlots {
  CtaProbeRecord* base;  // null: no probe, or no slots left
  unsigned next;
};
// (a device function's __shared__: one per kernel that uses it, 16 bytes)
__device__ __forceinline__ CtaSlots& cta_slots() {
  __shared__ CtaSlots slots;
  return slots;
}

__device__ __forceinline__ void stamp(CtaProbeRecord* at, CtaProbeSite site, uint8_t m, const void* tag) {
  uint64_t ns, clk;
  uint32_t sm;
  // ("memory": the stamp stays between the memory operations before and after it)
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns)::"memory");
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(clk)::"memory");
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  CtaProbeRecord r;
  r.ns = ns;
  r.clock = clk;
  r.tag = uint64_t(reinterpret_cast<uintptr_t>(tag));
  r.cta = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  r.sm = uint16_t(sm);
  r.site = uint8_t(site);
  r.mark = m;
  *at = r;
}

__device__ __forceinline__ void mark(CtaProbeSite site, uint8_t m, const void* tag) {
  if (site == CtaProbeSite::kNone || (threadIdx.x | threadIdx.y | threadIdx.z) != 0) return;
  CtaSlots& s = cta_slots();
  if (s.base == nullptr) return;
  if (s.next >= kCtaProbeSlots - 1) {  // (the last slot is the exit's)
    atomicAdd(g_sink.overflow, 1ull);
    return;
  }
  stamp(s.base + s.next++, site, m, tag);
}

struct Scope {
  CtaProbeSite site;
  const void* tag;
  __device__ __forceinline__ Scope(CtaProbeSite s, const void* t) : site(s), tag(t) {
    if (site == CtaProbeSite::kNone || (threadIdx.x | threadIdx.y | threadIdx.z) != 0) return;
    CtaSlots& slots = cta_slots();
    const CtaProbeSink sink = g_sink;
    slots.base = nullptr;
    slots.next = 1;
    if (sink.records == nullptr) return;
    const unsigned long long i = atomicAdd(sink.count, kCtaProbeSlots);
    if (i + kCtaProbeSlots > sink.capacity) return;  // (collect() reports the CTAs that found no room)
    slots.base = sink.records + i;
    stamp(slots.base, site, 0, tag);
  }
  __device__ __forceinline__ ~Scope() {
    if (site == CtaProbeSite::kNone || (threadIdx.x | threadIdx.y | threadIdx.z) != 0) return;
    const CtaSlots& slots = cta_slots();
    if (slots.base != nullptr) stamp(slots.base + (kCtaProbeSlots - 1), site, kCtaProbeExit, tag);
  }
};

}  // namespace dsv4::ops::cta_probe_detail

#define DSV4_CTA_PROBE(site, m, tag) ::dsv4::ops::cta_probe_detail::mark(site, m, tag)
#define DSV4_CTA_PROBE_SCOPE(site, tag) const ::dsv4::ops::cta_probe_detail::Scope dsv4_cta_probe_scope_(site, tag)
#else
#define DSV4_CTA_PROBE(site, m, tag) ((void)0)
#define DSV4_CTA_PROBE_SCOPE(site, tag) ((void)0)
#endif
