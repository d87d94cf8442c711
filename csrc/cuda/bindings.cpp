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

// A launch's keyword arguments, read by name: a missing one raises a
// TypeError that names it, and so does one left over, so a misspelt name
// never passes unread.
class Keywords {
 public:
  Keywords(const py::kwargs& kw, const char* fn) : kw_(kw), fn_(fn) {}

  template <typename T>
  T get(const char* name) {
    TORCH_CHECK_TYPE(kw_.contains(name), fn_, "() missing keyword argument '", name, "'");
    ++read_;
    return kw_[name].cast<T>();
  }
  // A device scalar (tensor lr, grad_scale, found_inf), or nullptr for None.
  const float* scalar(const char* name) { return opt_ptr(get<std::optional<at::Tensor>>(name)); }
  void check_all_read() const {
    TORCH_CHECK_TYPE(read_ == kw_.size(), fn_, "() got ", kw_.size() - read_, " unexpected keyword argument(s)");
  }

 private:
  const py::kwargs& kw_;
  const char* fn_;
  size_t read_ = 0;
};

// What every family's launch takes (braced initialisation reads them in order).
ftc::StepArgs step_args(Keywords& k) {
  return {k.get<double>("lr"), k.scalar("lr_tensor"), k.get<double>("grad_mul"), k.get<double>("avg_coef"),
          k.scalar("grad_scale"), k.scalar("found_inf"), k.get<bool>("average"),
          to_dtype(k.get<at::ScalarType>("param_dtype")), to_dtype(k.get<at::ScalarType>("state_dtype")),
          k.get<bool>("master"), k.get<bool>("stochastic_rounding"),
          static_cast<uint32_t>(k.get<int64_t>("round_key"))};
}

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "fasttricks ", kernel, " kernel: ", cudaGetErrorString(err));
}

// Each family's arguments, read by keyword.
ftc::AdamArgs adam_args(Keywords& k) {
  const ftc::StepArgs common = step_args(k);
  const double beta1 = k.get<double>("beta1"), beta2 = k.get<double>("beta2");
  return {common, 1.0 - beta1, 1.0 - beta2, k.get<double>("eps"), k.get<double>("weight_decay"),
          k.get<bool>("amsgrad"), k.get<bool>("decoupled")};
}

ftc::SgdArgs sgd_args(Keywords& k) {
  const ftc::StepArgs common = step_args(k);
  const double momentum = k.get<double>("momentum");
  return {common, k.get<double>("weight_decay"), momentum, k.get<double>("dampening"), momentum != 0.0,
          k.get<bool>("nesterov"), k.get<bool>("decoupled")};
}

// One optimizer step over a packed table (fasttricks/ops/_device.py), the table
// by position and the rest by keyword, named as the Triton launches of
// fasttricks/kernels/ name them; bound once per family (adam_step, sgd_step).
template <typename Args, Args (*read)(Keywords&), cudaError_t (*launch)(const ftc::Tables&, const Args&, cudaStream_t)>
void optim_step(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& chunk_tensor,
                const at::Tensor& chunk_start, int64_t n_tensors, const py::kwargs& kwargs) {
  Keywords k(kwargs, "optimizer_step");
  const Args a = read(k);
  k.check_all_read();
  const c10::cuda::CUDAGuard guard(ptrs.device());
  check_launch(launch(make_tables(ptrs, numels, chunk_tensor, chunk_start, n_tensors), a,
                      c10::cuda::getCurrentCUDAStream()), "optimizer");
}

void norm_partials(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& chunk_tensor,
                   const at::Tensor& chunk_start, int64_t n_tensors, const py::kwargs& kwargs) {
  Keywords k(kwargs, "norm_partials");
  const auto out = k.get<at::Tensor>("out");
  const auto grad_dtype = k.get<at::ScalarType>("grad_dtype");
  const bool inf = k.get<bool>("inf");
  const int grad_row = static_cast<int>(k.get<int64_t>("grad_row"));
  k.check_all_read();
  const ftc::Tables tables = make_tables(ptrs, numels, chunk_tensor, chunk_start, n_tensors);
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.numel() >= tables.n_chunks &&
                  out.scalar_type() == (grad_dtype == at::kDouble ? at::kDouble : at::kFloat),
              "norm_partials: out must be a contiguous CUDA tensor of one fp32 (fp64 for fp64 grads) per chunk");
  const c10::cuda::CUDAGuard guard(ptrs.device());
  check_launch(ftc::launch_norm_partials(tables, grad_row, to_dtype(grad_dtype), inf, out.data_ptr(),
                                         c10::cuda::getCurrentCUDAStream()), "norm");
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
  check_launch(err, "mixup");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fasttricks fused CUDA kernels (multi-tensor, pointer tables)";
  m.def("adam_step", &optim_step<ftc::AdamArgs, adam_args, ftc::launch_adam>, py::arg("ptrs"), py::arg("numels"),
        py::arg("chunk_tensor"), py::arg("chunk_start"), py::arg("n_tensors"), "Adam/AdamW over a packed table; hyper-parameters and switches by keyword");
  m.def("sgd_step", &optim_step<ftc::SgdArgs, sgd_args, ftc::launch_sgd>, py::arg("ptrs"), py::arg("numels"),
        py::arg("chunk_tensor"), py::arg("chunk_start"), py::arg("n_tensors"), "SGD/SGDW over a packed table; hyper-parameters and switches by keyword");
  m.def("norm_partials", &norm_partials, py::arg("ptrs"), py::arg("numels"), py::arg("chunk_tensor"),
        py::arg("chunk_start"), py::arg("n_tensors"),
        "Per-chunk sums of squares (or largest |x|) of a packed table's grad row; out, grad_dtype, inf, grad_row "
        "by keyword");
  m.def("mixup_blend_rows", &mixup_blend_rows, py::arg("x"), py::arg("out"), py::arg("lam"),
        py::arg("perm") = py::none());
}
