// Fused mixup blend in plain CUDA (NOTE [mixup blend math]); no torch headers.
// One block per (row or flip pair, chunk of the row).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "fasttricks/mixup_math.h"
#include "launch.h"

namespace fasttricks {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMixChunk = 8192;

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ uint8_t from_f(float v) {
  return static_cast<uint8_t>(fminf(fmaxf(floorf(v + 0.5f), 0.f), 255.f));
}

template <typename T, typename O>
__global__ void mixup_kernel(const T* x, T* out, const float* lam, const int64_t* perm, int64_t rows,
                             int64_t row_elems) {
  const int64_t i = blockIdx.x;
  const int64_t j = perm ? perm[i] : rows - 1 - i;
  const O lam_i = lam[i], lam_j = lam[j];
  const int64_t start = int64_t(blockIdx.y) * kMixChunk;
  const int64_t end = start + kMixChunk < row_elems ? start + kMixChunk : row_elems;
  for (int64_t k = start + threadIdx.x; k < end; k += blockDim.x) {
    const O a = static_cast<O>(to_f(x[i * row_elems + k]));
    const O b = static_cast<O>(to_f(x[j * row_elems + k]));
    out[i * row_elems + k] = from_f<T>(static_cast<float>(mixup_blend(a, b, lam_i)));
    if (!perm) out[j * row_elems + k] = from_f<T>(static_cast<float>(mixup_blend(b, a, lam_j)));
  }
}

// fp64 keeps fp64 math end to end.
template <>
__global__ void mixup_kernel<double, double>(const double* x, double* out, const float* lam, const int64_t* perm,
                                             int64_t rows, int64_t row_elems) {
  const int64_t i = blockIdx.x;
  const int64_t j = perm ? perm[i] : rows - 1 - i;
  const double lam_i = lam[i], lam_j = lam[j];
  const int64_t start = int64_t(blockIdx.y) * kMixChunk;
  const int64_t end = start + kMixChunk < row_elems ? start + kMixChunk : row_elems;
  for (int64_t k = start + threadIdx.x; k < end; k += blockDim.x) {
    const double a = x[i * row_elems + k], b = x[j * row_elems + k];
    out[i * row_elems + k] = mixup_blend(a, b, lam_i);
    if (!perm) out[j * row_elems + k] = mixup_blend(b, a, lam_j);
  }
}

template <typename T, typename O>
cudaError_t launch_typed(const void* x, void* out, const float* lam, const int64_t* perm, int64_t rows,
                         int64_t row_elems, cudaStream_t stream) {
  const int64_t blocks_x = perm ? rows : rows / 2;
  const T* xs = static_cast<const T*>(x);
  T* os = static_cast<T*>(out);
  if (blocks_x > 0 && row_elems > 0) {
    const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>((row_elems + kMixChunk - 1) / kMixChunk));
    mixup_kernel<T, O><<<grid, kThreads, 0, stream>>>(xs, os, lam, perm, rows, row_elems);
  }
  if (!perm && rows % 2 == 1 && out != x && row_elems > 0) {  // the odd middle row pairs with itself
    const int64_t m = rows / 2;
    cudaMemcpyAsync(os + m * row_elems, xs + m * row_elems, row_elems * sizeof(T), cudaMemcpyDeviceToDevice,
                    stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_mixup(const void* x, void* out, const float* lam, const int64_t* perm, int64_t rows,
                         int64_t row_elems, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat: return launch_typed<float, float>(x, out, lam, perm, rows, row_elems, stream);
    case DType::kDouble: return launch_typed<double, double>(x, out, lam, perm, rows, row_elems, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16, float>(x, out, lam, perm, rows, row_elems, stream);
    case DType::kHalf: return launch_typed<__half, float>(x, out, lam, perm, rows, row_elems, stream);
    case DType::kByte: return launch_typed<uint8_t, float>(x, out, lam, perm, rows, row_elems, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fasttricks
