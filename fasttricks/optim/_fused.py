"""What the fasttricks optimizers share on top of torch.optim.

Each fasttricks optimizer subclasses torch's own (SGD, Adam, AdamW), so the
constructor arguments, defaults, validation, exception types, state_dict
layout and hooks are torch's. This mixin replaces only the step: per param
group it keeps "plans" (one per device/dtype bucket, see fasttricks/ops) that
hold the params and their state, and each step is one call into a backend.

NOTE [found_inf contract]
GradScaler hands fused optimizers `grad_scale` and `found_inf` as attributes
(`_step_supports_amp_scaling = True`). The kernels divide the gradients by
grad_scale, and a step with found_inf set changes nothing at all: params,
moments, step counters and weight averages keep their values.

NOTE [fused weight averaging]
One weight sampler (fasttricks.sampling) per optimizer can be "fused": its
running averages are attached to the plans, and each step asks it for the
step's coefficient c (0 = no sample) before launching the kernels, which then
update w_hat <- w_hat + c (w - w_hat) in the same memory pass. Further
samplers on the same optimizer run as step post-hooks.
"""
from __future__ import annotations

import itertools

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from fasttricks import _backends
from fasttricks.ops._plan import is_dtensor as _is_dtensor, local_shards

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class _GroupPlans:
    __slots__ = ("key", "buckets", "stateless", "shards")

    def __init__(self, key, buckets, stateless, shards):
        self.key, self.buckets, self.stateless = key, buckets, stateless
        # NOTE [DTensor shards]: (DTensor param, its local shard) for the
        # buckets whose fused plans run on local shards.
        self.shards = shards


class FusedOptimizerMixin:
    """Mixed in before a torch.optim class; subclasses define `_plan_flags`,
    `_needs_state`, `_init_state` and `_build_plan` / `_step_plan`."""

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
        self._ft_plans: dict[int, _GroupPlans] = {}
        # Random gradient (seed 004) and friends fold a factor into the step's
        # gradient scale here; 1.0 means off.
        self.grad_multiplier = 1.0
        self._ft_sampler = None  # NOTE [fused weight averaging]

    # torch wraps `step` to fire the optimizer hooks inside a profiler range.
    # Same hooks, same order; the range only when the profiler is on, since it
    # costs several microseconds of the step's host overhead.
    @staticmethod
    def profile_hook_step(func):
        import functools

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            self = args[0]
            if torch.autograd._profiler_enabled():
                with torch.autograd.profiler.record_function(f"Optimizer.step#{self.__class__.__name__}.step"):
                    return _run_with_hooks(self, func, args, kwargs)
            return _run_with_hooks(self, func, args, kwargs)

        return wrapper

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in ("backend", "master_weights"):
            if key in self.defaults:
                group.setdefault(key, self.defaults[key])
        if "backend" in group:
            _backends.check_backend_name(group["backend"])

    def load_state_dict(self, state_dict):
        kept = [{k: g[k] for k in ("backend", "master_weights") if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, old in zip(self.param_groups, kept):
            for k, v in old.items():
                group.setdefault(k, v)
        # torch casts loaded state to the param dtype; master-weight state is
        # fp32, so take those tensors again from the checkpoint at full precision.
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        master_groups = {id(p) for g in self.param_groups if g.get("master_weights") for p in g["params"]}
        for pid, p in zip(saved_ids, params):
            if id(p) in master_groups and p.dtype in _LOW_PRECISION and pid in state_dict["state"]:
                for k, v in state_dict["state"][pid].items():
                    if k != "step" and torch.is_tensor(v) and v.is_floating_point():
                        self.state[p][k] = v.to(device=p.device, dtype=torch.float32, copy=True)
        self._ft_plans = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._ft_plans = {}
        self.__dict__.setdefault("grad_multiplier", 1.0)
        self.__dict__.setdefault("_ft_sampler", None)
        self._step_supports_amp_scaling = True

    # ---- weight sampling (NOTE [fused weight averaging]) -----------------

    def _ft_attach_sampler(self, sampler) -> bool:
        """Fuse `sampler` into this optimizer's step; False when one already is."""
        if self.__dict__.get("_ft_sampler") is not None:
            return False
        self._ft_sampler = sampler
        self._ft_plans = {}
        return True

    def _ft_detach_sampler(self, sampler) -> None:
        if self.__dict__.get("_ft_sampler") is sampler:
            self._ft_sampler = None
            self._ft_plans = {}

    # ---- the step -------------------------------------------------------

    def _group_plans(self, group) -> _GroupPlans:
        plans = self.__dict__.setdefault("_ft_plans", {})
        key = (id(group["params"]), len(group["params"]), group["backend"], bool(group["master_weights"]),
               *self._plan_flags(group))
        entry = plans.get(id(group))
        if entry is not None and entry.key == key and not any(p.grad is not None for p in entry.stateless) \
                and all(p._local_tensor is local for p, local in entry.shards):
            return entry
        entry = self._build_group(group, key)
        plans[id(group)] = entry
        return entry

    def _build_group(self, group, key) -> _GroupPlans:
        buckets: dict[tuple, list] = {}
        stateless = []
        for p in group["params"]:
            state = self.state[p]
            if self._needs_state(group, state):
                if p.grad is None:
                    stateless.append(p)
                    continue
                self._init_state(group, p, state)
            master = bool(group["master_weights"]) and p.dtype in _LOW_PRECISION
            self._normalise_state(p, state, master)
            buckets.setdefault((p.device, p.dtype, _is_dtensor(p)), []).append(p)
        plans, shards = [], []
        for (device, _dtype, sharded), params in buckets.items():
            backend = _backends.resolve(group["backend"], device)
            master = bool(group["master_weights"]) and _dtype in _LOW_PRECISION
            plan = self._build_plan(backend, group, params, master)
            sampler = self.__dict__.get("_ft_sampler")
            if sampler is not None:
                averages = sampler._averages_for(params, master)
                plan.set_averages(local_shards(averages) if sharded and backend != "reference" else averages)
            if sharded and backend != "reference":
                shards += [(p, p._local_tensor) for p in params]
            plans.append(plan)
        return _GroupPlans(key, plans, stateless, shards)

    def _normalise_state(self, p, state, master: bool) -> None:
        """State dtypes/devices as the kernels need them (after a checkpoint
        load, or a change of master_weights): fp32 with master weights, else
        the param dtype; `step` a float32 tensor (on the param's device off CPU)."""
        want = torch.float32 if master else p.dtype
        for k, v in list(state.items()):
            if k == "step" or not torch.is_tensor(v) or not v.is_floating_point():
                continue
            if k == "master_param" and not master:
                del state[k]
            elif v.dtype != want or v.device != p.device:
                state[k] = v.to(device=p.device, dtype=want)
        if master and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)
        step = state.get("step")
        if step is not None:
            step_device = p.device if p.device.type != "cpu" else torch.device("cpu")
            if not torch.is_tensor(step):
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=step_device)
            elif step.device != step_device or step.dtype not in (torch.float32, torch.float64):
                state["step"] = step.to(device=step_device, dtype=torch.float32)

    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        sampler = self.__dict__.get("_ft_sampler")
        for group in self.param_groups:
            if group.get("differentiable"):
                loss = self._torch_step(closure)
                if sampler is not None:
                    sampler._sample_after_step()
                return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        grad_mul = self.grad_multiplier
        entries = [self._group_plans(group) for group in self.param_groups]
        shards = [pair for entry in entries for pair in entry.shards]
        if shards:
            _bind_shard_grads(shards)
        try:
            if len(entries) > 1 or len(entries[0].buckets) > 1:
                # A bad grad in a later plan must not leave the earlier ones stepped.
                for entry in entries:
                    for plan in entry.buckets:
                        plan.check()
            avg_coef = sampler._begin_step() if sampler is not None else 0.0
            try:
                for group, entry in zip(self.param_groups, entries):
                    for plan in entry.buckets:
                        self._step_plan(plan, group, grad_mul, grad_scale, found_inf, avg_coef)
            except BaseException:
                if sampler is not None:  # the plans check before writing: nothing was stepped
                    sampler._cancel_step()
                raise
        finally:
            for _, local in shards:  # the DTensor grads own these; do not keep them alive
                local.grad = None
        if sampler is not None:
            sampler._end_step(avg_coef, found_inf)
        return loss

    def _torch_step(self, closure):
        """differentiable=True: torch's own (autograd-tracked) implementation."""
        for base in type(self).__mro__:
            if base.__module__.startswith("torch.optim") and "step" in base.__dict__:
                fn = base.__dict__["step"]
                fn = getattr(fn, "__wrapped__", fn) if getattr(fn, "hooked", False) else fn
                return fn(self, closure)
        raise RuntimeError("no torch.optim step to fall back to")


