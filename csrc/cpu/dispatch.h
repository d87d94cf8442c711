// Compile-time dispatch of a fused CPU op: the (param, state) dtype pairs,
// the precision flags (master weights, stochastic rounding) and booleans.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <type_traits>

#include "vec_io.h"

namespace fasttricks {

using at::vec::Vectorized;

namespace cpu {

template <typename T> struct Tag { using type = T; };

// The (param dtype, state dtype) pairs the kernels are instantiated for
// (docs/precision.md): state in the param's dtype; fp32 state for bf16/fp16
// params (with or without master weights); bf16 state for fp32/fp16 params.
template <typename F>
void dispatch_dtypes(at::ScalarType p, at::ScalarType s, const char* op, const F& f) {
  using ST = at::ScalarType;
  using BF = c10::BFloat16;
  if (p == ST::Float && s == ST::Float) return f(Tag<float>{}, Tag<float>{});
  if (p == ST::Double && s == ST::Double) return f(Tag<double>{}, Tag<double>{});
  if (p == ST::BFloat16 && s == ST::BFloat16) return f(Tag<BF>{}, Tag<BF>{});
  if (p == ST::Half && s == ST::Half) return f(Tag<c10::Half>{}, Tag<c10::Half>{});
  if (p == ST::BFloat16 && s == ST::Float) return f(Tag<BF>{}, Tag<float>{});
  if (p == ST::Half && s == ST::Float) return f(Tag<c10::Half>{}, Tag<float>{});
  if (p == ST::Float && s == ST::BFloat16) return f(Tag<float>{}, Tag<BF>{});
  if (p == ST::Half && s == ST::BFloat16) return f(Tag<c10::Half>{}, Tag<BF>{});
  TORCH_CHECK_TYPE(false, op, ": unsupported parameter dtype ", p, " with state dtype ", s,
                   " (supported: float32, float64, bfloat16, float16 with state of their own dtype, fp32 state "
                   "for the 16-bit types, bf16 state for float32 and float16)");
}

// The compile-time value of a dispatch_bool flag (decay: lambdas may see it by reference).
template <typename B>
constexpr bool kOn = std::decay_t<B>::value;

// The running average's element type: fp32 for 16-bit params with a master
// copy or stochastic rounding, else the param's (docs/precision.md).
template <typename P, bool MASTER, bool SR>
using AverageT = std::conditional_t<MASTER || SR, typename OpMath<P>::type, P>;

// f(master, stochastic rounding) as compile-time flags, instantiated only
// where they mean something: a master copy for 16-bit params with fp32
// state, rounding where a 16-bit tensor is written (docs/precision.md).
template <typename P, typename S, typename F>
void dispatch_precision(bool master, bool sr, const F& f) {
  using O = typename OpMath<S>::type;
  constexpr bool kCanMaster = !std::is_same_v<P, O> && std::is_same_v<S, O>;
  constexpr bool kCanRound = !std::is_same_v<P, O> || !std::is_same_v<S, O>;
  TORCH_CHECK(!(master && sr), "master weights and stochastic rounding exclude each other");
  TORCH_CHECK(!master || kCanMaster, "master weights need 16-bit params with fp32 state");
  if constexpr (kCanMaster) {
    if (master) return f(std::true_type{}, std::false_type{});
  }
  if constexpr (kCanRound) {
    if (sr) return f(std::false_type{}, std::true_type{});
  }
  f(std::false_type{}, std::false_type{});
}

template <typename F>
void dispatch_bool(bool b, const F& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

}  // namespace cpu
}  // namespace fasttricks
