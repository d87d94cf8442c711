// Element conversions shared by the plain-CUDA kernels (no torch headers):
// each storage type loads into its math type (fp32; fp64 for fp64) and stores
// back rounded to nearest; uint8 images round half up and clamp to [0, 255]
// (NOTE [mixup blend math]).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "fasttricks/rounding.h"

namespace fasttricks {
namespace cuda {

constexpr int kThreads = 256;

template <typename T> struct Math { using type = float; };
template <> struct Math<double> { using type = double; };

template <typename O> __device__ __forceinline__ O to_math(float x) { return O(x); }
template <typename O> __device__ __forceinline__ O to_math(double x) { return O(x); }
template <typename O> __device__ __forceinline__ O to_math(__nv_bfloat16 x) { return O(__bfloat162float(x)); }
template <typename O> __device__ __forceinline__ O to_math(__half x) { return O(__half2float(x)); }
template <typename O> __device__ __forceinline__ O to_math(uint8_t x) { return O(x); }

// NOTE [stochastic rounding] (docs/precision.md; fasttricks/rounding.h): x rounded to T with the
// random r (< 2^16) when T is 16-bit and SR; else from_math. FLOOR: a
// positive x never becomes 0.
template <typename T, typename O> __device__ __forceinline__ T from_math(O x);

template <typename T, bool SR, typename O>
__device__ __forceinline__ T from_math_rounded(O x, uint32_t r, bool floor) {
  if constexpr (SR && std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat16_raw raw;
    raw.x = rounding::round_bf16(float(x), r, floor);
    return __nv_bfloat16(raw);
  } else if constexpr (SR && std::is_same_v<T, __half>) {
    return __float2half_rn(rounding::round_fp16(float(x), r, floor));  // exact (or inf)
  } else {
    return from_math<T>(x);
  }
}

template <typename T, typename O> __device__ __forceinline__ T from_math(O x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(x));
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(x));
  else if constexpr (std::is_same_v<T, uint8_t>) return T(fminf(fmaxf(floorf(float(x) + 0.5f), 0.f), 255.f));
  else return T(x);
}

}  // namespace cuda
}  // namespace fasttricks
