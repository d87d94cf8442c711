// NOTE [mixup blend math]
// Mixup (Bag of Tricks, section 3; docs/tricks.md) blends two samples:
//     x_mix = lam * a + (1 - lam) * b
// evaluated in fp32 (fp64 for fp64 inputs) exactly in this order by every
// backend, each product rounded before the sum: never contracted into an FMA
// (the CPU build has -ffp-contract=off, CUDA uses the _rn intrinsics below,
// Triton launches with enable_fp_fusion=False), so that uint8 images, which
// round half up and clamp to [0, 255], get the same pixels on every backend.
#pragma once
#include "fasttricks/common.h"

namespace fasttricks {

template <typename T, typename O>
FT_HD T mixup_blend(const T& a, const T& b, O lam) {
  return T(lam) * a + T(O(1) - lam) * b;
}

#if defined(__CUDACC__)
// nvcc contracts a*b + c*d into an FMA by default; the _rn intrinsics never are.
__device__ __forceinline__ float mixup_blend(const float& a, const float& b, float lam) {
  return __fadd_rn(__fmul_rn(lam, a), __fmul_rn(1.0f - lam, b));
}
__device__ __forceinline__ double mixup_blend(const double& a, const double& b, double lam) {
  return __dadd_rn(__dmul_rn(lam, a), __dmul_rn(1.0 - lam, b));
}
#endif

}  // namespace fasttricks
