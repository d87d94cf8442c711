"""SGD / SGDW: the reference, the plan dispatcher and the family record.

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

bf16/fp16 params and buffers are written rounded to nearest, or
stochastically when the plan has rounding keys (NOTE [stochastic rounding]
in docs/precision.md).
"""
from __future__ import annotations

import torch

from fasttricks._table import SGD_ROWS
from fasttricks.ops._device import DevicePlan, cuda_launch
from fasttricks.ops._plan import (PlanBase, found_inf_set, inv_grad_scale, local_shards, plan_for_backend,
                                  opmath_dtype)
from fasttricks.ops.average import average_reference_
from fasttricks.ops.family import Family, SparseSteps, hyper_record
from fasttricks.ops.host_flag import DeferredFlag
from fasttricks.ops.precision import average_dtype, state_dtype
from fasttricks.ops.rounding import HIGH_BITS, StepBits, tensor_key

__all__ = ["SgdHyper", "sgd_reference_", "make_sgd_plan", "SGD_FAMILY"]


SgdHyper = hyper_record(__name__, "SgdHyper", [("lr", float | torch.Tensor), ("weight_decay", float),
                                                ("momentum", float), ("dampening", float)],
                        "One group's hyper-parameters for one step (see AdamHyper in ops/adam.py).")


def sgd_reference_(params, grads, momentum_buffers, first_step, *, masters=None, averages=None,
                   lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                   decoupled: bool, maximize: bool = False, grad_mul: float = 1.0, grad_scale=None,
                   found_inf=None, avg_coef: float = 0.0, rounding=None, round_key: int = 0) -> bool:
    """In-place reference step. `momentum_buffers` is None when momentum == 0;
    `first_step[i]` says buffer i is not initialised yet; `rounding` as for
    adam_reference_."""
    if found_inf_set(found_inf):
        return False
    mul = grad_mul * inv_grad_scale(grad_scale) * (-1.0 if maximize else 1.0)
    with torch.no_grad():
        for i, p in enumerate(params):
            op = opmath_dtype(p.dtype)
            master = masters[i] if masters is not None else None
            w = master if master is not None else p.to(op, copy=True)
            g = grads[i].to(op) * mul  # NOTE [SGD math]: the kernels' operations, each rounded once
            if decoupled:
                w.mul_(1 - lr * weight_decay)
            elif weight_decay != 0:
                g = g + w * weight_decay
            bits = StepBits(tensor_key(round_key, rounding[i]) if rounding is not None else None, p)
            if momentum_buffers is not None:
                if first_step[i]:
                    buf = g.clone()
                else:
                    buf = momentum_buffers[i].to(op) * momentum + g * (1 - dampening)
                bits.round_into_(momentum_buffers[i], buf, 0, HIGH_BITS)
                g = g + buf * momentum if nesterov else buf
            w.sub_(g * lr)
            bits.store_weights_(p, w, master, averages[i] if averages is not None else None, avg_coef)
    return True


class ReferenceSgdPlan(PlanBase):
    op = "SGD"

    def __init__(self, params, momentum_buffers, masters, first_step, nesterov, decoupled, rounding=None):
        super().__init__(params, {"momentum_buffer": momentum_buffers, "master": masters}, rounding)
        self.first_step = list(first_step) if momentum_buffers is not None else None
        self.nesterov, self.decoupled = nesterov, decoupled

    def step(self, hyper: SgdHyper, grad_scale, found_inf, avg_coef) -> int:
        index, grads = self.gather()
        pick = lambda xs: None if xs is None else [xs[i] for i in index]  # noqa: E731
        ok = sgd_reference_(
            pick(self.params), grads, pick(self.slots["momentum_buffer"]), pick(self.first_step),
            masters=pick(self.slots["master"]), averages=pick(self.averages), lr=float(hyper.lr),
            weight_decay=hyper.weight_decay, momentum=hyper.momentum, dampening=hyper.dampening,
            nesterov=self.nesterov, decoupled=self.decoupled, maximize=hyper.maximize, grad_mul=hyper.grad_mul,
            grad_scale=grad_scale, found_inf=found_inf, avg_coef=avg_coef, rounding=pick(self.rounding),
            round_key=hyper.round_key)
        if not ok:
            return -1
        if self.first_step is not None:
            for i in index:
                self.first_step[i] = False
        return len(index)

    def first_step_settled(self) -> bool:
        return True

    def first_step_flags(self):
        return list(self.first_step or [])


