#include "model/stage_program.h"

#include <algorithm>
#include <map>

namespace dsv4::model {

void run_in_order(const StageProgram& program, const std::function<void(const Stage&, bool after)>& around) {
  for (const Stage& stage : program) {
    if (around) around(stage, false);
    stage.run();
    if (around) around(stage, true);
  }
}

std::vector<std::vector<int>> stage_dependencies(const StageProgram& program) {
  // Per buffer: the stages so far that wrote it and those that read it since.
  struct Users {
    std::vector<int> writers, readers;
  };
  std::map<const void*, Users> users;
  std::vector<std::vector<int>> deps(program.size());
  for (size_t i = 0; i < program.size(); ++i) {
    std::vector<int>& d = deps[i];
    for (const BufferRef& r : program[i].reads)
      if (r.data != nullptr) {
        const Users& u = users[r.data];
        d.insert(d.end(), u.writers.begin(), u.writers.end());
      }
    for (const BufferRef& w : program[i].writes)
      if (w.data != nullptr) {
        const Users& u = users[w.data];
        d.insert(d.end(), u.writers.begin(), u.writers.end());
        d.insert(d.end(), u.readers.begin(), u.readers.end());
      }
    std::sort(d.begin(), d.end());
    d.erase(std::unique(d.begin(), d.end()), d.end());
    for (const BufferRef& r : program[i].reads)
      if (r.data != nullptr) users[r.data].readers.push_back(int(i));
    for (const BufferRef& w : program[i].writes)
      if (w.data != nullptr) users[w.data].writers.push_back(int(i));
  }
  return deps;
}

}  // namespace dsv4::model
