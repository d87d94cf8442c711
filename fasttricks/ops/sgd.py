"""SGD / SGDW step: the reference and the plan dispatcher.

The update (NOTE [SGD math] in csrc/include/fasttricks/sgd_math.h), with
torch.optim.SGD's semantics, in fp32 math (fp64 for fp64 params):

    g = grad * grad_mul,   grad_mul = (-1 if maximize else 1) / grad_scale * r
    SGDW: w = w * (1 - lr * wd)          SGD: g = g + wd * w
    momentum != 0:
        buf = g                                   on the first step (no dampening)
        buf = momentum * buf + (1 - dampening) * g    afterwards
        g = g + momentum * buf if nesterov else buf
    w = w - lr * g
    w_hat = w_hat + c * (w - w_hat)        (when a running average is attached, c != 0)
"""
from __future__ import annotations

import torch

from fasttricks import _backends
from fasttricks.ops._device import DevicePlan
from fasttricks.ops._plan import PlanBase, found_inf_set, inv_grad_scale, local_shards, opmath_dtype

__all__ = ["sgd_reference_", "make_sgd_plan"]


def sgd_reference_(params, grads, momentum_buffers, first_step, *, masters=None, averages=None,
                   lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                   decoupled: bool, maximize: bool = False, grad_mul: float = 1.0, grad_scale=None,
                   found_inf=None, avg_coef: float = 0.0) -> bool:
    """In-place reference step. `momentum_buffers` is None when momentum == 0;
    `first_step[i]` says buffer i is not initialised yet."""
    if found_inf_set(found_inf):
        return False
    mul = grad_mul * inv_grad_scale(grad_scale) * (-1.0 if maximize else 1.0)
    with torch.no_grad():
        for i, p in enumerate(params):
            op = opmath_dtype(p.dtype)
            master = masters[i] if masters is not None else None
            w = master if master is not None else p.to(op, copy=True)
            g = grads[i].to(op) * mul
            if decoupled:
                w.mul_(1 - lr * weight_decay)
            elif weight_decay != 0:
                g = g.add(w, alpha=weight_decay)
            if momentum_buffers is not None:
                if first_step[i]:
                    buf = g.clone()
                else:
                    buf = momentum_buffers[i].to(op).mul_(momentum).add_(g, alpha=1 - dampening)
                momentum_buffers[i].copy_(buf)
                g = g.add(buf, alpha=momentum) if nesterov else buf
            w.add_(g, alpha=-lr)
            p.copy_(w)
            if averages is not None and avg_coef != 0:
                averages[i].copy_(averages[i].to(op).lerp_(w, avg_coef))
    return True


class ReferenceSgdPlan(PlanBase):
    op = "SGD"

    def __init__(self, params, momentum_buffers, masters, first_step, nesterov, decoupled):
        super().__init__(params, {"momentum_buffer": momentum_buffers, "master": masters})
        self.first_step = list(first_step) if momentum_buffers is not None else None
        self.nesterov, self.decoupled = nesterov, decoupled

    def step(self, lr, weight_decay, momentum, dampening, maximize, grad_mul, grad_scale, found_inf, avg_coef):
        index, grads = self.gather()
        pick = lambda xs: None if xs is None else [xs[i] for i in index]  # noqa: E731
        ok = sgd_reference_(
            pick(self.params), grads, pick(self.slots["momentum_buffer"]), pick(self.first_step),
            masters=pick(self.slots["master"]), averages=pick(self.averages), lr=float(lr),
            weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=self.nesterov,
            decoupled=self.decoupled, maximize=maximize, grad_mul=grad_mul, grad_scale=grad_scale,
            found_inf=found_inf, avg_coef=avg_coef)
        if not ok:
            return -1
        if self.first_step is not None:
            for i in index:
                self.first_step[i] = False
        return len(index)

    def first_step_flags(self):
        return list(self.first_step or [])


# Pointer-table rows read by the Triton and CUDA kernels, in this order.
# "first" is a flag row: 1 where the momentum buffer is not initialised yet.
ROWS = ("param", "grad", "momentum_buffer", "master", "avg", "first")


class DeviceSgdPlan(DevicePlan):
    op = "SGD"
    ROWS = ROWS
    FLAG_ROWS = ("first",)

    def __init__(self, params, momentum_buffers, masters, first_step, nesterov, decoupled):
        super().__init__(params, {"momentum_buffer": momentum_buffers, "master": masters})
        self.momentum = momentum_buffers is not None
        if self.momentum:
            self.set_flags("first", first_step)
        self.nesterov, self.decoupled = nesterov, decoupled

    def step(self, lr, weight_decay, momentum, dampening, maximize, grad_mul, grad_scale, found_inf, avg_coef):
        if self.momentum != (momentum != 0):
            raise RuntimeError("SGD plan: momentum switched on or off after the plan was built")
        n, tables, writeback, keep = self.pack()
        if not n:
            return 0
        found_inf, grad_scale = self.on_device(found_inf), self.on_device(grad_scale)
        self.launch(tables, param_dtype=self.param_dtype, state_dtype=self.state_dtype, lr=lr,
                    weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                    grad_mul=grad_mul * (-1.0 if maximize else 1.0), grad_scale=grad_scale,
                    found_inf=found_inf, avg_coef=avg_coef, nesterov=self.nesterov, decoupled=self.decoupled,
                    average=self.averages is not None and avg_coef != 0, device=self.device)
        del keep  # the temporaries the kernel reads lived through its launch
        self.write_back(writeback)
        # A skipped step leaves fresh buffers fresh; checking costs one sync,
        # paid only on the steps that still have fresh buffers.
        if self.momentum and self.any_gathered_flag("first") and (found_inf is None or float(found_inf) == 0):
            self.clear_gathered_flags("first")
        return n

    def first_step_flags(self):
        return [bool(f) for f in self.flags("first")] if self.momentum else []


def make_sgd_plan(backend: str, params, momentum_buffers, masters, first_step, *, nesterov: bool,
                  decoupled: bool):
    """A plan for one bucket of params. `momentum_buffers` is None when momentum
    is 0; `first_step` flags the buffers not initialised yet. The plan's
    step(lr, weight_decay, momentum, dampening, maximize, grad_mul, grad_scale, found_inf, avg_coef)
    returns the number of params updated, or -1 when found_inf skipped the step."""
    bufs = list(momentum_buffers) if momentum_buffers is not None else None
    args = (list(params), bufs, list(masters) if masters else None, list(first_step))
    if backend != "reference":  # NOTE [DTensor shards]: the kernels take each rank's local pieces
        args = (local_shards(args[0]), local_shards(args[1]), local_shards(args[2]), args[3])
    if backend == "reference":
        return ReferenceSgdPlan(*args, nesterov, decoupled)
    if backend == "cpu":
        p, b, m, f = args
        return _backends.cpu_ext().SgdPlan(p, b or [], m or [], f if b else [], nesterov, decoupled)
    if backend == "triton":
        from fasttricks.kernels.sgd import TritonSgdPlan

        return TritonSgdPlan(*args, nesterov, decoupled)
    if backend == "cuda":
        from fasttricks.ops._cuda import CudaSgdPlan

        return CudaSgdPlan(*args, nesterov, decoupled)
    raise ValueError(f"Invalid backend: {backend!r}")
