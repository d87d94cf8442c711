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

// Loads into the math type (fp32; fp64 for fp64) and stores back, rounding to
// nearest (half up and clamped for uint8).
template <typename T> struct Conv {
  using O = float;
  static __device__ __forceinline__ O load(T v) { return static_cast<O>(v); }
  static __device__ __forceinline__ T store(O v) { return static_cast<T>(v); }
};
template <> struct Conv<double> {
  using O = double;
  static __device__ __forceinline__ O load(double v) { return v; }
  static __device__ __forceinline__ double store(O v) { return v; }
};
template <> struct Conv<__nv_bfloat16> {
  using O = float;
  static __device__ __forceinline__ O load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(O v) { return __float2bfloat16_rn(v); }
};
template <> struct Conv<__half> {
  using O = float;
  static __device__ __forceinline__ O load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(O v) { return __float2half_rn(v); }
};
template <> struct Conv<uint8_t> {
  using O = float;
  static __device__ __forceinline__ O load(uint8_t v) { return static_cast<O>(v); }
  static __device__ __forceinline__ uint8_t store(O v) {
    return static_cast<uint8_t>(fminf(fmaxf(floorf(v + 0.5f), 0.f), 255.f));
  }
};

template <typename T>
__global__ void mixup_kernel(const T* x, T* out, const float* lam, const int64_t* perm, int64_t rows,
                             int64_t row_elems) {
  using C = Conv<T>;
  using O = typename C::O;
  const int64_t i = blockIdx.x;
  const int64_t j = perm ? perm[i] : rows - 1 - i;
  const O lam_i = lam[i], lam_j = lam[j];
  const int64_t start = int64_t(blockIdx.y) * kMixChunk;
  const int64_t end = start + kMixChunk < row_elems ? start + kMixChunk : row_elems;
  for (int64_t k = start + threadIdx.x; k < end; k += blockDim.x) {
    const O a = C::load(x[i * row_elems + k]);
    const O b = C::load(x[j * row_elems + k]);
    out[i * row_elems + k] = C::store(mixup_blend(a, b, lam_i));
    if (!perm) out[j * row_elems + k] = C::store(mixup_blend(b, a, lam_j));
  }
}

template <typename T>
cudaError_t launch_typed(const void* x, void* out, const float* lam, const int64_t* perm, int64_t rows,
                         int64_t row_elems, cudaStream_t stream) {
  const int64_t blocks_x = perm ? rows : rows / 2;
  const T* xs = static_cast<const T*>(x);
  T* os = static_cast<T*>(out);
  if (blocks_x > 0 && row_elems > 0) {
    const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>((row_elems + kMixChunk - 1) / kMixChunk));
    mixup_kernel<T><<<grid, kThreads, 0, stream>>>(xs, os, lam, perm, rows, row_elems);
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
    case DType::kFloat: return launch_typed<float>(x, out, lam, perm, rows, row_elems, stream);
    case DType::kDouble: return launch_typed<double>(x, out, lam, perm, rows, row_elems, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(x, out, lam, perm, rows, row_elems, stream);
    case DType::kHalf: return launch_typed<__half>(x, out, lam, perm, rows, row_elems, stream);
    case DType::kByte: return launch_typed<uint8_t>(x, out, lam, perm, rows, row_elems, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fasttricks
