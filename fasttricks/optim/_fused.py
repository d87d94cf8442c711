"""What the fasttricks optimizers share on top of torch.optim.

Each fasttricks optimizer subclasses torch's own (SGD, Adam, AdamW), so the
constructor arguments, defaults, validation, exception types, state_dict
layout and hooks are torch's. This mixin replaces only the step: per param
group it keeps plans (one per device/dtype bucket, built by fasttricks/ops;
cached as NOTE [plan cache] in _plan_cache.py says), and each step is one
call into a backend per plan. The route of one step is drawn in
docs/architecture.md.

NOTE [found_inf contract]
GradScaler hands fused optimizers `grad_scale` and `found_inf` as attributes
(`_step_supports_amp_scaling = True`). The kernels divide the gradients by
grad_scale, and a step with found_inf set changes nothing at all: params,
moments, step counters and weight averages keep their values, and no state
is created that a committed step would have created (SGD's momentum buffer).

NOTE [fused weight averaging]
One weight sampler (fasttricks.sampling) per optimizer can be fused
(`attach_averager`): its running averages are attached to the plans, and each
step asks it for the step's coefficient c (0 = no sample) before launching
the kernels, which then update w_hat <- w_hat + c (w - w_hat) in the same
memory pass. Further samplers on the same optimizer run as step post-hooks.
"""
from __future__ import annotations

import itertools

import torch

from fasttricks import _backends
from fasttricks.ops._plan import is_dtensor, local_shards
from fasttricks.optim import _compat
from fasttricks.optim._plan_cache import (GroupPlans, PlanCache, backend_for, bind_shard_grads, normalise_state,
                                          uses_master)
from fasttricks.optim._tracked import StateDict

# The optimizer's own keys in param_groups, beside torch's.
FT_GROUP_KEYS = ("backend", "master_weights")


