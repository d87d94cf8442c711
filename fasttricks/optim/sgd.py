"""Drop-in SGD and SGDW (decoupled weight decay, Kolasiński's slides) with a fused step."""
from __future__ import annotations

import torch

from fasttricks.ops.sgd import SgdHyper, make_sgd_plan
from fasttricks.optim._fused import FT_GROUP_KEYS, FusedOptimizerMixin
from fasttricks.optim._plan_cache import state_dtype

__all__ = ["SGD", "SGDW"]


class SGD(FusedOptimizerMixin, torch.optim.SGD):
    __doc__ = (torch.optim.SGD.__doc__ or "") + """
    fasttricks additions (keyword-only): ``backend`` ("auto" | "reference" |
    "cpu" | "triton" | "cuda") and ``master_weights`` (fp32 master copy and
    momentum for bf16/fp16 params), as for fasttricks.optim.Adam.

    The momentum buffer enters the state on the first step that commits, as
    torch records it: a step skipped by found_inf creates none, and a buffer
    set to None (torch's reset idiom, or an old checkpoint) starts again with
    buf = g.
"""

    _decoupled_default = False
    _group_keys = FT_GROUP_KEYS + ("decoupled_weight_decay",)  # torch's SGD has no such key

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, backend="auto",
                 master_weights=False):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self.defaults["decoupled_weight_decay"] = self._decoupled_default
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", self._decoupled_default)
        self._ft_init(backend, master_weights)

    def _family_flags(self, group):
        return (group["momentum"] != 0, bool(group["nesterov"]), bool(group.get("decoupled_weight_decay")))

    def _needs_state(self, group, state) -> bool:
        # A param without a buffer waits, stateless, for its first grad.
        return group["momentum"] != 0 and (not state or state.get("momentum_buffer") is None)

    def _init_state(self, group, p):
        return self.state.get(p)  # the buffer comes from the plan (_build_plan)

    def _build_plan(self, backend, group, params, master, view):
        """`view` maps a param or state tensor to what the plan steps (NOTE [complex params])."""
        momentum = group["momentum"] != 0
        bufs, first, pending = ([], [], {}) if momentum else (None, [False] * len(params), {})
        if momentum:
            for i, p in enumerate(params):
                state = self.state.get(p)
                buf = state.get("momentum_buffer") if state else None
                if buf is None:  # the kernel writes buf = g on the first step
                    buf = torch.zeros_like(p, dtype=state_dtype(p.dtype, master),
                                           memory_format=torch.preserve_format)
                    pending[i] = (p, buf)
                bufs.append(view(buf))
                first.append(i in pending)
        plan = make_sgd_plan(backend, [view(p) for p in params], bufs,
                             [view(self.state[p]["master_param"]) for p in params] if master else None, first,
                             nesterov=bool(group["nesterov"]), decoupled=bool(group.get("decoupled_weight_decay")))
        plan._ft_pending = pending  # buffers that enter the state on their first committed step
        return plan

    def _hyper(self, group) -> SgdHyper:
        return SgdHyper(group["lr"], group["weight_decay"], group["momentum"], group["dampening"],
                        bool(group["maximize"]), self.grad_multiplier)

    def _step_plan(self, plan, hyper, grad_scale, found_inf, avg_coef):
        n = plan.step(hyper, grad_scale, found_inf, avg_coef)
        pending = plan._ft_pending
        if pending and n > 0:
            flags = plan.first_step_flags()
            done = [i for i in pending if not flags[i]]
            self._ft_cache.write_state(self, [(pending[i][0], "momentum_buffer", pending.pop(i)[1]) for i in done])
        return n


class SGDW(SGD):
    """SGD with decoupled weight decay (SGDW): each step first shrinks the
    weights, ``p <- p * (1 - lr * weight_decay)``, then applies the SGD update
    to the raw gradient. Same arguments as :class:`SGD`."""

    _decoupled_default = True
