// dsv4 bench: the benchmark subcommands.
#include <memory>
#include <utility>
#include <vector>

#include "tools/commands.h"

namespace dsv4::tools {

Command add_bench(CLI::App& app) {
  app.require_subcommand(1);
  auto children = std::make_shared<std::vector<std::pair<CLI::App*, Command>>>();
  auto child = [&](const char* name, const char* help, Command (*adder)(CLI::App&)) {
    CLI::App* sub = app.add_subcommand(name, help);
    children->emplace_back(sub, adder(*sub));
  };
  child("decode", "Time the decode step of a model at given batch sizes and context against the roofline",
        add_bench_decode);
  child("phases", "Time dependent phases on one GPU: grid barriers in one kernel against one kernel a phase",
        add_bench_phases);
  child("linears", "Time one linear inside a captured chain of them against its bytes (the per-launch cost)",
        add_bench_linears);
  child("sampling", "Time choosing a step's tokens: logits to the host, argmax on the host or the backend, samplers",
        add_bench_sampling);
#if DSV4_HAVE_SERVE
  child("serve", "Load-test a running OpenAI-compatible server (dsv4 serve, vLLM, ...)", add_bench_serve);
#endif
  return [children] {
    for (auto& [sub, run] : *children)
      if (sub->parsed()) return run();
    return 0;
  };
}

}  // namespace dsv4::tools
