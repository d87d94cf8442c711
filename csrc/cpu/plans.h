// A plan holds references to one (device, dtype) bucket of parameters and
// their optimizer state, built once by the Python optimizer and reused every
// step: the step reads each parameter's .grad in C++, so the per-step host
// cost is one call with scalars (docs/performance.md: <= 20 us for 161 tiny tensors).
//
// NOTE [plan cache] (fasttricks/optim/_plan_cache.py, docs/architecture.md)
// The state tensors (and attached averages) belong to the plan: the Python
// optimizer rebuilds its plans whenever any of them is replaced, and samplers
// load averages in place. So their dtype, shape,
// layout and memory are checked once, when the plan is built, and a step
// reads only the param, its grad and the cached pointers. Whatever a step
// cannot vouch for (a param whose layout no longer matches the one recorded,
// a state tensor that did not match to begin with) takes the full per-step
// check, which raises before anything is written.
#pragma once
#include "multi_tensor.h"

#include <optional>

namespace fasttricks {
namespace cpu {

// One group's hyper-parameters for one step: fasttricks.ops.adam.AdamHyper and
// fasttricks.ops.sgd.SgdHyper, read field by field by name (module.cpp; the
// field lists are exported as ADAM_HYPER_FIELDS / SGD_HYPER_FIELDS and tested).
struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool maximize;
  double grad_mul;
};

struct SgdHyper {
  double lr, weight_decay, momentum, dampening;
  bool maximize;
  double grad_mul;
};

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
    TORCH_CHECK(slots_.size() <= static_cast<size_t>(kMaxSlots), op_, " plan: too many state lists");
    for (const auto& s : slots_) {
      TORCH_CHECK(s.empty() || s.size() == params_.size(), op_, " plan: state list length mismatch");
    }
    // The last slot is the fp32 master copy; present means fp32 state.
    state_dtype_ = slots_.back().empty() ? param_dtype_ : at::kFloat;
    refresh_cache();
  }

  void set_averages(std::vector<at::Tensor> averages) {
    TORCH_CHECK(averages.empty() || averages.size() == params_.size(), op_,
                ": one average per parameter (or none)");
    averages_ = std::move(averages);
    refresh_cache();
  }
  int64_t size() const { return static_cast<int64_t>(params_.size()); }
  // Raises what this step's gather would raise, and writes nothing: an
  // optimizer with several plans checks them all before stepping any.
  void check() const {
    Scratch scratch;
    gather(scratch);
  }

 protected:
  // The parameters that have a grad, validated; nothing is written here.
  std::vector<Gathered> gather(Scratch& scratch) const {
    std::vector<Gathered> out;
    out.reserve(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& p = params_[i];
      const at::Tensor& g = p.grad();
      if (!g.defined()) continue;
      TORCH_CHECK_TYPE(p.scalar_type() == param_dtype_, op_, ": parameter dtype changed from ",
                       param_dtype_, " to ", p.scalar_type(), " after the optimizer state was created");
      const ParamCache& c = cache_[i];
      if (c.fast && !g.is_sparse() && g.device().is_cpu() && p.device().is_cpu() &&
          g.scalar_type() == p.scalar_type() && p.is_non_overlapping_and_dense() &&
          same_ints(p.sizes(), {layout_.data() + c.layout, size_t(c.dim)}) &&
          same_ints(p.strides(), {layout_.data() + c.layout + c.dim, size_t(c.dim)}) &&
          same_ints(g.sizes(), p.sizes()) && same_ints(g.strides(), p.strides())) {
        Gathered row{static_cast<int64_t>(i), p.numel(), p.mutable_data_ptr(), g.const_data_ptr(), {}, c.avg};
        std::copy(std::begin(c.slots), std::end(c.slots), row.slots);
        out.push_back(row);
        continue;
      }
      const at::Tensor* slots[kMaxSlots];
      for (size_t k = 0; k < slots_.size(); ++k) slots[k] = slots_[k].empty() ? nullptr : &slots_[k][i];
      out.push_back(gather_one(op_, static_cast<int64_t>(i), p, g, slots, static_cast<int>(slots_.size()),
                               averages_.empty() ? nullptr : &averages_[i], state_dtype_, scratch));
    }
    return out;
  }

  // NOTE [plan cache]: call whenever the state tensors or averages change.
  void refresh_cache() {
    cache_.assign(params_.size(), ParamCache{});
    layout_.clear();
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& p = params_[i];
      ParamCache& c = cache_[i];
      c.layout = static_cast<int64_t>(layout_.size());
      c.dim = p.dim();
      layout_.insert(layout_.end(), p.sizes().begin(), p.sizes().end());
      layout_.insert(layout_.end(), p.strides().begin(), p.strides().end());
      auto matches = [&](const at::Tensor& t) {
        return t.scalar_type() == state_dtype_ && same_ints(t.sizes(), p.sizes()) &&
               same_ints(t.strides(), p.strides());
      };
      c.fast = p.is_non_overlapping_and_dense();
      for (size_t k = 0; k < slots_.size(); ++k) {
        if (slots_[k].empty()) continue;
        const at::Tensor& t = slots_[k][i];
        c.fast = c.fast && matches(t);
        c.slots[k] = t.mutable_data_ptr();
      }
      if (!averages_.empty()) {
        c.fast = c.fast && matches(averages_[i]);
        c.avg = averages_[i].mutable_data_ptr();
      }
    }
  }

  bool has_averages() const { return !averages_.empty(); }
  at::ScalarType param_dtype() const { return param_dtype_; }
  at::ScalarType state_dtype() const { return state_dtype_; }

  const char* op_;
  std::vector<at::Tensor> params_;
  std::vector<std::vector<at::Tensor>> slots_;
  std::vector<at::Tensor> averages_;
  at::ScalarType param_dtype_, state_dtype_;

 private:
  struct ParamCache {
    bool fast = false;            // the state tensors share the param's dtype-checked dense layout
    int64_t layout = 0, dim = 0;  // the param's recorded sizes and strides: layout_[layout, +2 dim)
    void* slots[kMaxSlots] = {};
    void* avg = nullptr;
  };
  std::vector<ParamCache> cache_;
  std::vector<int64_t> layout_;
};

class AdamPlan : public PlanBase {
 public:
  AdamPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> steps,
           std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
           std::vector<at::Tensor> max_exp_avg_sqs, std::vector<at::Tensor> masters, bool amsgrad,
           bool decoupled);
  // Returns the number of parameters updated, or -1 when found_inf skipped the step.
  int64_t step(const AdamHyper& h, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, double avg_coef);

 private:
  std::vector<at::Tensor> steps_;  // kept alive for counters_
  std::vector<StepCounter> counters_;
  bool amsgrad_, decoupled_;
};

class SgdPlan : public PlanBase {
 public:
  SgdPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> momentum_buffers,
          std::vector<at::Tensor> masters, std::vector<bool> first_step, bool nesterov,
          bool decoupled);
  int64_t step(const SgdHyper& h, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, double avg_coef);
  std::vector<bool> first_step_flags() const;

 private:
  std::vector<uint8_t> first_step_;
  bool momentum_, nesterov_, decoupled_;
};

}  // namespace cpu
}  // namespace fasttricks
