"""Drop-in SGD and SGDW (decoupled weight decay, Kolasiński's slides) with a fused step."""
from __future__ import annotations

import torch

from fasttricks.ops._plan import found_inf_set, inv_grad_scale
from fasttricks.ops.average import average_reference_
from fasttricks.ops.sgd import SgdHyper, make_sgd_plan
from fasttricks.optim._fused import FT_OPTION_NAMES, FusedOptimizerMixin
from fasttricks.ops.precision import average_dtype, state_dtype

__all__ = ["SGD", "SGDW"]


class SGD(FusedOptimizerMixin, torch.optim.SGD):
    __doc__ = (torch.optim.SGD.__doc__ or "") + """
    fasttricks additions (keyword-only): ``backend`` ("auto" | "reference" |
    "cpu" | "triton" | "cuda"), ``master_weights`` (fp32 master copy and
    momentum for bf16/fp16 params), ``stochastic_rounding``, ``state_dtype``
    (of the momentum buffer) and ``rounding_seed``, as for fasttricks.optim.Adam.

    The momentum buffer enters the state on the first step that commits, as
    torch records it: a step skipped by found_inf creates none, and a buffer
    set to None (torch's reset idiom, or an old checkpoint) starts again with
    buf = g.
"""

    _decoupled_default = False
    # torch's SGD has no such key: it is one of our options (NOTE [group options])
    _option_names = FT_OPTION_NAMES + ("decoupled_weight_decay",)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, backend="auto",
                 master_weights=False, stochastic_rounding=False, state_dtype=None, rounding_seed=0):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self._ft_init(backend, master_weights, stochastic_rounding, state_dtype, rounding_seed)

    @property
    def _option_defaults(self):
        return {"decoupled_weight_decay": self._decoupled_default}

    def _family_flags(self, group, options):
        return group["momentum"] != 0, group["nesterov"], options["decoupled_weight_decay"]

    def _needs_state(self, group, state) -> bool:
        # A param without a buffer waits, stateless, for its first grad.
        return group["momentum"] != 0 and (not state or state.get("momentum_buffer") is None)

    def _init_state(self, group, p):
        return self.state.get(p)  # the buffer comes from the plan (_build_plan)

    def _build_plan(self, backend, group, options, params, master, view, rounding):
        """`view` maps a param or state tensor to what the plan steps (NOTE [complex params])."""
        momentum = group["momentum"] != 0
        bufs, first, pending = ([], [], {}) if momentum else (None, [False] * len(params), {})
        if momentum:
            for i, p in enumerate(params):
                state = self.state.get(p)
                buf = state.get("momentum_buffer") if state else None
                if buf is None:  # the kernel writes buf = g on the first step
                    buf = torch.zeros_like(p, dtype=state_dtype(options, p.dtype),
                                           memory_format=torch.preserve_format)
                    pending[i] = (p, buf)
                bufs.append(view(buf))
                first.append(i in pending)
        plan = make_sgd_plan(backend, [view(p) for p in params], bufs,
                             [view(self.state[p]["master_param"]) for p in params] if master else None, first,
                             nesterov=bool(group["nesterov"]), decoupled=bool(options["decoupled_weight_decay"]),
                             rounding=rounding)
        plan._ft_pending = pending  # buffers that enter the state on their first committed step
        return plan

    # NOTE [sparse grads] (fasttricks/optim/_fused.py): SGD steps sparse grads.
    _sparse_grads_ok = True

    def _check_sparse(self, params) -> None:
        for p in params:
            g = p.grad
            if g is not None and (g.dtype != p.dtype or g.shape != p.shape or g.device != p.device):
                raise RuntimeError(f"SGD: sparse gradient {g.dtype} {tuple(g.shape)} on {g.device} does not match "
                                   f"its parameter {p.dtype} {tuple(p.shape)} on {p.device}")

    @torch.no_grad()
    def _step_sparse(self, group, params, grad_scale, found_inf, avg_coef) -> None:
        if found_inf_set(found_inf):  # NOTE [found_inf contract]
            return
        lr, wd, momentum = float(group["lr"]), group["weight_decay"], group["momentum"]
        dampening, nesterov = group["dampening"], group["nesterov"]
        options = self.group_options(group)
        mul = self.grad_multiplier * (-1.0 if group["maximize"] else 1.0) * inv_grad_scale(grad_scale)
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
                buf = self.state.get(p, {}).get("momentum_buffer")
                if buf is None:
                    buf = torch.clone(g).detach()
                else:
                    buf.mul_(momentum).add_(g, alpha=1.0 - dampening)
                buffers.append((p, "momentum_buffer", buf))
                g = g.add(buf, alpha=momentum) if nesterov else buf
            p.add_(g, alpha=-lr)
            stepped.append(p)
        self._ft_cache.write_state(self, buffers)
        if avg_coef != 0 and self._ft_sampler is not None and stepped:
            averages = [self._ft_sampler.averages_for([p], average_dtype(options, p.dtype))[0] for p in stepped]
            average_reference_(averages, [p.detach() for p in stepped], avg_coef)

    def _hyper(self, group) -> SgdHyper:
        return SgdHyper(group["lr"], group["weight_decay"], group["momentum"], group["dampening"],
                        bool(group["maximize"]), self.grad_multiplier, self._ft_round_key)

    def _step_plan(self, plan, hyper, grad_scale, found_inf, avg_coef):
        self._commit_buffers(plan, wait=True)  # a previous step's device found_inf is read by now
        n = super()._step_plan(plan, hyper, grad_scale, found_inf, avg_coef)
        if n > 0:
            self._commit_buffers(plan, wait=False)
        return n

    def _commit_buffers(self, plan, wait: bool) -> None:
        """New momentum buffers enter the state once a step that started them is
        known not to be skipped (NOTE [deferred found_inf])."""
        pending = getattr(plan, "_ft_pending", None)
        settled = getattr(plan, "first_step_settled", None)  # the CPU plans read found_inf in the step
        if pending and (wait or settled is None or settled()):
            flags = plan.first_step_flags()
            done = [i for i in pending if not flags[i]]
            self._ft_cache.write_state(self, [(pending[i][0], "momentum_buffer", pending.pop(i)[1]) for i in done])

    def _commit_all_buffers(self, entries) -> None:
        for entry in entries:
            for plan in entry.buckets:
                self._commit_buffers(plan, wait=True)

    def _build_group(self, group, flags):
        old = self._ft_cache.groups.get(id(group))
        if old is not None:  # rebuilt (param_groups edited): keep what its first steps started
            self._commit_all_buffers([old])
        return super()._build_group(group, flags)

    def state_dict(self):
        self._commit_all_buffers(list(self._ft_cache.groups.values()))
        return super().state_dict()


class SGDW(SGD):
    """SGD with decoupled weight decay (SGDW): each step first shrinks the
    weights, ``p <- p * (1 - lr * weight_decay)``, then applies the SGD update
    to the raw gradient. Same arguments as :class:`SGD`."""

    _decoupled_default = True
