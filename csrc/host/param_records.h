// Host records of a step, apart from the kernels: one param's gathered
// pointers, the scratch of non-contiguous tensors, the checks of a grad and
// a state tensor against their param, found_inf / grad_scale, step counters.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/core/GradMode.h>

#include <optional>
#include <utility>
#include <vector>

namespace fasttricks {
namespace cpu {

// Inline loops, not IntArrayRef::equals: that calls memcmp, which was a
// tenth of a small step's host time.
inline bool same_ints(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}


// Most per-param state lists a tensor table holds (Adam: exp_avg, exp_avg_sq,
// max_exp_avg_sq, master, running average).
constexpr int kMaxSlots = 5;

// One parameter's memory for one step, as the kernels see it: flat runs of
// `numel` elements in the same order for all of them (NOTE [tensor table] in
// tensor_table.h). Raw pointers, not tensors: copying tensor handles costs
// atomics (and a vector, a malloc) per parameter, which was most of the host
// overhead of a step (docs/performance.md: <= 20 us for 161 tiny tensors).
struct Gathered {
  Gathered() {}               // left uninitialised: TensorTable::gather fills every row it keeps
  int64_t index;              // position in the plan
  int64_t numel;
  void* param;                // the param as written by the kernel
  const void* grad;
  void* slots[kMaxSlots];     // state lists in the table's order (nullptr where unused)
};

// What a step must keep alive and copy back: tensors whose layouts differ
// (e.g. a channels-last param with a contiguous grad) go through contiguous
// temporaries.
struct Scratch {
  std::vector<at::Tensor> keep;                              // temporaries read by the kernel
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback;  // (destination, temporary)

  void* writable(const at::Tensor& t) {
    at::Tensor c = t.contiguous();
    void* ptr = c.mutable_data_ptr();
    if (!c.is_same(t)) writeback.emplace_back(t, std::move(c));
    return ptr;
  }
  const void* readable(const at::Tensor& t) {
    keep.push_back(t.contiguous());
    return keep.back().const_data_ptr();
  }
  void apply() {
    c10::AutoGradMode no_grad(false);  // dst may be a leaf param that requires grad
    for (auto& [dst, tmp] : writeback) dst.copy_(tmp);
  }
};

// The checks every backend makes of a grad, and of a state tensor, against its
// param (the CPU plans and the device tables add their own device checks).
inline void check_grad_like_param(const char* op, const at::Tensor& param, const at::Tensor& grad) {
  TORCH_CHECK(!grad.is_sparse(), op,
              " does not support sparse gradients; use torch.optim.SparseAdam or a dense gradient");
  TORCH_CHECK_TYPE(grad.scalar_type() == param.scalar_type(), op, ": gradient dtype ",
                   grad.scalar_type(), " differs from parameter dtype ", param.scalar_type());
  TORCH_CHECK(same_ints(grad.sizes(), param.sizes()), op, ": gradient shape ", grad.sizes(),
              " differs from parameter shape ", param.sizes());
}

inline void check_state_like_param(const char* op, const char* what, const at::Tensor& state,
                                   const at::Tensor& param, at::ScalarType state_dtype) {
  TORCH_CHECK_TYPE(state.scalar_type() == state_dtype, op, ": ", what, " dtype ", state.scalar_type(),
                   " differs from the expected ", state_dtype);
  TORCH_CHECK(same_ints(state.sizes(), param.sizes()), op, ": ", what, " shape ", state.sizes(),
              " differs from parameter shape ", param.sizes());
}

// found_inf / grad_scale follow torch's fused optimizers (GradScaler sets them).
inline bool found_inf_set(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0.0;
}

inline double inv_grad_scale(const std::optional<at::Tensor>& grad_scale) {
  if (!grad_scale.has_value() || !grad_scale->defined()) return 1.0;
  return 1.0 / grad_scale->item<double>();
}

// Optimizer step counts live in 0-dim float32 (or float64) CPU tensors, one
// per param (torch's state_dict layout). Checked once, when the plan is built
// (NOTE [plan cache]), so a step never fails halfway through counting.
class StepCounter {
 public:
  explicit StepCounter(const at::Tensor& step) : dbl_(step.scalar_type() == at::kDouble) {
    TORCH_CHECK_TYPE(dbl_ || step.scalar_type() == at::kFloat,
                     "optimizer step must be a float32 or float64 tensor, got ", step.scalar_type());
    TORCH_CHECK(step.device().is_cpu() && step.numel() == 1,
                "optimizer step must be a one-element CPU tensor on the cpu backend");
    ptr_ = step.mutable_data_ptr();
  }
  double bump() const { return dbl_ ? ++*static_cast<double*>(ptr_) : ++*static_cast<float*>(ptr_); }
  const void* address() const { return ptr_; }

 private:
  void* ptr_;
  bool dbl_;
};

}  // namespace cpu
}  // namespace fasttricks
