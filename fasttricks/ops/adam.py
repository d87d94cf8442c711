"""Adam / AdamW: the reference, the plan dispatcher and the family record.

The reference is the spec every kernel is tested against; the dispatcher
builds a plan for a backend; the record (at the end) is what the step
engine needs of the family.

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
master_weights), and the param is written as w rounded to its dtype: to
nearest, or stochastically (NOTE [stochastic rounding] in docs/precision.md)
when the plan has rounding keys, as are bf16/fp16 moments then (exp_avg_sq
and max_exp_avg_sq never round a positive value to 0).
"""
from __future__ import annotations

import math
import torch

from fasttricks._table import ADAM_ROWS
from fasttricks.ops._device import DevicePlan, cuda_launch
from fasttricks.ops._plan import (PlanBase, found_inf_set, inv_grad_scale, local_shards, plan_for_backend,
                                  opmath_dtype)
from fasttricks.ops.family import Family, hyper_record, own_state_empty
from fasttricks.ops.rounding import HIGH_BITS, StepBits, tensor_key

__all__ = ["AdamHyper", "adam_reference_", "make_adam_plan", "ADAM_FAMILY", "ADAMW_FAMILY"]


AdamHyper = hyper_record(__name__, "AdamHyper", [("lr", float | torch.Tensor), ("beta1", float), ("beta2", float),
                                                  ("eps", float), ("weight_decay", float)], """\
One group's hyper-parameters for one step, built once by the optimizer and
handed unchanged to every backend (the CPU extension reads the same fields,
in the order it exports as ADAM_HYPER_FIELDS). Python floats are doubles:
whatever a kernel needs in double precision (1 - beta, the bias corrections)
is derived from these.""")


def adam_reference_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, masters=None,
                    averages=None, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, amsgrad: bool, decoupled: bool, maximize: bool = False,
                    grad_mul: float = 1.0, grad_scale=None, found_inf=None, avg_coef: float = 0.0,
                    rounding=None, round_key: int = 0) -> bool:
    """In-place reference step over lists of tensors. Returns False (and
    changes nothing) when `found_inf` is set. `rounding`: the params' keys
    for stochastic rounding with the step key `round_key` (None: to nearest)."""
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
            # NOTE [Adam math]: the kernels' operations in their order, each
            # rounded once (no fused multiply-add), with the coefficients
            # computed in double and rounded once: the same bits as the kernels.
            g = grads[i].to(op) * mul
            m, v = exp_avgs[i].to(op, copy=True), exp_avg_sqs[i].to(op, copy=True)
            if decoupled:
                w.mul_(1 - lr * weight_decay)
            elif weight_decay != 0:
                g = g + w * weight_decay
            m = m * beta1 + g * (1 - beta1)
            v = v * beta2 + (g * g) * (1 - beta2)
            second = v
            bits = StepBits(tensor_key(round_key, rounding[i]) if rounding is not None else None, p)
            if amsgrad:
                vmax = torch.maximum(max_exp_avg_sqs[i].to(op), v)
                bits.round_into_(max_exp_avg_sqs[i], vmax, 2, HIGH_BITS, positive_floor=True)
                second = vmax
            denom = _sqrt_rn(second) * (1 / math.sqrt(1 - beta2**t)) + eps
            w.sub_((m * (lr / (1 - beta1**t))) / denom)
            bits.round_into_(exp_avgs[i], m, 0, HIGH_BITS)
            bits.round_into_(exp_avg_sqs[i], v, 1, HIGH_BITS, positive_floor=True)
            bits.store_weights_(p, w, master, averages[i] if averages is not None else None, avg_coef)
    return True


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded sqrt, as the kernels take it (torch's vectorised fp32
    sqrt is within half an ulp, not always the nearest): the fp64 root of an
    fp32 value rounds to the nearest fp32 root."""
    return x.double().sqrt().float() if x.dtype == torch.float32 else x.sqrt()


class ReferenceAdamPlan(PlanBase):
    op = "Adam"

    def __init__(self, params, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, amsgrad, decoupled,
                 rounding=None):
        super().__init__(params, {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs,
                                  "max_exp_avg_sq": max_exp_avg_sqs if amsgrad else None,
                                  "master": masters}, rounding)
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
            avg_coef=avg_coef, rounding=pick(self.rounding), round_key=hyper.round_key)
        return len(index) if ok else -1


class DeviceAdamPlan(DevicePlan):
    """Plan for the device backends, given the launch function of one."""

    op = "Adam"
    ROWS = ADAM_ROWS
    STEP_ROW = "step"

    FLAG_ROWS = ("key",)

    def __init__(self, params, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, amsgrad, decoupled,
                 launch, rounding=None):
        super().__init__(params, {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs,
                                  "max_exp_avg_sq": max_exp_avg_sqs if amsgrad else None, "master": masters},
                         launch, {"amsgrad": amsgrad, "decoupled": decoupled}, rounding)
        self.steps = steps


def make_adam_plan(backend: str, params, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters,
                   *, amsgrad: bool, decoupled: bool, rounding=None):
    """A plan for one bucket of params on a concrete backend (see fasttricks._backends.resolve).
    `max_exp_avg_sqs` / `masters` are lists or None. The plan's
    step(hyper: AdamHyper, grad_scale, found_inf, avg_coef) returns the number
    of params updated, or -1 when found_inf skipped the step (host backends).
    `rounding`: the params' stochastic-rounding keys, or None (round to nearest)."""
    args = (list(params), list(steps), list(exp_avgs), list(exp_avg_sqs),
            list(max_exp_avg_sqs) if amsgrad else None, list(masters) if masters else None)
    if backend != "reference":  # NOTE [DTensor shards]: the kernels take each rank's local pieces
        args = tuple(map(local_shards, args))
    switches = {"amsgrad": amsgrad, "decoupled": decoupled}
    return plan_for_backend(
        backend, "adam",
        reference=lambda: ReferenceAdamPlan(*args, **switches, rounding=rounding),
        cpu=lambda ext: ext.AdamPlan(*[a if a is not None else [] for a in args], **switches,
                                     rounding=rounding or [], stochastic_rounding=rounding is not None),
        device=lambda launch: DeviceAdamPlan(*args, **switches, launch=launch, rounding=rounding),
        cuda_launch=CUDA_LAUNCH)


