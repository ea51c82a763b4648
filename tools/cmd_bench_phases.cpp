// dsv4 bench phases: what dependent phases cost on one GPU, persistent (grid
// barriers) against one kernel a phase (docs/design/batch1-persistent.md).
#include <cstdio>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tools/commands.h"
#if DSV4_HAVE_CUDA
#include "ops/cuda/phase_probe.h"
#endif

namespace dsv4::tools {

namespace {

struct PhasesOptions {
  std::string phase_bytes = "20M";
  int phases = 40, barriers = 10000, repeats = 20;
  uint64_t seed = 1;
  std::string json;
};

}  // namespace

Command add_bench_phases(CLI::App& app) {
  auto o = std::make_shared<PhasesOptions>();
  app.footer(
      "Dependent-phase probe (CUDA, one GPU, one CTA an SM in every variant): the cost of one grid barrier\n"
      "in a persistent cooperative kernel, then the time to read --phases phases of --phase-bytes each\n"
      "(random bytes, each phase after the previous one) five ways: all bytes as one phase (streaming\n"
      "alone); one persistent kernel with a grid barrier after each phase, without and with the next\n"
      "phase's bytes prefetched to L2 before the barrier; one kernel a phase in a captured CUDA graph with\n"
      "dependent launch (how decode runs now), without and with each kernel prefetching its bytes before\n"
      "its dependency wait. Each line gives the median time, the read bandwidth and the time a phase costs\n"
      "above streaming alone. Every variant's checksum of the bytes read is checked against the host's.");
  app.add_option("--phase-bytes", o->phase_bytes, "Bytes each phase reads (K, M, G; a multiple of 16)")
      ->default_val("20M");
  app.add_option("--phases", o->phases, "Dependent phases a run")->default_val(40)->check(CLI::Range(1, 10000));
  app.add_option("--barriers", o->barriers, "Grid barriers in the barrier-only kernel")->default_val(10000)
      ->check(CLI::Range(1, 10000000));
  app.add_option("--repeats", o->repeats, "Timed runs of each variant (median)")->default_val(20)
      ->check(CLI::Range(1, 1000));
  app.add_option("--seed", o->seed, "Seed of the bytes the phases read")->default_val(1);
  app.add_option("--json", o->json, "Write the results as JSON");
  return [o]() -> int {
    if (!o->json.empty()) expect_writable_file(o->json, "--json");
#if DSV4_HAVE_CUDA
    ops::PhaseProbeOptions po;
    po.phase_bytes = int64_t(parse_size(o->phase_bytes, "--phase-bytes"));
    po.phases = o->phases;
    po.barriers = o->barriers;
    po.repeats = o->repeats;
    po.seed = o->seed;
    auto backend = make_backend("cuda", 1);
    auto& cuda = static_cast<ops::CudaBackend&>(*backend);
    std::fprintf(stderr, "bench phases: %d phases of %s, seed %llu...\n", po.phases, o->phase_bytes.c_str(),
                 static_cast<unsigned long long>(po.seed));
    const ops::PhaseProbeResult r = ops::run_phase_probe(cuda, po);
    const double total = double(po.phase_bytes) * po.phases;
    std::printf("%d CTAs x %d threads (one an SM), %d phases x %.1f MB, median of %d runs\n", r.ctas, r.threads,
                po.phases, po.phase_bytes / 1e6, po.repeats);
    std::printf("grid barrier: %.3f us (a kernel of %d barriers)\n", r.barrier_us, po.barriers);
    std::printf("%-34s %10s %9s %16s  %s\n", "variant", "ms", "GB/s", "us a phase above", "checksum");
    bool all_ok = true;
    auto line = [&](const char* name, const ops::PhaseRun& run, bool per_phase) {
      const bool ok = run.checksum == r.expected_checksum;
      all_ok = all_ok && ok;
      const double above = per_phase ? (run.ms - r.single.ms) * 1e3 / po.phases : 0.0;
      std::printf("%-34s %10.3f %9.0f %16.2f  %s\n", name, run.ms, total / (run.ms * 1e-3) / 1e9, above,
                  ok ? "ok" : "WRONG");
    };
    line("one phase (streaming alone)", r.single, false);
    line("persistent, grid barriers", r.persistent, true);
    line("persistent + L2 prefetch", r.persistent_prefetch, true);
    line("graph, one kernel a phase", r.graph, true);
    line("graph + L2 prefetch before wait", r.graph_prefetch, true);
    if (!o->json.empty()) {
      auto run_json = [&](const ops::PhaseRun& run) {
        return nlohmann::json{{"ms", run.ms},
                              {"gb_s", total / (run.ms * 1e-3) / 1e9},
                              {"us_per_phase_above_single", (run.ms - r.single.ms) * 1e3 / po.phases},
                              {"checksum_ok", run.checksum == r.expected_checksum}};
      };
      nlohmann::json out;
      out["ctas"] = r.ctas;
      out["threads"] = r.threads;
      out["phases"] = po.phases;
      out["phase_bytes"] = po.phase_bytes;
      out["repeats"] = po.repeats;
      out["barriers"] = po.barriers;
      out["barrier_us"] = r.barrier_us;
      out["device"] = device_json(cuda);
      out["build"] = build_json();
      out["environment"] = environment_json();  // the switches in effect (tools/env_switches.h)
      out["single"] = run_json(r.single);
      out["persistent"] = run_json(r.persistent);
      out["persistent_prefetch"] = run_json(r.persistent_prefetch);
      out["graph"] = run_json(r.graph);
      out["graph_prefetch"] = run_json(r.graph_prefetch);
      write_json_file(out, o->json, "--json");
    }
    if (!all_ok) core::fail("bench phases: a variant's checksum differs from the host's (see WRONG above)");
    return 0;
#else
    core::fail("bench phases: this build of dsv4 has no CUDA backend (nvcc was not found at configure time)");
#endif
  };
}

}  // namespace dsv4::tools
