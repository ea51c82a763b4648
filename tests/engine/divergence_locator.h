// Test helper: where a model run on one backend first leaves a run of the same
// requests on another. tests/engine/cuda_model_test.cpp uses it when the GPU's
// greedy generation is not the CPU model's bit for bit; model_invariants_test.cpp
// checks it on two CPU arithmetic models. Any two runners work: the names say
// "cpu" (recorded first) and "cuda" (compared).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "engine/model_runner.h"

namespace dsv4::testing {

using Bytes = std::vector<uint8_t>;

// Every step buffer of a micro-batch; `per_logit_row`: rows are logits rows.
struct StepBuffer {
  const char* name;
  core::Tensor* tensor;
  bool per_logit_row = false;
};
inline std::vector<StepBuffer> step_buffers(model::MicroBatchBuffers& b) {
  return {{"X", &b.X},           {"X_alt", &b.X_alt},         {"x", &b.x},
          {"xn", &b.xn},         {"post", &b.post},           {"comb", &b.comb},
          {"cq_raw", &b.cq_raw}, {"cq", &b.cq},               {"q", &b.q},
          {"kv", &b.kv},         {"comp_a", &b.comp_a},       {"comp_g", &b.comp_g},
          {"idx_q", &b.idx_q},   {"idx_w", &b.idx_w},         {"idx_a", &b.idx_a},
          {"idx_g", &b.idx_g},   {"topk", &b.topk},           {"attn_o", &b.attn_o},
          {"z", &b.z},           {"attn_out", &b.attn_out},   {"router_w", &b.router_w},
          {"router_ids", &b.router_ids}, {"slot_out", &b.slot_out}, {"routed", &b.routed},
          {"shared_out", &b.shared_out}, {"moe_out", &b.moe_out}, {"head_X", &b.head_X, true},
          {"head_y", &b.head_y, true},   {"head_yn", &b.head_yn, true}, {"logits", &b.logits, true}};
}

// Where a CUDA generation first leaves the CPU's model of its arithmetic. Both
// backends generate eagerly (graph replay == eager is its own test) under a stage
// observer. The CPU keeps, for every stage, the bytes of each step buffer the
// stage changed. The CUDA run compares at the same stage and prints each buffer
// that differs, then takes the CPU's bytes, so that a later line is a new
// difference, not one carried along. Caches are not compared (the CPU keeps KV
// rows as bf16, the GPU as 584-byte FP8 rows): a cache row that differs shows in
// the attention output of a later stage or step, and stays different.
class DivergenceLocator {
 public:
  DivergenceLocator(engine::ModelRunner& cpu, engine::ModelRunner& cuda) : cpu_(cpu), cuda_(cuda) {}

  // Call around a CPU generation, then around a CUDA generation of the same requests.
  void record() {
    cpu_.set_stage_observer([this](const engine::StepMetadata& m, const model::Stage& st, bool after) {
      Snapshot now = snapshot(cpu_, m);
      if (!after) {
        before_ = std::move(now);
        return;
      }
      Record rec;
      rec.stage = st.name;
      for (size_t i = 0; i < now.buffers.size(); ++i)
        if (now.buffers[i] != before_.buffers[i]) rec.buffers.emplace_back(i, std::move(now.buffers[i]));
      records_.push_back(std::move(rec));
    });
  }

  void compare(size_t max_lines = 40) {
    cpu_.set_stage_observer(nullptr);
    next_ = 0, step_ = 0, lines_ = 0;
    differences_.clear();
    cuda_.set_stage_observer([this, max_lines](const engine::StepMetadata& m, const model::Stage& st, bool after) {
      if (st.name == "embed" && !after) ++step_;
      Snapshot now = snapshot(cuda_, m);
      if (!after) {
        before_ = std::move(now);
        return;
      }
      ASSERT_LT(next_, records_.size()) << "the CUDA run has more stages than the CPU run";
      const Record& rec = records_[next_++];
      ASSERT_EQ(rec.stage, st.name) << "stage " << next_ - 1 << " differs in name";
      auto bufs = step_buffers(cuda_.buffers());
      auto say = [&](const std::string& what) {
        if (lines_++ < max_lines)
          std::printf("step %zu (%d tokens, first at position %d): %s %s\n", step_, m.num_tokens(),
                      m.positions.empty() ? -1 : m.positions[0], st.name.c_str(), what.c_str());
      };
      std::vector<bool> cpu_wrote(bufs.size(), false);
      for (const auto& [i, ref] : rec.buffers) {
        cpu_wrote[i] = true;
        if (now.buffers[i] == ref) continue;
        differences_.push_back(st.name + " " + bufs[i].name);
        say(describe(bufs[i], now.buffers[i], ref, m));
        const core::Tensor rows = valid_rows(bufs[i], m);
        cuda_.backend().upload(rows, ref.data(), ref.size());  // continue from the CPU's values
      }
      for (size_t i = 0; i < bufs.size(); ++i)
        if (!cpu_wrote[i] && now.buffers[i] != before_.buffers[i] && cuda_only_.insert(bufs[i].name).second)
          say(std::string("wrote ") + bufs[i].name + ", which the CPU stage did not (not compared)");
    });
  }

