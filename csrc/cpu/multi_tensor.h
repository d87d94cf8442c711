// CPU multi-tensor machinery shared by every fused CPU op, one concept per
// header: vec_round.h (stochastic rounding on vector lanes), vec_io.h (vector
// loads and stores per dtype), chunks.h (the parallel loops over all tensors'
// chunks, and the prefetch), dispatch.h (compile-time dtype and flag
// dispatch). The host side of a step (the records, the gather that validates
// every tensor before any is written, the plans) is csrc/host/.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace fasttricks {

using at::vec::Vectorized;

// Declared before the math headers so their unqualified calls resolve here.
template <typename O>
inline Vectorized<O> ft_sqrt(const Vectorized<O>& x) { return x.sqrt(); }
template <typename O>
inline Vectorized<O> ft_max(const Vectorized<O>& a, const Vectorized<O>& b) {
  return at::vec::maximum(a, b);
}

}  // namespace fasttricks

#include "vec_round.h"
#include "vec_io.h"
#include "chunks.h"
#include "dispatch.h"
