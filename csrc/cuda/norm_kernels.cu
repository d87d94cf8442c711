// Multi-tensor norm partials for gradient clipping, in plain CUDA (the host
// side is fasttricks/ops/norm.py; NOTE [clip in the step] in
// fasttricks/optim/_clip.py). One block per chunk of one tensor of a packed
// pointer table (NOTE [pointer table]), reading the grad row: out[c] gets the
// chunk's sum of squares (two-norm) or largest |x| (inf-norm; NaN if the
// chunk holds one), accumulated in fp32 (fp64 for fp64 grads). No torch headers.
#include "convert.cuh"
#include "launch.h"

namespace fasttricks {
namespace cuda {
namespace {

// max that keeps a NaN from either side.
template <typename O>
__device__ __forceinline__ O nan_max(O a, O b) { return (a != a || a > b) ? a : b; }

template <typename T, bool INF>
__global__ void __launch_bounds__(kThreads) norm_partials_kernel(Tables tb, int grad_row,
                                                                 typename Math<T>::type* out) {
  using O = typename Math<T>::type;
  const int64_t t = tb.chunk_tensor[blockIdx.x];
  const int64_t start = tb.chunk_start[blockIdx.x];
  const int64_t end = min(tb.numels[t], start + kChunk);
  const T* grad = reinterpret_cast<const T*>(tb.ptrs[grad_row * tb.n_tensors + t]);
  O acc = O(0);
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    const O x = to_math<O>(grad[i]);
    acc = INF ? nan_max(acc, x < O(0) ? -x : x) : acc + x * x;
  }
  __shared__ O lanes[kThreads];
  lanes[threadIdx.x] = acc;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      const O other = lanes[threadIdx.x + width];
      lanes[threadIdx.x] = INF ? nan_max(lanes[threadIdx.x], other) : lanes[threadIdx.x] + other;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = lanes[0];
}

template <typename T>
cudaError_t launch_typed(const Tables& tb, int grad_row, bool inf, void* out, cudaStream_t stream) {
  using O = typename Math<T>::type;
  const auto grid = static_cast<unsigned>(tb.n_chunks);
  if (inf) norm_partials_kernel<T, true><<<grid, kThreads, 0, stream>>>(tb, grad_row, static_cast<O*>(out));
  else norm_partials_kernel<T, false><<<grid, kThreads, 0, stream>>>(tb, grad_row, static_cast<O*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_norm_partials(const Tables& tables, int grad_row, DType grad, bool inf, void* out,
                                 cudaStream_t stream) {
  if (tables.n_chunks == 0) return cudaSuccess;
  switch (grad) {
    case DType::kFloat: return launch_typed<float>(tables, grad_row, inf, out, stream);
    case DType::kDouble: return launch_typed<double>(tables, grad_row, inf, out, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(tables, grad_row, inf, out, stream);
    case DType::kHalf: return launch_typed<__half>(tables, grad_row, inf, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fasttricks
