// Every environment variable the project reads (DSV4_*), in one table: what each takes,
// what unset means and what it does. The readers stay where they are (the CUDA backend
// reads its switches once, where it uses them); this table is what `dsv4 env` lists, what
// the benchmarks record with their results, and what dsv4 checks at start-up, so that a
// misspelt name or a value a reader silently ignores does not pass unseen (an A/B run of
// `DSV4_CUDA_WIDE_WSS=0` would otherwise measure the default twice and read as "no change").
// tests/tools/check_env_switches.py checks that every name the sources read, and every
// `DSV4_X=` the README and docs/ARCHITECTURE.md mention, is in the table.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dsv4::tools {

// What an environment switch takes. A value is accepted when it is one of `words`, or an
// integer in [min, max] (where min <= max), or with `ranges` "A-B" of two such integers
// with A <= B, or anything at all with `any` (paths, lists its reader checks). An empty
// value is read as unset by every reader and is always accepted.
struct EnvValues {
  std::string_view words;  // '|'-separated ("0|1"), or empty
  int64_t min = 1, max = 0;
  bool ranges = false;
  std::string_view any;  // non-empty: any text, shown as this ("DIR", "PREFIX")
};

// One environment variable.
struct EnvSwitch {
  std::string_view name;
  std::string_view reader;  // who reads it: "CUDA backend", "ops", "serve", "graph trace", "tests", "scripts"
  EnvValues values;
  std::string_view unset;  // what unset (or empty) means
  std::string_view what;   // what it does, one line
  // true: its reader fails on a value it does not take; false: it reads such a value as unset.
  bool strict = false;
};

// The table, in the order `dsv4 env` lists it.
std::span<const EnvSwitch> env_switches();

// The switch named `name`, or nullptr.
const EnvSwitch* find_env_switch(std::string_view name);

// What `s` takes, for people: "0 | 1", "1..8", "off | auto | all | N (1..) | A-B", "DIR".
std::string env_values_text(const EnvSwitch& s);

// Whether `s`'s reader takes `value` (see EnvValues).
bool env_value_accepted(const EnvSwitch& s, std::string_view value);

// The DSV4_* variables of this process's environment, sorted by name.
std::vector<std::pair<std::string, std::string>> dsv4_environment();

// One line a problem in `env` (name, value pairs): a name no part of the project reads (with
// the nearest known name where one is close), or a value a switch does not take (and, for a
// reader that ignores it, what it is read as). Empty where all is well.
std::vector<std::string> environment_warnings(const std::vector<std::pair<std::string, std::string>>& env);

}  // namespace dsv4::tools