# NOTE [DTensor shards]
# DTensor params (FSDP2's fully_shard, tensor parallel) keep each rank's piece
# in a plain local tensor. The fused plans run on those: the state tensors are
# DTensors laid out like their params, so local shards line up element for
# element, and the step is elementwise. Each step binds the local grad to the
# local param for the C++/device plans to read, after checking that the grad
# is placed like its param (a Partial grad would need a reduction first). The
# plans are rebuilt if a param's local tensor is ever replaced.


def _bind_shard_grads(shards) -> None:
    for p, local in shards:
        g = p.grad
        if g is None:
            local.grad = None
            continue
        if not _is_dtensor(g) or g.placements != p.placements or g.device_mesh != p.device_mesh:
            raise RuntimeError(
                "fasttricks: a DTensor parameter's grad must be a DTensor placed like the parameter "
                f"(param {p.placements}, grad {getattr(g, 'placements', type(g).__name__)}); "
                "redistribute it or use backend='reference'")
        local.grad = g._local_tensor


def _run_with_hooks(self, func, args, kwargs):
    # The emptiness tests skip building chains on the common no-hook path
    # (part of the step's host overhead).
    pre_hooks = self._optimizer_step_pre_hooks
    for pre_hook in itertools.chain(_global_optimizer_pre_hooks.values(), pre_hooks.values()) \
            if _global_optimizer_pre_hooks or pre_hooks else ():
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    out = func(*args, **kwargs)
    self._optimizer_step_code()
    post_hooks = self._optimizer_step_post_hooks
    for post_hook in itertools.chain(post_hooks.values(), _global_optimizer_post_hooks.values()) \
            if post_hooks or _global_optimizer_post_hooks else ():
        post_hook(self, args, kwargs)
    return out
