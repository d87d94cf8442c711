// torch binding of the CUDA kernels (fasttricks._C_cuda). Built only where
// torch has CUDA; the kernels themselves are in optim_kernels.cu.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>

#include "launch.h"

namespace ftc = fasttricks::cuda;

namespace {

ftc::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ftc::DType::kFloat;
    case at::kDouble: return ftc::DType::kDouble;
    case at::kBFloat16: return ftc::DType::kBFloat16;
    case at::kHalf: return ftc::DType::kHalf;
    case at::kByte: return ftc::DType::kByte;
    default: TORCH_CHECK_TYPE(false, "fasttricks cuda backend: unsupported dtype ", t);
  }
}

ftc::Tables make_tables(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& chunk_tensor,
                        const at::Tensor& chunk_start, int64_t n_tensors) {
  TORCH_CHECK(ptrs.is_cuda() && ptrs.scalar_type() == at::kLong, "pointer table must be int64 on CUDA");
  return {ptrs.data_ptr<int64_t>(), numels.data_ptr<int64_t>(), chunk_tensor.data_ptr<int64_t>(),
          chunk_start.data_ptr<int64_t>(), n_tensors, chunk_tensor.numel()};
}

const float* opt_ptr(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat, "scalar tensors must be float32 on CUDA");
  return t->data_ptr<float>();
}

void adam_step(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& chunk_tensor,
               const at::Tensor& chunk_start, int64_t n_tensors, at::ScalarType param_dtype,
               at::ScalarType state_dtype, double lr, const std::optional<at::Tensor>& lr_tensor,
               double beta1, double beta2, double eps, double weight_decay, double grad_mul,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               double avg_coef, bool amsgrad, bool decoupled, bool average, bool master, bool stochastic_rounding,
               int64_t round_key) {
  const c10::cuda::CUDAGuard guard(ptrs.device());
  ftc::AdamArgs a{lr, opt_ptr(lr_tensor), 1.0 - beta1, 1.0 - beta2, eps, weight_decay,
                  grad_mul, avg_coef, opt_ptr(grad_scale), opt_ptr(found_inf), amsgrad,
                  decoupled, average, to_dtype(param_dtype), to_dtype(state_dtype), master, stochastic_rounding,
                  static_cast<uint32_t>(round_key)};
  const auto err = ftc::launch_adam(make_tables(ptrs, numels, chunk_tensor, chunk_start, n_tensors), a,
                                    c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fasttricks adam kernel: ", cudaGetErrorString(err));
}

void sgd_step(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& chunk_tensor,
              const at::Tensor& chunk_start, int64_t n_tensors, at::ScalarType param_dtype,
              at::ScalarType state_dtype, double lr, const std::optional<at::Tensor>& lr_tensor,
              double weight_decay, double momentum, double dampening, double grad_mul,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
              double avg_coef, bool nesterov, bool decoupled, bool average, bool master, bool stochastic_rounding,
              int64_t round_key) {
  const c10::cuda::CUDAGuard guard(ptrs.device());
  ftc::SgdArgs a{lr, opt_ptr(lr_tensor), weight_decay, momentum, dampening,
                 grad_mul, avg_coef, opt_ptr(grad_scale), opt_ptr(found_inf), momentum != 0.0,
                 nesterov, decoupled, average, to_dtype(param_dtype), to_dtype(state_dtype), master,
                 stochastic_rounding, static_cast<uint32_t>(round_key)};
  const auto err = ftc::launch_sgd(make_tables(ptrs, numels, chunk_tensor, chunk_start, n_tensors), a,
                                   c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fasttricks sgd kernel: ", cudaGetErrorString(err));
}

void mixup_blend_rows(const at::Tensor& x, const at::Tensor& out, const at::Tensor& lam,
                      const std::optional<at::Tensor>& perm) {
  TORCH_CHECK(x.is_cuda() && out.is_cuda() && lam.is_cuda(), "mixup: the cuda backend needs CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.is_contiguous() && x.sizes() == out.sizes(),
              "mixup: rows must be contiguous [B, D] views of the same shape");
  TORCH_CHECK(lam.scalar_type() == at::kFloat && lam.numel() == x.size(0), "mixup: lam must be float32 [B]");
  TORCH_CHECK(!perm.has_value() || (perm->scalar_type() == at::kLong && perm->numel() == x.size(0)),
              "mixup: perm must be int64 [B]");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto err = ftc::launch_mixup(x.data_ptr(), out.data_ptr(), lam.data_ptr<float>(),
                                     perm.has_value() ? perm->data_ptr<int64_t>() : nullptr, x.size(0), x.size(1),
                                     to_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fasttricks mixup kernel: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fasttricks fused CUDA kernels (multi-tensor, pointer tables)";
  m.def("adam_step", &adam_step);
  m.def("sgd_step", &sgd_step);
  m.def("mixup_blend_rows", &mixup_blend_rows, py::arg("x"), py::arg("out"), py::arg("lam"),
        py::arg("perm") = py::none());
}
