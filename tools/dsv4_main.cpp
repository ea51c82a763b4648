// dsv4: a serving engine for DeepSeek-V4 on NVIDIA Hopper.
#include <cstdio>
#include <exception>
#include <vector>

#include <CLI/CLI.hpp>

#include "core/error.h"
#include "tools/build_info.h"
#include "tools/commands.h"
#include "tools/env_switches.h"

int main(int argc, char** argv) {
  CLI::App app{
      "dsv4: DeepSeek-V4 (V4-Flash, V4-Pro) inference engine.\n"
      "Loads Hugging Face checkpoints (FP8 dense, FP4 experts); runs on the CPU\n"
      "(reference) or NVIDIA Hopper GPUs."};
  app.require_subcommand(1);
  app.set_version_flag("--version", dsv4::tools::build_info_text());
  std::vector<std::pair<CLI::App*, dsv4::tools::Command>> commands;
  auto add = [&](const char* name, const char* help, auto adder) {
    CLI::App* sub = app.add_subcommand(name, help);
    commands.emplace_back(sub, adder(*sub));
  };
  add("make-checkpoint", "Write a synthetic checkpoint in the official HF layout", dsv4::tools::add_make_checkpoint);
  add("generate", "Generate tokens for one or more prompts given as token ids", dsv4::tools::add_generate);
  add("info", "Validate a checkpoint, or describe a preset: its configuration, its weights' size and the memory free here", dsv4::tools::add_info);
#if DSV4_HAVE_SERVE
  add("serve", "Serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)",
      dsv4::tools::add_serve);
#endif
  add("env", "List the DSV4_* environment variables dsv4 reads: what each takes and does, and which are set",
      dsv4::tools::add_env);
  add("bench", "Benchmarks: bench decode (decode step vs roofline), bench serve (load-test a server)",
      dsv4::tools::add_bench);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  // A misspelt switch, or a value its reader ignores, would otherwise pass unseen.
  for (const std::string& w : dsv4::tools::environment_warnings(dsv4::tools::dsv4_environment()))
    std::fprintf(stderr, "dsv4: warning: %s\n", w.c_str());
  try {
    for (auto& [sub, run] : commands)
      if (sub->parsed()) return run();
  } catch (const dsv4::core::Error& e) {
    std::fprintf(stderr, "dsv4: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv4: unexpected error: %s\n", e.what());
    return 2;
  }
  return 0;
}