class DeviceSgdPlan(DevicePlan):
    op = "SGD"
    ROWS = SGD_ROWS
    FLAG_ROWS = ("first", "key")

    def __init__(self, params, momentum_buffers, masters, first_step, nesterov, decoupled, launch, rounding=None):
        super().__init__(params, {"momentum_buffer": momentum_buffers, "master": masters}, launch,
                         {"nesterov": nesterov, "decoupled": decoupled}, rounding)
        self.momentum = momentum_buffers is not None
        if self.momentum:
            self.set_flags("first", first_step)

    def step(self, hyper: SgdHyper, grad_scale, found_inf, avg_coef) -> int:
        if self.momentum != (hyper.momentum != 0):
            raise RuntimeError("SGD plan: momentum switched on or off after the plan was built")
        self._settle_first_step(wait=True)
        return super().step(hyper, grad_scale, found_inf, avg_coef)

    def after_step(self, found_inf) -> None:
        # A skipped step leaves fresh buffers fresh. The flags of the stepped
        # params are cleared at once; a device found_inf is read on the next
        # step and puts them back if it was set (NOTE [deferred found_inf]).
        if self.momentum and self.any_gathered_flag("first"):
            before = None if found_inf is None else self.flags("first")
            self.clear_gathered_flags("first")
            if before is not None:
                self._first_step_undo = (DeferredFlag(found_inf), before)
                self._settle_first_step(wait=False)

    def first_step_settled(self) -> bool:
        self._settle_first_step(wait=False)
        return "_first_step_undo" not in self.__dict__

    def _settle_first_step(self, wait: bool) -> None:
        undo = self.__dict__.get("_first_step_undo")
        if undo is not None and (wait or undo[0].ready()):
            del self._first_step_undo
            if undo[0].is_set():
                self.set_flags("first", undo[1])

    def first_step_flags(self):
        self._settle_first_step(wait=True)
        return [bool(f) for f in self.flags("first")] if self.momentum else []


def make_sgd_plan(backend: str, params, momentum_buffers, masters, first_step, *, nesterov: bool,
                  decoupled: bool, rounding=None):
    """A plan for one bucket of params. `momentum_buffers` is None when momentum
    is 0; `first_step` flags the buffers not initialised yet. The plan's
    step(hyper: SgdHyper, grad_scale, found_inf, avg_coef) returns the number
    of params updated, or -1 when found_inf skipped the step (host backends)."""
    bufs = list(momentum_buffers) if momentum_buffers is not None else None
    args = (list(params), bufs, list(masters) if masters else None, list(first_step))
    if backend != "reference":  # NOTE [DTensor shards]: the kernels take each rank's local pieces
        args = (local_shards(args[0]), local_shards(args[1]), local_shards(args[2]), args[3])
    p, b, m, f = args
    switches = {"nesterov": nesterov, "decoupled": decoupled}
    return plan_for_backend(
        backend, "sgd",
        reference=lambda: ReferenceSgdPlan(*args, **switches, rounding=rounding),
        cpu=lambda ext: ext.SgdPlan(p, b or [], m or [], f if b else [], **switches, rounding=rounding or [],
                                    stochastic_rounding=rounding is not None),
        device=lambda launch: DeviceSgdPlan(*args, **switches, launch=launch, rounding=rounding),
        cuda_launch=CUDA_LAUNCH)


CUDA_LAUNCH = cuda_launch("sgd", ("weight_decay", "momentum", "dampening"))


# ---- the family (fasttricks/ops/family.py) ----------------------------------------


