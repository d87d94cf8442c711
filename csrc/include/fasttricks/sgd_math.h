// NOTE [SGD math]
// The one definition of the SGD/SGDW update used by the CPU and CUDA kernels
// (kernels/sgd.py and fasttricks/ops/sgd.py state the same formula), with
// torch.optim.SGD's exact semantics:
//
//   g = grad * grad_mul                 grad_mul = (maximize ? -1 : 1) / grad_scale * r
//   SGDW: w = w * (1 - lr * wd)         SGD: g = g + wd * w
//   momentum:  buf = g on the first step (no dampening), else
//              buf = momentum * buf + (1 - dampening) * g
//              g = nesterov ? g + momentum * buf : buf
//   w = w - lr * g
#pragma once
#include "fasttricks/common.h"

namespace fasttricks {

template <typename O>
struct SgdCoefs {
  O lr, weight_decay, decay_factor, momentum, one_minus_dampening, grad_mul;
};

template <typename O>
FT_HD SgdCoefs<O> make_sgd_coefs(O lr, O weight_decay, bool decoupled, O momentum,
                                 O dampening, O grad_mul) {
  SgdCoefs<O> c;
  c.lr = lr;
  c.weight_decay = decoupled ? O(0) : weight_decay;
  c.decay_factor = decoupled ? O(1) - lr * weight_decay : O(1);
  c.momentum = momentum;
  c.one_minus_dampening = O(1) - dampening;
  c.grad_mul = grad_mul;
  return c;
}

template <bool MOMENTUM, bool NESTEROV, bool DECOUPLED, typename T, typename O>
FT_HD void sgd_update(T& w, T g, T& buf, bool first_step, const SgdCoefs<O>& c) {
  g = g * T(c.grad_mul);
  if (DECOUPLED) {
    w = w * T(c.decay_factor);
  } else if (c.weight_decay != O(0)) {
    g = g + T(c.weight_decay) * w;
  }
  if (MOMENTUM) {
    buf = first_step ? g : T(c.momentum) * buf + T(c.one_minus_dampening) * g;
    g = NESTEROV ? g + T(c.momentum) * buf : buf;
  }
  w = w - T(c.lr) * g;
}

}  // namespace fasttricks
