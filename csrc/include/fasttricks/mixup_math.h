// NOTE [mixup blend math]
// Mixup (Bag of Tricks, section 3; docs/tricks.md) blends two samples:
//     x_mix = lam * a + (1 - lam) * b
// evaluated in fp32 (fp64 for fp64 inputs) exactly in this order by every
// backend. Integer (uint8) images round half up and clamp to [0, 255]; a
// convex blend of two uint8 values never leaves that range, so the clamp only
// guards the rounding.
#pragma once
#include "fasttricks/common.h"

namespace fasttricks {

template <typename T, typename O>
FT_HD T mixup_blend(const T& a, const T& b, O lam) {
  return T(lam) * a + T(O(1) - lam) * b;
}

}  // namespace fasttricks