def _build_sgd_plan(state, backend, group, options, params, master, view, rounding):
    momentum = group["momentum"] != 0
    bufs, first, pending = ([], [], {}) if momentum else (None, [False] * len(params), {})
    if momentum:
        for i, p in enumerate(params):
            s = state.get(p)
            buf = s.get("momentum_buffer") if s else None
            if buf is None:  # the kernel writes buf = g on the first step
                buf = torch.zeros_like(p, dtype=state_dtype(options, p.dtype), memory_format=torch.preserve_format)
                pending[i] = (p, buf)
            bufs.append(view(buf))
            first.append(i in pending)
    plan = make_sgd_plan(backend, [view(p) for p in params], bufs,
                         [view(state[p]["master_param"]) for p in params] if master else None, first,
                         nesterov=bool(group["nesterov"]), decoupled=bool(options["decoupled_weight_decay"]),
                         rounding=rounding)
    plan._ft_pending = pending  # buffers that enter the state on their first committed step
    return plan


def _commit_sgd_buffers(plan, wait: bool) -> list:
    """New momentum buffers enter the state once a step that started them is
    known not to be skipped (NOTE [deferred found_inf])."""
    pending = getattr(plan, "_ft_pending", None)
    settled = getattr(plan, "first_step_settled", None)  # the CPU plans read found_inf in the step
    if not pending or not (wait or settled is None or settled()):
        return []
    flags = plan.first_step_flags()
    return [(pending[i][0], "momentum_buffer", pending.pop(i)[1]) for i in [i for i in pending if not flags[i]]]


def _check_sparse_sgd(params) -> None:
    for p in params:
        g = p.grad
        if g is not None and (g.dtype != p.dtype or g.shape != p.shape or g.device != p.device):
            raise RuntimeError(f"SGD: sparse gradient {g.dtype} {tuple(g.shape)} on {g.device} does not match "
                               f"its parameter {p.dtype} {tuple(p.shape)} on {p.device}")


@torch.no_grad()
def _step_sparse_sgd(state, group, options, params, grad_scale, found_inf, avg_coef, grad_mul, averages_for):
    """torch's single-tensor SGD, in torch ops, for params with a sparse grad."""
    if found_inf_set(found_inf):  # NOTE [found_inf contract]
        return []
    lr, wd, momentum = float(group["lr"]), group["weight_decay"], group["momentum"]
    dampening, nesterov = group["dampening"], group["nesterov"]
    mul = grad_mul * (-1.0 if group["maximize"] else 1.0) * inv_grad_scale(grad_scale)
    stepped, buffers = [], []
    for p in params:
        g = p.grad
        if g is None:
            continue
        g = g * mul if mul != 1.0 else g
        if options["decoupled_weight_decay"]:
            p.mul_(1.0 - lr * wd)
        elif wd != 0:
            g = g.add(p, alpha=wd)
        if momentum != 0:
            buf = state.get(p, {}).get("momentum_buffer")
            if buf is None:
                buf = torch.clone(g).detach()
            else:
                buf.mul_(momentum).add_(g, alpha=1.0 - dampening)
            buffers.append((p, "momentum_buffer", buf))
            g = g.add(buf, alpha=momentum) if nesterov else buf
        p.add_(g, alpha=-lr)
        stepped.append(p)
    if avg_coef != 0 and averages_for is not None and stepped:
        averages = [averages_for([p], average_dtype(options, p.dtype))[0] for p in stepped]
        average_reference_(averages, [p.detach() for p in stepped], avg_coef)
    return buffers


SGD_FAMILY = Family(
    name="SGD",
    plan_flags=lambda group, options: (group["momentum"] != 0, group["nesterov"],
                                       options["decoupled_weight_decay"]),
    # A param without a buffer waits, stateless, for its first grad; the buffer comes from the plan.
    needs_state=lambda group, s: group["momentum"] != 0 and (not s or s.get("momentum_buffer") is None),
    init_state=lambda state, group, p: state.get(p),
    build_plan=_build_sgd_plan,
    hyper=lambda group, grad_mul, round_key: SgdHyper(group["lr"], group["weight_decay"], group["momentum"],
                                                      group["dampening"], bool(group["maximize"]), grad_mul,
                                                      round_key),
    sparse=SparseSteps(check=_check_sparse_sgd, step=_step_sparse_sgd),
    commit=_commit_sgd_buffers)
