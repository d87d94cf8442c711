// A plan holds references to one (device, dtype) bucket of parameters and
// their optimizer state, built once by the Python optimizer and reused every
// step: the step reads each parameter's .grad in C++, so the per-step host
// cost is one call with a hyper-parameter record (docs/performance.md: <= 20 us
// for 161 tiny tensors). Its tensors live in a TensorTable (NOTE [tensor table]).
#pragma once
#include "fasttricks/rounding.h"
#include "tensor_table.h"

#include <optional>

namespace fasttricks {
namespace cpu {

// One group's hyper-parameters for one step: fasttricks.ops.adam.AdamHyper and
// fasttricks.ops.sgd.SgdHyper, read field by field in the order module.cpp
// exports as ADAM_HYPER_FIELDS / SGD_HYPER_FIELDS (tested against the records).
struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool maximize;
  double grad_mul;
  uint32_t round_key;  // NOTE [stochastic rounding]: the step's key
};

struct SgdHyper {
  double lr, weight_decay, momentum, dampening;
  bool maximize;
  double grad_mul;
  uint32_t round_key;
};

// The CPU plans' common part: the table of params, state slots and, in the
// last slot, the running averages of a fused sampler (empty when none).
class PlanBase {
 public:
  // `slots`: the family's state lists; the last is the fp32 master copy.
  // `rounding`: the params' keys of stochastic rounding (NOTE [stochastic
  // rounding]), used when `stochastic_rounding`.
  PlanBase(const char* op, std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> slots,
           std::vector<int64_t> rounding, bool stochastic_rounding)
      : table_(make_table(op, std::move(params), std::move(slots), stochastic_rounding)),
        rounding_(std::move(rounding)), stochastic_rounding_(stochastic_rounding) {
    TORCH_CHECK(!stochastic_rounding_ || rounding_.size() == table_.size(), op,
                " plan: one rounding key per parameter");
  }

  void set_averages(std::vector<at::Tensor> averages) { table_.set_slot(table_.n_slots() - 1, std::move(averages)); }
  int64_t size() const { return static_cast<int64_t>(table_.size()); }
  // Raises what this step's gather would raise, and writes nothing: an
  // optimizer with several plans checks them all before stepping any.
  void check() const {
    Scratch scratch;
    table_.gather(scratch);
  }

 protected:
  std::vector<Gathered> gather(Scratch& scratch) const { return table_.gather(scratch); }
  bool has_averages() const { return table_.has_slot(table_.n_slots() - 1); }
  size_t average_slot() const { return table_.n_slots() - 1; }
  bool has_slot(size_t k) const { return table_.has_slot(k); }
  at::ScalarType param_dtype() const { return table_.param_dtype(); }
  at::ScalarType state_dtype() const { return table_.slot_dtype(0); }
  bool has_master() const { return table_.has_slot(table_.n_slots() - 2); }
  // The key of a param's random bits this step (NOTE [stochastic rounding]).
  uint32_t tensor_key(uint32_t step_key, int64_t index) const {
    return stochastic_rounding_ ? rounding::tensor_key(step_key, rounding_[index]) : 0;
  }

  TensorTable table_;
  std::vector<int64_t> rounding_;
  bool stochastic_rounding_;

 private:
  // Slot dtypes (docs/precision.md): the state lists share the dtype of
  // their first tensor (fp32 with a master copy, the param's without, when
  // all are empty); the master copy is fp32; the averages are fp32 for 16-bit
  // params with a master copy or stochastic rounding, else the param's dtype.
  static TensorTable make_table(const char* op, std::vector<at::Tensor> params,
                                std::vector<std::vector<at::Tensor>> slots, bool stochastic_rounding) {
    TORCH_CHECK(!params.empty() && !slots.empty(), op, " plan: no parameters");
    for (const auto& p : params) {
      TORCH_CHECK(p.device().is_cpu(), op, ": the cpu backend needs CPU parameters, got ", p.device());
    }
    const at::ScalarType p_dtype = params[0].scalar_type();
    const bool master = !slots.back().empty();
    at::ScalarType state_dtype = master ? at::kFloat : p_dtype;
    for (size_t k = 0; k + 1 < slots.size(); ++k) {
      if (!slots[k].empty()) {
        state_dtype = slots[k][0].scalar_type();
        break;
      }
    }
    TORCH_CHECK_TYPE(!master || state_dtype == at::kFloat, op, ": master weights need fp32 state");
    const bool low = p_dtype == at::kBFloat16 || p_dtype == at::kHalf;
    std::vector<at::ScalarType> dtypes(slots.size(), state_dtype);
    dtypes.back() = at::kFloat;  // the master copy
    dtypes.push_back(low && (master || stochastic_rounding) ? at::kFloat : p_dtype);
    slots.emplace_back();  // the running averages
    return TensorTable(op, std::move(params), std::move(slots), std::move(dtypes));
  }
};

class AdamPlan : public PlanBase {
 public:
  AdamPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> steps,
           std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
           std::vector<at::Tensor> max_exp_avg_sqs, std::vector<at::Tensor> masters, bool amsgrad,
           bool decoupled, std::vector<int64_t> rounding, bool stochastic_rounding);
  // Returns the number of parameters updated, or -1 when found_inf skipped the step.
  int64_t step(const AdamHyper& h, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, double avg_coef);

 private:
  std::vector<at::Tensor> steps_;  // kept alive for counters_
  std::vector<StepCounter> counters_;
  bool distinct_counters_;  // no two params share a step tensor: the counters bump in parallel
  bool amsgrad_, decoupled_;
};

class SgdPlan : public PlanBase {
 public:
  SgdPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> momentum_buffers,
          std::vector<at::Tensor> masters, std::vector<bool> first_step, bool nesterov,
          bool decoupled, std::vector<int64_t> rounding, bool stochastic_rounding);
  int64_t step(const SgdHyper& h, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, double avg_coef);
  std::vector<bool> first_step_flags() const;

 private:
  std::vector<uint8_t> first_step_;
  bool momentum_, nesterov_, decoupled_;
};

}  // namespace cpu
}  // namespace fasttricks