CUDA_LAUNCH = cuda_launch("adam", ("beta1", "beta2", "eps", "weight_decay"))


# ---- the family (fasttricks/ops/family.py) ----------------------------------------


def _init_adam_state(state, group, p):
    # torch's layout: "step" is a 0-dim float32 tensor, on the param's device
    # off CPU as torch's fused/capturable Adam keeps it.
    s = state[p]
    s["step"] = torch.zeros((), dtype=torch.float32, device=p.device if p.device.type != "cpu" else "cpu")
    s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if group["amsgrad"]:
        s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return s


def _adam_family(name: str, decoupled) -> Family:
    """Adam (decoupled weight decay when the group asks for it, as torch's
    Adam(decoupled_weight_decay=True)) or AdamW (always decoupled)."""

    def build_plan(state, backend, group, options, params, master, view, rounding):
        states = [state[p] for p in params]
        if group["amsgrad"]:
            for s in states:
                if "max_exp_avg_sq" not in s:
                    s["max_exp_avg_sq"] = torch.zeros_like(s["exp_avg_sq"])
        slot = lambda key: [view(s[key]) for s in states]  # noqa: E731
        return make_adam_plan(
            backend, [view(p) for p in params], [s["step"] for s in states], slot("exp_avg"), slot("exp_avg_sq"),
            slot("max_exp_avg_sq") if group["amsgrad"] else None, slot("master_param") if master else None,
            amsgrad=bool(group["amsgrad"]), decoupled=decoupled(group), rounding=rounding)

    def hyper(group, grad_mul: float, round_key: int) -> AdamHyper:
        beta1, beta2 = group["betas"]
        return AdamHyper(group["lr"], float(beta1), float(beta2), group["eps"], group["weight_decay"],
                         bool(group["maximize"]), grad_mul, round_key)

    return Family(name=name,
                  plan_flags=lambda group, options: (group["amsgrad"], group.get("decoupled_weight_decay")),
                  needs_state=lambda group, s: own_state_empty(s),
                  init_state=_init_adam_state, build_plan=build_plan, hyper=hyper)


ADAM_FAMILY = _adam_family("Adam", lambda group: bool(group.get("decoupled_weight_decay", False)))
ADAMW_FAMILY = _adam_family("AdamW", lambda group: True)
