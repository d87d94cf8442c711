// A plan holds references to one (device, dtype) bucket of parameters and
// their optimizer state, built once by the Python optimizer and reused every
// step: the step reads each parameter's .grad in C++, so the per-step host
// cost is one call with scalars (SPEC: <= 20 us for 161 tiny tensors).
#pragma once
#include "multi_tensor.h"

#include <optional>

namespace fasttricks {
namespace cpu {

class PlanBase {
 public:
  PlanBase(const char* op, std::vector<at::Tensor> params,
           std::vector<std::vector<at::Tensor>> slots)
      : op_(op), params_(std::move(params)), slots_(std::move(slots)) {
    TORCH_CHECK(!params_.empty(), op_, " plan: no parameters");
    param_dtype_ = params_[0].scalar_type();
    for (const auto& p : params_) {
      TORCH_CHECK(p.device().is_cpu(), op_, ": the cpu backend needs CPU parameters, got ", p.device());
      TORCH_CHECK_TYPE(p.scalar_type() == param_dtype_, op_, " plan: mixed parameter dtypes");
    }
    for (const auto& s : slots_) {
      TORCH_CHECK(s.empty() || s.size() == params_.size(), op_, " plan: state list length mismatch");
    }
    // The last slot is the fp32 master copy; present means fp32 state.
    state_dtype_ = slots_.back().empty() ? param_dtype_ : at::kFloat;
  }

  void set_averages(std::vector<at::Tensor> averages) {
    TORCH_CHECK(averages.empty() || averages.size() == params_.size(), op_,
                ": one average per parameter (or none)");
    averages_ = std::move(averages);
  }
  int64_t size() const { return static_cast<int64_t>(params_.size()); }

 protected:
  std::vector<Gathered> gather(std::vector<std::pair<at::Tensor, at::Tensor>>& writeback) const {
    std::vector<Gathered> out;
    out.reserve(params_.size());
    std::vector<at::Tensor> slots(slots_.size());
    const at::Tensor none;
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& p = params_[i];
      const at::Tensor& g = p.grad();
      if (!g.defined()) continue;
      TORCH_CHECK_TYPE(p.scalar_type() == param_dtype_, op_, ": parameter dtype changed from ",
                       param_dtype_, " to ", p.scalar_type(), " after the optimizer state was created");
      for (size_t k = 0; k < slots_.size(); ++k) slots[k] = slots_[k].empty() ? none : slots_[k][i];
      out.push_back(gather_one(op_, static_cast<int64_t>(i), p, g, slots,
                               averages_.empty() ? none : averages_[i], state_dtype_, writeback));
    }
    return out;
  }
  bool has_averages() const { return !averages_.empty(); }
  at::ScalarType param_dtype() const { return param_dtype_; }
  at::ScalarType state_dtype() const { return state_dtype_; }

  const char* op_;
  std::vector<at::Tensor> params_;
  std::vector<std::vector<at::Tensor>> slots_;
  std::vector<at::Tensor> averages_;
  at::ScalarType param_dtype_, state_dtype_;
};

class AdamPlan : public PlanBase {
 public:
  AdamPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> steps,
           std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
           std::vector<at::Tensor> max_exp_avg_sqs, std::vector<at::Tensor> masters, bool amsgrad,
           bool decoupled);
  // Returns the number of parameters updated, or -1 when found_inf skipped the step.
  int64_t step(double lr, double beta1, double beta2, double eps, double weight_decay,
               bool maximize, double grad_mul, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, double avg_coef);

 private:
  std::vector<at::Tensor> steps_;
  bool amsgrad_, decoupled_;
};

class SgdPlan : public PlanBase {
 public:
  SgdPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> momentum_buffers,
          std::vector<at::Tensor> masters, std::vector<bool> first_step, bool nesterov,
          bool decoupled);
  int64_t step(double lr, double weight_decay, double momentum, double dampening, bool maximize,
               double grad_mul, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, double avg_coef);
  std::vector<bool> first_step_flags() const;

 private:
  std::vector<uint8_t> first_step_;
  bool momentum_, nesterov_, decoupled_;
};

}  // namespace cpu
}  // namespace fasttricks
