// Subcommands of the dsv4 CLI. Each registers its options on a CLI11 subcommand
// and returns the function that runs it (exit code).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "ops/backend.h"

namespace dsv4::tools {

using Command = std::function<int()>;

Command add_make_checkpoint(CLI::App& app);
Command add_generate(CLI::App& app);
Command add_info(CLI::App& app);
// `dsv4 bench`: registers its children (decode, serve) on `app` and runs the parsed one.
Command add_bench(CLI::App& app);
Command add_bench_decode(CLI::App& app);
#if DSV4_HAVE_SERVE
Command add_serve(CLI::App& app);
Command add_bench_serve(CLI::App& app);
#endif

// "cpu" or "cuda"; a clear error where this build or machine lacks the backend.
std::unique_ptr<ops::Backend> make_backend(const std::string& name, int threads);

// "cuda" when this build has the CUDA backend and a GPU is usable, else "cpu".
std::string default_backend_name();

// "4096", "64M", "5G", "auto" (0).
uint64_t parse_size(const std::string& text, const char* option);

}  // namespace dsv4::tools
