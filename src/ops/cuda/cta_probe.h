// Per-CTA clock stamps inside kernels (docs/design/cta-probe.md): when each CTA of a
// launch started, passed its dependency wait, reached its kernel's own marks and
// ended. A graph trace (tools/graph_trace) sees whole launches; ncu samples warps,
// not the one CTA whose chain is a launch's length (the mHC finisher at batch 1).
// Kernels carry marks only in a build configured with -DDSV4_CUDA_CTA_PROBE=ON
// (cta_probe.cuh: otherwise they compile to nothing); the self-test kernel here
// always carries them, so the mechanism is tested in every build.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace dsv4::ops {

// Where a stamp comes from: a kernel (or a device function shared by kernels).
enum class CtaProbeSite : uint8_t {
  kSelfTest = 0,
  kHcMixFinish,   // hc_mix_finish_kernel: the mix and the finish rows in one launch (1-4 rows)
  kHcMixPartial,  // hc_mix_partial_kernel: the mix's slices (the two-launch form)
  kHcFinishRow,   // hc_finish_row: a finish row (either form)
  kGemmTile,      // gemm_tile for the dense formats (FP8, bf16, FP8-as-bf16): plain GEMMs, wo_a
  kExpertGemm,    // expert_gemm_kernel (the routed experts' separate launches)
  kExpertFused,   // expert_ffn_fused_kernel (gate/up and down in one launch)
  kAttention,     // attention_wgmma_kernel
  kAttnCombine,   // attention_combine_kernel (after a split attention launch)
  kCompressEmit,  // compress_emit_kernel (the compressors' rows completed in the step)
  kRouterSelect,  // router_select_kernel (the router's fold and select after its GEMM)
  kHcCluster,     // hc_mix_finish_cluster_kernel: the mix and finish by one cluster (1-2 rows)
  kCount,
  kNone = 0xff,  // stamps nothing (for a site picked at compile time, e.g. by a template's format)
};

// Every site's last mark: the CTA's exit (thread 0 past its last instruction that matters).
inline constexpr uint8_t kCtaProbeExit = 255;
// Record slots a CTA takes at its entry: entry, up to 14 marks, exit (in the last slot).
inline constexpr unsigned kCtaProbeSlots = 16;

// One stamp: thread 0 of a CTA at one mark. 32 bytes.
struct CtaProbeRecord {
  uint64_t ns;     // %globaltimer: one clock for every SM (ns)
  uint64_t clock;  // %clock64 of the SM (cycles; differences on one SM only)
  uint64_t tag;    // the launch: a pointer argument unique to it (its weights)
  uint32_t cta;    // the linear block index
  uint16_t sm;     // %smid
  uint8_t site;    // CtaProbeSite
  uint8_t mark;
};
static_assert(sizeof(CtaProbeRecord) == 32, "the record's layout is the device's");

// What the device side writes to: records[0, capacity), zeroed (a slot with ns == 0 was
// not used), taken kCtaProbeSlots at a time; count: the slots taken (it keeps counting
// past capacity, so the host knows how many CTAs found no room); overflow: marks a CTA
// made past its slots.
struct CtaProbeSink {
  CtaProbeRecord* records = nullptr;
  unsigned long long* count = nullptr;
  unsigned long long* overflow = nullptr;
  unsigned long long capacity = 0;
};

// Each translation unit that includes cta_probe.cuh in a probe build holds its own
// copy of the sink (no relocatable device code) and registers a setter for it here.
using CtaProbeSinkSetter = void (*)(const CtaProbeSink& sink);
void register_cta_probe_sink_setter(CtaProbeSinkSetter setter);
// How many translation units registered (1 without -DDSV4_CUDA_CTA_PROBE=ON: the self test's).
int cta_probe_registered_units();
// Whether the ops kernels were built with their marks (-DDSV4_CUDA_CTA_PROBE=ON).
bool cta_probe_kernels_marked();

const char* cta_probe_site_name(int site);
// A mark's name at its site ("exit" for kCtaProbeExit; "m<N>" for a number the site does not name).
const char* cta_probe_mark_name(int site, int mark);

// Owns the record buffer on the current device and points every registered unit's
// sink at it while alive (one at a time). Stamps are made by whatever runs meanwhile.
class CtaProbe {
 public:
  explicit CtaProbe(int64_t capacity);  // records; fails on capacity < kCtaProbeSlots
  ~CtaProbe();
  CtaProbe(const CtaProbe&) = delete;
  CtaProbe& operator=(const CtaProbe&) = delete;

  // Waits for the device, then zeroes the records and counts: the next records are what runs after.
  void reset();
  // What was lost: CTAs that found no slots (capacity), marks past a CTA's slots.
  struct Lost {
    int64_t ctas = 0, marks = 0;
  };
  // Synchronizes the device, then returns the stamps made since the last reset, CTA by
  // CTA in the order they took their slots, each CTA's in its order; *lost if set.
  std::vector<CtaProbeRecord> collect(Lost* lost = nullptr);

 private:
  CtaProbeSink sink_;
};

// The self test (always marked): `ctas` CTAs, each stamping entry, `marks` marks
// `spin_ns` apart on its own clock, and exit, with tag `tag`. Returns the records.
std::vector<CtaProbeRecord> run_cta_probe_self_test(int ctas, int marks, uint32_t spin_ns, uint32_t tag,
                                                    int64_t capacity, CtaProbe::Lost* lost);

}  // namespace dsv4::ops
