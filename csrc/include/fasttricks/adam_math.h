// NOTE [Adam math]
// The one definition of the Adam/AdamW update used by the CPU and CUDA kernels
// (the Triton kernel in kernels/adam.py and the reference in
// fasttricks/ops/adam.py state the same formula). T is either a scalar
// (CUDA: one element per thread) or a SIMD vector (CPU: at::vec::Vectorized);
// O is the math type (float, or double for fp64 params). The caller must have
// declared ft_sqrt / ft_max for T before including this header.
//
//   g  = grad * grad_mul                 grad_mul = (maximize ? -1 : 1) / grad_scale * r
//   AdamW: w = w * (1 - lr * wd)         Adam: g = g + wd * w
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g^2
//   vmax = max(vmax, v)                  (amsgrad; denominator uses vmax)
//   w  = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
#pragma once
#include "fasttricks/common.h"

namespace fasttricks {

template <typename O>
struct AdamCoefs {
  O beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  O weight_decay;   // coupled (Adam): g += wd * w
  O decay_factor;   // decoupled (AdamW): w *= 1 - lr * wd
  O step_size;      // lr / (1 - beta1^t)
  O inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^t)
  O grad_mul;
};

// pow_fn is passed in so host code can use std::pow and device code powf/pow.
template <typename O, typename Pow, typename Sqrt>
FT_HD AdamCoefs<O> make_adam_coefs(O lr, O beta1, O beta2, O eps, O weight_decay,
                                   bool decoupled, O step, O grad_mul, Pow pow_fn,
                                   Sqrt sqrt_fn) {
  AdamCoefs<O> c;
  c.beta1 = beta1;
  c.one_minus_beta1 = O(1) - beta1;
  c.beta2 = beta2;
  c.one_minus_beta2 = O(1) - beta2;
  c.eps = eps;
  c.weight_decay = decoupled ? O(0) : weight_decay;
  c.decay_factor = decoupled ? O(1) - lr * weight_decay : O(1);
  c.step_size = lr / (O(1) - pow_fn(beta1, step));
  c.inv_bias_correction2_sqrt = O(1) / sqrt_fn(O(1) - pow_fn(beta2, step));
  c.grad_mul = grad_mul;
  return c;
}

template <bool AMSGRAD, bool DECOUPLED, typename T, typename O>
FT_HD void adam_update(T& w, T g, T& m, T& v, T& vmax, const AdamCoefs<O>& c) {
  g = g * T(c.grad_mul);
  if (DECOUPLED) {
    w = w * T(c.decay_factor);
  } else if (c.weight_decay != O(0)) {
    g = g + T(c.weight_decay) * w;
  }
  m = T(c.beta1) * m + T(c.one_minus_beta1) * g;
  v = T(c.beta2) * v + T(c.one_minus_beta2) * (g * g);
  T second = v;
  if (AMSGRAD) {
    vmax = ft_max(vmax, v);
    second = vmax;
  }
  const T denom = ft_sqrt(second) * T(c.inv_bias_correction2_sqrt) + T(c.eps);
  w = w - T(c.step_size) * m / denom;
}

}  // namespace fasttricks
