// dsv4 env: the environment variables the project reads, and which are set now.
#include <algorithm>
#include <cstdio>
#include <map>

#include <nlohmann/json.hpp>

#include "tools/commands.h"
#include "tools/env_switches.h"

namespace dsv4::tools {

nlohmann::json environment_json() {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [name, value] : dsv4_environment()) out[name] = value;
  return out;
}

Command add_env(CLI::App& app) {
  struct Options {
    bool json = false, set_only = false;
  };
  auto o = std::make_shared<Options>();
  app.add_flag("--json", o->json, "Print the table as JSON (name, reader, values, unset, what, strict, value if set)");
  app.add_flag("--set", o->set_only, "Only the variables set now (unknown DSV4_* names too)");
  app.footer(
      "The CUDA backend's switches are A/B and diagnostic knobs, read once at first use: every default is the "
      "measured choice (docs/BENCHMARKS.md), and most of the forms they select compute the same bits. dsv4 warns at "
      "start-up about a DSV4_* name it does not read and about a value a switch does not take.");
  return [o] {
    const auto set = dsv4_environment();
    const std::map<std::string, std::string> now(set.begin(), set.end());
    if (o->json) {
      nlohmann::json rows = nlohmann::json::array();
      for (const EnvSwitch& s : env_switches()) {
        const auto it = now.find(std::string(s.name));
        if (o->set_only && it == now.end()) continue;
        nlohmann::json r = {{"name", s.name},   {"reader", s.reader}, {"values", env_values_text(s)},
                            {"unset", s.unset}, {"what", s.what},     {"strict", s.strict}};
        if (it != now.end()) r["value"] = it->second;
        rows.push_back(r);
      }
      for (const auto& [name, value] : set)
        if (find_env_switch(name) == nullptr) rows.push_back({{"name", name}, {"value", value}, {"unknown", true}});
      std::printf("%s\n", rows.dump(2).c_str());
      return 0;
    }
    if (o->set_only && set.empty()) {
      std::printf("no DSV4_* variable is set\n");
      return 0;
    }
    size_t width = 0;
    for (const EnvSwitch& s : env_switches()) width = std::max(width, env_values_text(s).size());
    std::string_view reader;
    bool first = true;
    for (const EnvSwitch& s : env_switches()) {
      const auto it = now.find(std::string(s.name));
      if (o->set_only && it == now.end()) continue;
      if (s.reader != reader) {
        reader = s.reader;
        std::printf("%s%.*s:\n", first ? "" : "\n", int(reader.size()), reader.data());
        first = false;
      }
      std::printf("  %-34.*s %-*s  unset: %.*s%s\n      %.*s\n", int(s.name.size()), s.name.data(), int(width),
                  env_values_text(s).c_str(), int(s.unset.size()), s.unset.data(),
                  it != now.end() ? ("   now: '" + it->second + "'").c_str() : "", int(s.what.size()), s.what.data());
    }
    bool header = false;
    for (const auto& [name, value] : set)
      if (find_env_switch(name) == nullptr) {
        if (!header) std::printf("\nset, and read by nothing:\n");
        header = true;
        std::printf("  %s='%s'\n", name.c_str(), value.c_str());
      }
    return 0;
  };
}

}  // namespace dsv4::tools
