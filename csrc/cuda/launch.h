// Interface between the torch binding (bindings.cpp) and the plain-CUDA
// kernels (optim_kernels.cu). No torch headers: the .cu compiles with nvcc
// alone (docs/architecture.md), so CI checks it on machines whose torch has no CUDA.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "fasttricks/table.h"

namespace fasttricks {
namespace cuda {

enum class DType : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3, kByte = 4 };

// NOTE [pointer table] (fasttricks/table.h): ptrs[row * n_tensors + t],
// numels[t], and one block per chunk (chunk_tensor[c], chunk_start[c]).
struct Tables {
  const int64_t* ptrs;
  const int64_t* numels;
  const int64_t* chunk_tensor;
  const int64_t* chunk_start;
  int64_t n_tensors;
  int64_t n_chunks;
};

using table::kChunk;

// Hyper-parameters travel in double (the host's values, unrounded): fp64
// params compute with them in double, the others round each once to float.
// What every family's launch takes:
struct StepArgs {
  double lr;
  const float* lr_ptr;  // overrides lr when not null (tensor lr)
  double grad_mul, avg_coef;
  const float* grad_scale;  // may be null
  const float* found_inf;   // may be null
  bool average;
  DType param, state;
  bool master, stochastic_rounding;  // docs/precision.md
  uint32_t round_key;                // NOTE [stochastic rounding]: the step's key
};

struct AdamArgs : StepArgs {
  double one_minus_beta1, one_minus_beta2, eps, weight_decay;
  bool amsgrad, decoupled;
};

struct SgdArgs : StepArgs {
  double weight_decay, momentum, dampening;
  bool momentum_on, nesterov, decoupled;
};

// Return cudaSuccess or the launch error (reported by the binding).
cudaError_t launch_adam(const Tables& tables, const AdamArgs& args, cudaStream_t stream);
cudaError_t launch_sgd(const Tables& tables, const SgdArgs& args, cudaStream_t stream);

// Norm partials over the grad row `grad_row` (norm_kernels.cu): out[c], of
// Math<grad>::type, gets chunk c's sum of squares, or its largest |x| when inf.
cudaError_t launch_norm_partials(const Tables& tables, int grad_row, DType grad, bool inf, void* out,
                                 cudaStream_t stream);

// Mixup blend of [rows, row_elems] (mixup_kernels.cu): perm == nullptr is flip
// pairing (out may equal x; the middle row of an odd batch is not written),
// otherwise out[i] blends x[i] with x[perm[i]].
cudaError_t launch_mixup(const void* x, void* out, const float* lam, const int64_t* perm, int64_t rows,
                         int64_t row_elems, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fasttricks
