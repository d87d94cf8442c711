"""Drop-in SGD and SGDW (decoupled weight decay, slides 003) with a fused step."""
from __future__ import annotations

import torch

from fasttricks.ops.sgd import make_sgd_plan
from fasttricks.optim._fused import FusedOptimizerMixin

__all__ = ["SGD", "SGDW"]


class SGD(FusedOptimizerMixin, torch.optim.SGD):
    __doc__ = (torch.optim.SGD.__doc__ or "") + """
    fasttricks additions (keyword-only): ``backend`` ("auto" | "reference" |
    "cpu" | "triton" | "cuda") and ``master_weights`` (fp32 master copy and
    momentum for bf16/fp16 params), as for fasttricks.optim.Adam.
"""

    _decoupled_default = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, backend="auto",
                 master_weights=False):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self.defaults["decoupled_weight_decay"] = self._decoupled_default
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", self._decoupled_default)
        self._ft_init(backend, master_weights)
        # Buffers created by a plan whose first step has not run yet.
        self._ft_fresh_buffers: set[int] = set()

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("decoupled_weight_decay", self._decoupled_default)

    def state_dict(self):
        """torch's layout. A buffer whose first step has not run yet (a
        found_inf skip) is left out, as torch leaves out a buffer it has not
        created: whoever loads the checkpoint then takes torch's first
        momentum step (buf = g) instead of a step from a zero buffer, which
        differs when dampening != 0."""
        state_dict = super().state_dict()
        fresh = self.__dict__.get("_ft_fresh_buffers")
        if fresh:
            for index, state in list(state_dict["state"].items()):
                if id(state.get("momentum_buffer")) in fresh:
                    state_dict["state"][index] = {k: v for k, v in state.items() if k != "momentum_buffer"}
        return state_dict

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # Loaded buffers have had their first step; ids of the old ones must
        # not outlive them (a new tensor may reuse an id).
        self._ft_fresh_buffers = set()

    def _plan_flags(self, group):
        return (group["momentum"] != 0, bool(group["nesterov"]), bool(group.get("decoupled_weight_decay")))

    def _needs_state(self, group, state) -> bool:
        return group["momentum"] != 0 and "momentum_buffer" not in state

    def _init_state(self, group, p, state) -> None:
        # torch's first momentum step copies the gradient into the buffer; the
        # kernel does that for buffers flagged fresh (zeros until then).
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.__dict__.setdefault("_ft_fresh_buffers", set()).add(id(state["momentum_buffer"]))

    def _build_plan(self, backend, group, params, master):
        states = [self.state[p] for p in params]
        momentum = group["momentum"] != 0
        bufs = [s["momentum_buffer"] for s in states] if momentum else None
        fresh = self.__dict__.setdefault("_ft_fresh_buffers", set())
        first = [id(b) in fresh for b in bufs] if momentum else [False] * len(params)
        plan = make_sgd_plan(backend, params, bufs, [s["master_param"] for s in states] if master else None,
                             first, nesterov=bool(group["nesterov"]),
                             decoupled=bool(group.get("decoupled_weight_decay")))
        plan._ft_buffers = bufs
        return plan

    def _step_plan(self, plan, group, grad_mul, grad_scale, found_inf, avg_coef):
        n = plan.step(group["lr"],
                      group["weight_decay"], group["momentum"], group["dampening"], group["maximize"],
                      grad_mul, grad_scale, found_inf, avg_coef)
        fresh = self._ft_fresh_buffers
        if fresh and n > 0 and plan._ft_buffers is not None:
            for buf, first in zip(plan._ft_buffers, plan.first_step_flags()):
                if not first:
                    fresh.discard(id(buf))
        return n


class SGDW(SGD):
    """SGD with decoupled weight decay (SGDW, slides 003): each step first
    shrinks the weights, ``p <- p * (1 - lr * weight_decay)``, then applies
    the SGD update to the raw gradient. Same arguments as :class:`SGD`."""

    _decoupled_default = True
