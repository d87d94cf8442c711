// Shared by the CPU (at::vec) and CUDA kernels. No torch headers here: the
// .cu files include this and must compile with plain nvcc (see docs/architecture.md).
#pragma once

// Always inlined: a math helper left out of line (GCC did that to the
// nesterov SGD update) passes its vectors through memory, which cost the CPU
// step 10%.
#if defined(__CUDACC__)
#define FT_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FT_HD inline __attribute__((always_inline))
#else
#define FT_HD inline
#endif

namespace fasttricks {

// NOTE [weight averaging lerp]
// Every averaging method updates w_hat <- w_hat + c * (w - w_hat). We evaluate
// it the way torch.lerp does, so that c == 1 copies w exactly (the first
// sample of PSWA/PWALKS must equal the weights bit for bit) and c == 0 keeps
// w_hat exactly. The kernels skip the whole update when c == 0 (AVERAGE=false).
template <typename T, typename O>
FT_HD void average_update(T& avg, const T& w, O coef) {
  if (coef < O(0.5)) {
    avg = avg + T(coef) * (w - avg);
  } else {
    avg = w - (w - avg) * T(O(1) - coef);
  }
}

}  // namespace fasttricks