  void stop() {
    cpu_.set_stage_observer(nullptr);
    cuda_.set_stage_observer(nullptr);
  }
  size_t lines() const { return lines_; }
  // "stage buffer" of each difference, in order (also those past the printed lines).
  const std::vector<std::string>& differences() const { return differences_; }

 private:
  struct Snapshot {
    std::vector<Bytes> buffers;  // valid rows of every step buffer
  };
  struct Record {
    std::string stage;
    std::vector<std::pair<size_t, Bytes>> buffers;  // those the stage changed
  };

  static core::Tensor valid_rows(const StepBuffer& b, const engine::StepMetadata& m) {
    const int64_t n = b.per_logit_row ? int64_t(m.logit_rows.size()) : m.num_tokens();
    return b.tensor->rows(0, std::min(n, b.tensor->size(0)));
  }

  static Snapshot snapshot(engine::ModelRunner& r, const engine::StepMetadata& m) {
    Snapshot s;
    for (const StepBuffer& b : step_buffers(r.buffers())) {
      const core::Tensor t = valid_rows(b, m);
      s.buffers.emplace_back(t.nbytes());
      r.backend().download(s.buffers.back().data(), t, t.nbytes());
    }
    return s;
  }

  static std::string describe(const StepBuffer& b, const Bytes& got, const Bytes& ref, const engine::StepMetadata& m) {
    const core::DType dt = b.tensor->dtype();
    const size_t es = core::dtype_size(dt), n = ref.size() / es;
    const int64_t nrows = valid_rows(b, m).size(0);
    const size_t per_row = nrows > 0 ? n / size_t(nrows) : 1;
    auto value = [&](const Bytes& v, size_t i) -> double {
      if (dt == core::DType::kF32) { float f; std::memcpy(&f, &v[4 * i], 4); return f; }
      if (dt == core::DType::kBF16) { uint16_t h; std::memcpy(&h, &v[2 * i], 2); return core::bf16_to_float(h); }
      if (dt == core::DType::kI32) { int32_t x; std::memcpy(&x, &v[4 * i], 4); return x; }
      return v[i * es];
    };
    size_t differ = 0, worst_i = 0;
    double worst = -1;
    std::set<size_t> rows;
    for (size_t i = 0; i < n; ++i) {
      if (std::memcmp(&got[i * es], &ref[i * es], es) == 0) continue;
      ++differ;
      rows.insert(i / per_row);
      const double d = std::abs(value(got, i) - value(ref, i));
      if (!(d <= worst)) worst = d, worst_i = i;
    }
    std::string row_list;
    for (size_t r : rows) {
      if (row_list.size() > 40) { row_list += " ..."; break; }
      if (!row_list.empty()) row_list += ',';
      row_list += std::to_string(r);
    }
    char buf[320];
    std::snprintf(buf, sizeof buf,
                  "%s: %zu of %zu elements differ in rows {%s}; largest |cuda - cpu| %.3g at row %zu element %zu "
                  "(cpu %.9g, cuda %.9g)",
                  b.name, differ, n, row_list.c_str(), worst, worst_i / per_row, worst_i % per_row,
                  value(ref, worst_i), value(got, worst_i));
    return buf;
  }

  engine::ModelRunner& cpu_;
  engine::ModelRunner& cuda_;
  Snapshot before_;
  std::vector<Record> records_;
  size_t next_ = 0, step_ = 0, lines_ = 0;
  std::set<std::string> cuda_only_;
  std::vector<std::string> differences_;
};

}  // namespace dsv4::testing