class FusedOptimizerMixin:
    """Mixed in before a torch.optim class; subclasses define `_family_flags`,
    `_needs_state`, `_init_state`, `_build_plan` and `_step_plan`."""

    profile_hook_step = staticmethod(_compat.profile_hook_step)

    def _ft_init(self, backend: str, master_weights: bool) -> None:
        _backends.check_backend_name(backend)
        if backend not in ("auto", "reference"):
            devices = {p.device for g in self.param_groups for p in g["params"]}
            for device in devices or {torch.device("cpu")}:
                _backends.resolve(backend, device)  # raises if unavailable: no silent fallback
        self.defaults["backend"] = backend
        self.defaults["master_weights"] = bool(master_weights)
        for group in self.param_groups:
            group.setdefault("backend", backend)
            group.setdefault("master_weights", bool(master_weights))
        self._step_supports_amp_scaling = True
        self.state = StateDict(self.state)
        self._ft_cache = PlanCache()
        # Random gradient and friends fold a factor into the step's gradient
        # scale here; 1.0 means off.
        self.grad_multiplier = 1.0
        self._ft_sampler = None  # NOTE [fused weight averaging]

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in FT_GROUP_KEYS:
            if key in self.defaults:
                group.setdefault(key, self.defaults[key])
        if "backend" in group:
            _backends.check_backend_name(group["backend"])

    def state_dict(self):
        """torch's state_dict, with plain dicts for the per-param state."""
        state_dict = super().state_dict()
        state_dict["state"] = {k: dict(v) for k, v in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict):
        kept = [{k: g[k] for k in FT_GROUP_KEYS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, old in zip(self.param_groups, kept):
            for k, v in old.items():
                group.setdefault(k, v)
        # torch casts loaded state to the param dtype; master-weight state is
        # fp32, so take those tensors again from the checkpoint at full precision.
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for group in self.param_groups:
            for p, pid in zip(group["params"], saved_ids):
                if uses_master(group, p.dtype) and pid in state_dict["state"]:
                    for k, v in state_dict["state"][pid].items():
                        if k != "step" and torch.is_tensor(v) and v.is_floating_point():
                            self.state[p][k] = v.to(device=p.device, dtype=torch.float32, copy=True)
        self._ft_cache.clear()

    def __setstate__(self, state):
        super().__setstate__(state)
        self.state = StateDict(self.state)
        self._ft_cache = PlanCache()
        self.__dict__.setdefault("grad_multiplier", 1.0)
        self.__dict__.setdefault("_ft_sampler", None)
        self._step_supports_amp_scaling = True

    # ---- fused weight averaging (NOTE [fused weight averaging]) ------------

    def attach_averager(self, sampler) -> bool:
        """Fuse `sampler`'s averaging into this optimizer's step; False when
        another sampler already is. The sampler provides `averages_for(params,
        master)`, `begin_step() -> c`, `cancel_step()`, `end_step(c, found_inf)`
        and `sample_after_step()` (used by the differentiable fallback)."""
        if self._ft_sampler is not None:
            return False
        self._ft_sampler = sampler
        self._ft_cache.clear()
        return True

    def detach_averager(self, sampler) -> None:
        if self._ft_sampler is sampler:
            self._ft_sampler = None
            self._ft_cache.clear()

    # ---- plans (NOTE [plan cache]) -------------------------------------------

    def _plan_flags(self, group) -> tuple:
        """The group switches a plan is built for: a change rebuilds it."""
        return (group["backend"], bool(group["master_weights"]), *self._family_flags(group))

    def _build_group(self, group, flags) -> GroupPlans:
        buckets: dict[tuple, list] = {}
        stateless = []
        backends: dict = {}
        for p in group["params"]:
            state = self.state.get(p)
            if self._needs_state(group, state):
                if p.grad is None:
                    stateless.append(p)
                    continue
                state = self._init_state(group, p)
            master = uses_master(group, p.dtype)
            if state or master:
                normalise_state(p, self.state[p], master, backend_for(group, p.device, backends))
            buckets.setdefault((p.device, p.dtype, is_dtensor(p)), []).append(p)
        plans, shards = [], []
        for (device, dtype, sharded), params in buckets.items():
            backend = backend_for(group, device, backends)
            master = uses_master(group, dtype)
            plan = self._build_plan(backend, group, params, master)
            if self._ft_sampler is not None:
                averages = self._ft_sampler.averages_for(params, master)
                plan.set_averages(local_shards(averages) if sharded and backend != "reference" else averages)
            if sharded and backend != "reference":
                shards += [(p, p._local_tensor) for p in params]
            plans.append(plan)
        return GroupPlans(group, flags, plans, stateless, shards)

    # ---- the step -------------------------------------------------------

    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        sampler = self._ft_sampler
        for group in self.param_groups:
            if group.get("differentiable"):
                loss = _compat.torch_step(self, closure)
                if sampler is not None:
                    sampler.sample_after_step()
                return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        entries = self._ft_cache.lookup(self)
        shards = [pair for entry in entries for pair in entry.shards]
        if shards:
            bind_shard_grads(shards)
        try:
            if len(entries) > 1 or len(entries[0].buckets) > 1:
                # A bad grad in a later plan must not leave the earlier ones stepped.
                for entry in entries:
                    for plan in entry.buckets:
                        plan.check()
            avg_coef = sampler.begin_step() if sampler is not None else 0.0
            try:
                for group, entry in zip(self.param_groups, entries):
                    hyper = self._hyper(group)
                    for plan in entry.buckets:
                        self._step_plan(plan, hyper, grad_scale, found_inf, avg_coef)
            except BaseException:
                if sampler is not None:  # the plans check before writing: nothing was stepped
                    sampler.cancel_step()
                raise
        finally:
            for _, local in shards:  # the DTensor grads own these; do not keep them alive
                local.grad = None
        if sampler is not None:
            sampler.end_step(avg_coef, found_inf)
        return loss

    def _step_plan(self, plan, hyper, grad_scale, found_inf, avg_coef):
        return plan.step(hyper, grad_scale, found_inf, avg_coef)

