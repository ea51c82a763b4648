#include "model/stage_program.h"

namespace dsv4::model {

void run_in_order(const StageProgram& program) {
  for (const Stage& stage : program) stage.run();
}

}  // namespace dsv4::model
