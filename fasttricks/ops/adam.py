"""Adam / AdamW step: the reference (the spec every kernel is tested against)
and the dispatcher that builds a plan for a backend.

The update (NOTE [Adam math] in csrc/include/fasttricks/adam_math.h), in fp32
math (fp64 for fp64 params), for step t (counted from 1):

    g  = grad * grad_mul,   grad_mul = (-1 if maximize else 1) / grad_scale * r
    AdamW: w = w * (1 - lr * wd)          Adam: g = g + wd * w
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g * g
    vmax = max(vmax, v)                    (amsgrad: the denominator uses vmax)
    w  = w - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    w_hat = w_hat + c * (w - w_hat)        (when a running average is attached, c != 0)

w is the fp32 master copy when there is one (bf16/fp16 params with
master_weights), and the param is written as w rounded to its dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fasttricks import _backends
from fasttricks._table import ADAM_ROWS, grad_multiplier, scalar_arg
from fasttricks.ops._device import DevicePlan
from fasttricks.ops._plan import PlanBase, found_inf_set, inv_grad_scale, local_shards, opmath_dtype

__all__ = ["AdamHyper", "adam_reference_", "make_adam_plan"]


class AdamHyper(NamedTuple):
    """One group's hyper-parameters for one step, built once by the optimizer
    and handed unchanged to every backend (the CPU extension reads the same
    fields by name). Python floats are doubles: whatever a kernel needs in
    double precision (1 - beta, the bias corrections) is derived from these."""

    lr: float | torch.Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool = False
    grad_mul: float = 1.0


def adam_reference_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, masters=None,
                    averages=None, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, amsgrad: bool, decoupled: bool, maximize: bool = False,
                    grad_mul: float = 1.0, grad_scale=None, found_inf=None, avg_coef: float = 0.0) -> bool:
    """In-place reference step over lists of tensors. Returns False (and
    changes nothing) when `found_inf` is set."""
    if found_inf_set(found_inf):
        return False
    mul = grad_mul * inv_grad_scale(grad_scale) * (-1.0 if maximize else 1.0)
    with torch.no_grad():
        for i, p in enumerate(params):
            steps[i] += 1
            t = float(steps[i])
            op = opmath_dtype(p.dtype)
            master = masters[i] if masters is not None else None
            w = master if master is not None else p.to(op, copy=True)
            g = grads[i].to(op) * mul
            m, v = exp_avgs[i].to(op, copy=True), exp_avg_sqs[i].to(op, copy=True)
            if decoupled:
                w.mul_(1 - lr * weight_decay)
            elif weight_decay != 0:
                g = g.add(w, alpha=weight_decay)
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            second = v
            if amsgrad:
                vmax = torch.maximum(max_exp_avg_sqs[i].to(op), v)
                max_exp_avg_sqs[i].copy_(vmax)
                second = vmax
            denom = (second.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            w.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
            exp_avgs[i].copy_(m)
            exp_avg_sqs[i].copy_(v)
            p.copy_(w)
            if averages is not None and avg_coef != 0:
                averages[i].copy_(averages[i].to(op).lerp_(w, avg_coef))
    return True


class ReferenceAdamPlan(PlanBase):
    op = "Adam"

    def __init__(self, params, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, amsgrad, decoupled):
        super().__init__(params, {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs,
                                  "max_exp_avg_sq": max_exp_avg_sqs if amsgrad else None,
                                  "master": masters})
        self.steps, self.amsgrad, self.decoupled = steps, amsgrad, decoupled

    def step(self, hyper: AdamHyper, grad_scale, found_inf, avg_coef) -> int:
        index, grads = self.gather()
        pick = lambda xs: None if xs is None else [xs[i] for i in index]  # noqa: E731
        ok = adam_reference_(
            pick(self.params), grads, pick(self.slots["exp_avg"]), pick(self.slots["exp_avg_sq"]),
            pick(self.slots["max_exp_avg_sq"]), pick(self.steps), masters=pick(self.slots["master"]),
            averages=pick(self.averages), lr=float(hyper.lr), beta1=float(hyper.beta1), beta2=float(hyper.beta2),
            eps=hyper.eps, weight_decay=hyper.weight_decay, amsgrad=self.amsgrad, decoupled=self.decoupled,
            maximize=hyper.maximize, grad_mul=hyper.grad_mul, grad_scale=grad_scale, found_inf=found_inf,
            avg_coef=avg_coef)
        return len(index) if ok else -1


class DeviceAdamPlan(DevicePlan):
    """Plan for the device backends, given the launch function of one."""

    op = "Adam"
    ROWS = ADAM_ROWS
    STEP_ROW = "step"

    def __init__(self, params, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, amsgrad, decoupled,
                 launch):
        super().__init__(params, {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs,
                                  "max_exp_avg_sq": max_exp_avg_sqs if amsgrad else None, "master": masters},
                         launch, {"amsgrad": amsgrad, "decoupled": decoupled})
        self.steps = steps


def launch_cuda_adam(tables, hyper, *, param_dtype, state_dtype, grad_scale, found_inf, avg_coef, amsgrad,
                     decoupled, average, device):
    """The CUDA backend's launch: the extension's binding, called as kernels/adam.py's launch_adam is."""
    ptrs, numels, chunk_tensor, chunk_start, n, _ = tables
    lr_value, lr_tensor = scalar_arg(hyper.lr, device)
    _backends.cuda_ext().adam_step(ptrs, numels, chunk_tensor, chunk_start, n, param_dtype, state_dtype,
                                   lr_value, lr_tensor, float(hyper.beta1), float(hyper.beta2), float(hyper.eps),
                                   float(hyper.weight_decay), grad_multiplier(hyper), grad_scale, found_inf,
                                   float(avg_coef), amsgrad, decoupled, average)


def make_adam_plan(backend: str, params, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters,
                   *, amsgrad: bool, decoupled: bool):
    """A plan for one bucket of params on a concrete backend (see fasttricks._backends.resolve).
    `max_exp_avg_sqs` / `masters` are lists or None. The plan's
    step(hyper: AdamHyper, grad_scale, found_inf, avg_coef) returns the number
    of params updated, or -1 when found_inf skipped the step (host backends)."""
    args = (list(params), list(steps), list(exp_avgs), list(exp_avg_sqs),
            list(max_exp_avg_sqs) if amsgrad else None, list(masters) if masters else None)
    if backend != "reference":  # NOTE [DTensor shards]: the kernels take each rank's local pieces
        args = tuple(map(local_shards, args))
    if backend == "reference":
        return ReferenceAdamPlan(*args, amsgrad, decoupled)
    if backend == "cpu":
        return _backends.cpu_ext().AdamPlan(*[a if a is not None else [] for a in args], amsgrad, decoupled)
    if backend == "triton":
        from fasttricks.kernels.adam import launch_adam  # imports triton: only when asked for

        return DeviceAdamPlan(*args, amsgrad, decoupled, launch_adam)
    if backend == "cuda":
        return DeviceAdamPlan(*args, amsgrad, decoupled, launch_cuda_adam)
    raise ValueError(f"Invalid backend: {backend!r}")
