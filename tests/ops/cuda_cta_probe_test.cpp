// The CTA probe (ops/cuda/cta_probe.h): every CTA stamps every mark once, in its order,
// with the clock advancing by at least what the kernel waited between marks; CTAs past the
// capacity and marks past a CTA's slots are counted, not written; one probe at a time.
#include <map>
#include <string>

#include <gtest/gtest.h>

#include "cuda_test_util.h"
#include "ops/cuda/cta_probe.h"

namespace dsv4::testing {
namespace {

TEST(CudaCtaProbe, EveryCtaStampsEveryMarkInOrder) {
  DSV4_REQUIRE_CUDA();
  auto backend = ops::make_cuda_backend(0);
  const int ctas = 300, marks = 3;  // more CTAs than SMs: several waves
  const uint32_t spin_ns = 3000, tag = 0x5eed1234u;
  ops::CtaProbe::Lost lost{-1, -1};
  const std::vector<ops::CtaProbeRecord> recs = ops::run_cta_probe_self_test(ctas, marks, spin_ns, tag, 1 << 16, &lost);
  EXPECT_EQ(lost.ctas, 0);
  EXPECT_EQ(lost.marks, 0);
  ASSERT_EQ(recs.size(), size_t(ctas) * (marks + 2));  // entry, the marks, exit
  std::map<uint32_t, std::map<int, ops::CtaProbeRecord>> by_cta;
  for (const auto& r : recs) {
    EXPECT_EQ(r.site, uint8_t(ops::CtaProbeSite::kSelfTest));
    EXPECT_EQ(r.tag, uint64_t(tag) | (uint64_t(0x7f) << 40));  // all 64 bits
    EXPECT_LT(r.cta, uint32_t(ctas));
    EXPECT_LT(r.sm, 1024u);
    EXPECT_TRUE(by_cta[r.cta].emplace(int(r.mark), r).second) << "CTA " << r.cta << " mark " << int(r.mark) << " twice";
  }
  ASSERT_EQ(by_cta.size(), size_t(ctas));
  for (const auto& [cta, m] : by_cta) {
    ASSERT_EQ(m.size(), size_t(marks + 2)) << "CTA " << cta;
    ASSERT_TRUE(m.count(0) && m.count(ops::kCtaProbeExit)) << "CTA " << cta;
    const ops::CtaProbeRecord* prev = &m.at(0);
    for (int k = 1; k <= marks + 1; ++k) {
      const int mark = k <= marks ? k : ops::kCtaProbeExit;
      ASSERT_TRUE(m.count(mark)) << "CTA " << cta << " mark " << mark;
      const ops::CtaProbeRecord& r = m.at(mark);
      EXPECT_EQ(r.sm, prev->sm) << "a CTA stays on its SM";
      EXPECT_GE(r.clock, prev->clock) << "CTA " << cta << " mark " << mark;
      // The kernel spins spin_ns by the same clock after each stamp before the next mark.
      if (k <= marks) EXPECT_GE(r.ns, prev->ns + spin_ns) << "CTA " << cta << " mark " << mark;
      else EXPECT_GE(r.ns, prev->ns) << "CTA " << cta << " exit";
      prev = &r;
    }
  }
  EXPECT_STREQ(ops::cta_probe_site_name(int(ops::CtaProbeSite::kSelfTest)), "self_test");
  EXPECT_STREQ(ops::cta_probe_mark_name(int(ops::CtaProbeSite::kGemmTile), ops::kCtaProbeExit), "exit");
  EXPECT_STREQ(ops::cta_probe_mark_name(int(ops::CtaProbeSite::kGemmTile), 1), "waited");
  EXPECT_STREQ(ops::cta_probe_mark_name(int(ops::CtaProbeSite::kSelfTest), 7), "m7");
}

TEST(CudaCtaProbe, StampsPastTheCapacityAreCountedNotWritten) {
  DSV4_REQUIRE_CUDA();
  auto backend = ops::make_cuda_backend(0);
  ops::CtaProbe::Lost lost;
  // 100 records hold 6 CTAs' slots: 6 CTAs stamp entry and exit, 294 find no room.
  auto recs = ops::run_cta_probe_self_test(300, 0, 0, 7, 100, &lost);
  EXPECT_EQ(recs.size(), 12u);
  EXPECT_EQ(lost.ctas, 294);
  EXPECT_EQ(lost.marks, 0);
  // 20 marks a CTA: 14 fit between entry and exit, 6 are counted lost; the exit keeps its slot.
  recs = ops::run_cta_probe_self_test(2, 20, 0, 7, 1 << 10, &lost);
  EXPECT_EQ(recs.size(), 2u * (1 + 14 + 1));
  EXPECT_EQ(lost.ctas, 0);
  EXPECT_EQ(lost.marks, 12);
  int exits = 0;
  for (const auto& r : recs) exits += r.mark == ops::kCtaProbeExit;
  EXPECT_EQ(exits, 2);
}

TEST(CudaCtaProbe, OneProbeAtATimeAndEveryMarkedUnitRegistered) {
  DSV4_REQUIRE_CUDA();
  auto backend = ops::make_cuda_backend(0);
  {
    ops::CtaProbe probe(16);
    EXPECT_THROW(ops::CtaProbe(16), std::exception);
  }
  ops::CtaProbe again(16);  // the first one's end let it go
  EXPECT_THROW(ops::CtaProbe(15), std::exception);  // less than one CTA's slots
  // The self test's unit always; with the build option also the kernels' three.
  EXPECT_EQ(ops::cta_probe_registered_units(), ops::cta_probe_kernels_marked() ? 4 : 1);
}

}  // namespace
}  // namespace dsv4::testing
