// The dependent-phase probe (`dsv4 bench phases`): every way of running the
// phases reads every byte once (the device checksums equal the host's), and the
// grid barrier neither hangs nor lets a CTA through early (a phase read before the
// previous one finished would still sum the same bytes, so the barrier-only kernel
// is checked by completing many barriers: a lost wake-up hangs it, and ctest's
// timeout fails the test).
#include <cmath>

#include <gtest/gtest.h>

#include "cuda_test_util.h"
#include "ops/cuda/phase_probe.h"

namespace dsv4::testing {
namespace {

TEST(CudaPhaseProbe, EveryVariantReadsEveryByteOnce) {
  DSV4_REQUIRE_CUDA();
  auto backend = ops::make_cuda_backend(0);
  auto& cuda = static_cast<ops::CudaBackend&>(*backend);
  // Phase sizes that do and do not divide evenly over the CTAs and the unrolled loop.
  for (int64_t phase_bytes : {int64_t(1) << 20, int64_t(16) * 12345}) {
    ops::PhaseProbeOptions o;
    o.phase_bytes = phase_bytes;
    o.phases = 7;
    o.barriers = 2000;
    o.repeats = 2;
    o.seed = 42 + uint64_t(phase_bytes);
    const ops::PhaseProbeResult r = ops::run_phase_probe(cuda, o);
    for (const ops::PhaseRun* run : {&r.single, &r.persistent, &r.persistent_prefetch, &r.graph, &r.graph_prefetch}) {
      EXPECT_EQ(run->checksum, r.expected_checksum) << "phase bytes " << phase_bytes;
      EXPECT_GT(run->ms, 0.0);
    }
    EXPECT_TRUE(std::isfinite(r.barrier_us) && r.barrier_us > 0.0) << r.barrier_us;
    EXPECT_EQ(r.ctas, cuda.properties().multiProcessorCount);
  }
}

TEST(CudaPhaseProbe, RejectsOptionsOutOfRangeNamingThem) {
  DSV4_REQUIRE_CUDA();
  auto backend = ops::make_cuda_backend(0);
  auto& cuda = static_cast<ops::CudaBackend&>(*backend);
  ops::PhaseProbeOptions o;
  o.phase_bytes = 100;  // not a multiple of 16
  try {
    ops::run_phase_probe(cuda, o);
    FAIL() << "expected an error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("--phase-bytes"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dsv4::testing
