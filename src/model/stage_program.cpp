#include "model/stage_program.h"

namespace dsv4::model {

void run_in_order(const StageProgram& program, const std::function<void(const Stage&, bool after)>& around) {
  for (const Stage& stage : program) {
    if (around) around(stage, false);
    stage.run();
    if (around) around(stage, true);
  }
}

}  // namespace dsv4::model
