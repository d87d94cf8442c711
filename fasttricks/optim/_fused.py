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
from fasttricks.optim import _compat, _compiled
from fasttricks.ops.rounding import step_key
from fasttricks.optim._plan_cache import (GroupPlans, PlanCache, average_dtype, backend_for, bind_real_view_grads,
                                          bind_shard_grads, check_precision_options, normalise_state,
                                          rounds_stochastically, state_dtype, uses_master)
from fasttricks.optim._tracked import StateDict, plain

SAMPLER_STATE_KEY = "fasttricks_samplers"  # NOTE [sampler checkpoints]

# The optimizer's own keys in param_groups, beside torch's: never saved in a
# checkpoint (torch's optimizers would copy them into their groups), always
# taken from the constructor (or add_param_group) on load.
FT_GROUP_KEYS = ("backend", "master_weights", "stochastic_rounding", "state_dtype")
# NOTE [stochastic rounding]: the seed and step count of the random bits.
ROUNDING_STATE_KEY = "fasttricks_rounding"


class FusedOptimizerMixin:
    """Mixed in before a torch.optim class; subclasses define `_family_flags`,
    `_needs_state`, `_init_state`, `_build_plan`, `_hyper` and may extend
    `_group_keys` (their own param_group keys) and `_step_plan`."""

    _group_keys = FT_GROUP_KEYS

    profile_hook_step = staticmethod(_compat.profile_hook_step)

    def _ft_init(self, backend: str, master_weights: bool, stochastic_rounding: bool = False,
                 state_dtype=None, rounding_seed: int = 0) -> None:
        _backends.check_backend_name(backend)
        check_precision_options(master_weights, stochastic_rounding, state_dtype)
        if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int):
            raise TypeError(f"rounding_seed must be an int, got {type(rounding_seed).__name__}")
        if backend not in ("auto", "reference"):
            devices = {p.device for g in self.param_groups for p in g["params"]}
            for device in devices or {torch.device("cpu")}:
                _backends.resolve(backend, device)  # raises if unavailable: no silent fallback
        self.defaults["backend"] = backend
        self.defaults["master_weights"] = bool(master_weights)
        self.defaults["stochastic_rounding"] = bool(stochastic_rounding)
        self.defaults["state_dtype"] = state_dtype
        for group in self.param_groups:
            for key in self._group_keys:
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key])
            check_precision_options(group["master_weights"], group["stochastic_rounding"], group["state_dtype"])
        # NOTE [stochastic rounding]: the random bits of step k are keyed by
        # (rounding_seed, k); k counts the steps taken with rounding on.
        self.rounding_seed = rounding_seed
        self._ft_round_step = 0
        self._ft_round_key = 0
        self._step_supports_amp_scaling = True
        self.state = StateDict(self.state)
        self._ft_cache = PlanCache()
        # Random gradient and friends fold a factor into the step's gradient
        # scale here; 1.0 means off.
        self.grad_multiplier = 1.0
        self._ft_sampler = None  # NOTE [fused weight averaging]
        _compiled.register(self)  # NOTE [compiled step]

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in self._group_keys:
            if key in self.defaults:
                group.setdefault(key, self.defaults[key])
        if "backend" in group:
            _backends.check_backend_name(group["backend"])
        if "master_weights" in group:
            check_precision_options(group["master_weights"], group.get("stochastic_rounding"),
                                    group.get("state_dtype"))

    def state_dict(self):
        """torch's state_dict, byte for byte in structure: plain dicts for the
        per-param state, and none of our own group keys (`backend`,
        `master_weights`, SGD's `decoupled_weight_decay`), so that torch's
        optimizers load it exactly as one of their own."""
        state_dict = super().state_dict()
        state_dict["state"] = {k: plain(v) for k, v in state_dict["state"].items()}
        state_dict["param_groups"] = [{k: v for k, v in g.items() if k not in self._group_keys}
                                      for g in state_dict["param_groups"]]
        if any(rounds_stochastically(g) for g in self.param_groups):
            state_dict[ROUNDING_STATE_KEY] = {"seed": self.rounding_seed, "step": self._ft_round_step}
        return state_dict

    def load_state_dict(self, state_dict):
        kept = [{k: g[k] for k in self._group_keys if k in g} for g in self.param_groups]
        self.__dict__.pop("_ft_claimed_samplers", None)
        saved = state_dict.get(SAMPLER_STATE_KEY, {})
        for sampler in self.__dict__.get("_ft_samplers", ()):  # all of them fit, or nothing is loaded
            entry = sampler.saved_state_in(saved)
            if entry is not None:
                sampler.check_state_dict(entry)
        super().load_state_dict(state_dict)
        for group, own in zip(self.param_groups, kept):
            group.update(own)  # the constructor's settings, whatever an older checkpoint saved
        # NOTE [sampler checkpoints] (fasttricks/sampling/_base.py): the samplers
        # attached now loaded theirs in a pre-hook; the rest wait for their sampler.
        claimed = self.__dict__.pop("_ft_claimed_samplers", set())
        self._ft_pending_samplers = {k: v for k, v in saved.items() if k not in claimed}
        rounding = state_dict.get(ROUNDING_STATE_KEY)
        if rounding is not None:
            self.rounding_seed, self._ft_round_step = int(rounding["seed"]), int(rounding["step"])
        # torch casts loaded state to the param dtype; master-weight state is
        # fp32, so take those tensors again from the checkpoint at full precision.
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for group in self.param_groups:
            for p, pid in zip(group["params"], saved_ids):
                want = state_dtype(group, p.dtype)
                if (want != p.dtype or uses_master(group, p.dtype)) and pid in state_dict["state"]:
                    for k, v in state_dict["state"][pid].items():
                        if k != "step" and torch.is_tensor(v) and v.is_floating_point():
                            dtype = torch.float32 if k == "master_param" else want
                            self.state[p][k] = v.to(device=p.device, dtype=dtype, copy=True)
        self._ft_cache.clear()

    def __setstate__(self, state):
        super().__setstate__(state)
        self.state = StateDict(self.state)
        self._ft_cache = PlanCache()
        self.__dict__.setdefault("grad_multiplier", 1.0)
        self.__dict__.setdefault("_ft_sampler", None)
        self.__dict__.setdefault("rounding_seed", 0)
        self.__dict__.setdefault("_ft_round_step", 0)
        self.__dict__.setdefault("_ft_round_key", 0)
        self._step_supports_amp_scaling = True
        if "_ft_compile_id" not in self.__dict__:  # a copy or an unpickled optimizer
            _compiled.register(self)

    def discard_sampler_state(self) -> list[str]:
        """Forget the sampler states of the last loaded checkpoint that no
        sampler claimed (NOTE [sampler checkpoints]); returns their keys."""
        keys = sorted(self.__dict__.get("_ft_pending_samplers") or ())
        self._ft_pending_samplers = {}
        return keys

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
        """The group switches a plan is built for: a change rebuilds it. (Read
        as they are, not through rounds_stochastically() and friends: this runs
        every step, and each call costs the cold step time.)"""
        return (group["backend"], group["master_weights"], group.get("stochastic_rounding"),
                group.get("state_dtype"), group.get("differentiable"), *self._family_flags(group))

    def _build_group(self, group, flags) -> GroupPlans:
        if group.get("differentiable") or any(p.device.type == "meta" for p in group["params"]):
            return GroupPlans(group, flags, [], [], [], torch_step=True)
        buckets: dict[tuple, list] = {}
        stateless, created, sparse = [], [], []
        backends: dict = {}
        try:
            for p in group["params"]:
                if self._sparse_grads_ok and p.grad is not None and p.grad.is_sparse:
                    sparse.append(p)  # NOTE [sparse grads]
                    continue
                state = self.state.get(p)
                if not state:
                    created.append(p)  # dropped below unless this build fills it
                if self._needs_state(group, state):
                    if p.grad is None:
                        stateless.append(p)
                        continue
                    state = self._init_state(group, p)
                if state or uses_master(group, p.dtype):
                    normalise_state(p, self.state[p], group, backend_for(group, p.device, backends))
                buckets.setdefault((p.device, p.dtype, is_dtensor(p)), []).append(p)
            created = [p for p in created if self.state.get(p)]
            entry = self._build_buckets(group, flags, buckets, stateless, backends)
            entry.sparse = sparse
        except BaseException:
            self._forget_state([p for p in created if self.state.get(p)])
            raise
        entry.created = created
        return entry

    def _forget_state(self, params) -> None:
        """A step that raises writes nothing: state entries it created go again."""
        for p in params:
            self.state.pop(p, None)

    def _build_buckets(self, group, flags, buckets, stateless, backends) -> GroupPlans:
        plans, shards, real_views = [], [], []
        index = None
        if rounds_stochastically(group):  # NOTE [stochastic rounding]: keyed by the index among all params
            all_params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
            index = {id(p): i for i, p in enumerate(all_params)}
        for (device, dtype, sharded), params in buckets.items():
            backend = backend_for(group, device, backends)
            master = uses_master(group, dtype)
            view = None
            if dtype.is_complex:  # NOTE [complex params]
                views = {id(p): torch.view_as_real(p.detach()) for p in params}
                view = lambda t, views=views: views.get(id(t)) if id(t) in views else torch.view_as_real(t)  # noqa: E731
                real_views += [(p, views[id(p)]) for p in params]
            rounding = [index[id(p)] for p in params] if index is not None else None
            plan = self._build_plan(backend, group, params, master, view or _same, rounding=rounding)
            if self._ft_sampler is not None:
                averages = [(view or _same)(a)
                            for a in self._ft_sampler.averages_for(params, average_dtype(group, dtype))]
                plan.set_averages(local_shards(averages) if sharded and backend != "reference" else averages)
            if sharded and backend != "reference":
                shards += [(p, p._local_tensor) for p in params]
            plans.append(plan)
        return GroupPlans(group, flags, plans, stateless, shards, real_views=real_views)

    # ---- the step -------------------------------------------------------

    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        if self.__dict__.get("_ft_pending_samplers"):
            raise RuntimeError(
                "fasttricks: the loaded optimizer checkpoint holds the state of sampler(s) "
                f"{sorted(self._ft_pending_samplers)} that no sampler has claimed; create them (same class, and "
                "the same name= if one was given) before stepping, or call optimizer.discard_sampler_state()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if not torch.compiler.is_compiling():
            self._eager_step(grad_scale, found_inf)
        elif any(group.get("differentiable") for group in self.param_groups):
            self._torch_step()  # traced as torch's own step
        else:
            _compiled.step(self, grad_scale, found_inf)  # NOTE [compiled step]: one custom op
        return loss

    def _torch_step(self) -> None:
        """torch's own step, for what the plans leave to it: `differentiable=True`
        (autograd through the update) and meta params (shapes, no values)."""
        _compat.torch_step(self, None)
        if self._ft_sampler is not None:
            self._ft_sampler.sample_after_step()

    def _eager_step(self, grad_scale, found_inf, retry_sparse: bool = True) -> None:
        sampler = self._ft_sampler
        entries = self._ft_cache.lookup(self)
        shards, real_views = [], []
        rounding = False
        for entry in entries:  # one pass: this runs every step
            if entry.torch_step:
                self._torch_step()
                return
            rounding = rounding or entry.rounding
            if entry.shards or entry.real_views:
                shards += entry.shards
                real_views += entry.real_views
        if rounding:  # NOTE [stochastic rounding]: this step's key
            self._ft_round_step += 1
            self._ft_round_key = step_key(self.rounding_seed, self._ft_round_step)
        try:
            if shards:
                bind_shard_grads(shards)
            if real_views:
                bind_real_view_grads(real_views, type(self).__name__)
            if len(entries) > 1 or len(entries[0].buckets) > 1 or entries[0].sparse:
                # A bad grad in a later plan must not leave the earlier ones stepped.
                for entry in entries:
                    for plan in entry.buckets:
                        plan.check()
                    if entry.sparse:
                        self._check_sparse(entry.sparse)
            avg_coef = sampler.begin_step() if sampler is not None else 0.0
            try:
                # The sparse params first: their torch ops are the only part of a
                # step that can still fail once the plans have been checked.
                for group, entry in zip(self.param_groups, entries):
                    if entry.sparse:
                        self._step_sparse(group, entry.sparse, grad_scale, found_inf, avg_coef)
                for group, entry in zip(self.param_groups, entries):
                    hyper = self._hyper(group)
                    for plan in entry.buckets:
                        self._step_plan(plan, hyper, grad_scale, found_inf, avg_coef)
            except BaseException:
                if sampler is not None:  # the plans check before writing: nothing was stepped
                    sampler.cancel_step()
                raise
        except BaseException as exc:
            # ... and the state this step created goes again (the plans are built anew next time).
            for entry in entries:
                self._forget_state(entry.created)
            self._ft_cache.clear()
            if rounding:
                self._ft_round_step -= 1
            # NOTE [sparse grads]: a param that had a dense grad when its plan was
            # built has a sparse one now (its plan refused it, writing nothing);
            # the plans, rebuilt as after any failed step, take it out of the
            # fused step. Asked of the grads, not of the error's wording.
            if not (retry_sparse and isinstance(exc, RuntimeError) and self._sparse_grads_ok and any(
                    p.grad is not None and p.grad.is_sparse for g in self.param_groups for p in g["params"])):
                raise
            return self._eager_step(grad_scale, found_inf, retry_sparse=False)
        finally:
            for _, view in shards + real_views:  # the params' grads own these: do not keep them alive
                view.grad = None
        for entry in entries:
            entry.created = ()
        if sampler is not None:
            sampler.end_step(avg_coef, found_inf)

    #: NOTE [sparse grads]: the family steps sparse grads outside the fused plans
    _sparse_grads_ok = False

    def _check_sparse(self, params) -> None:
        raise NotImplementedError

    def _step_sparse(self, group, params, grad_scale, found_inf, avg_coef) -> None:
        raise NotImplementedError

    def _step_plan(self, plan, hyper, grad_scale, found_inf, avg_coef):
        """The number of params stepped (-1: skipped by found_inf)."""
        return plan.step(hyper, grad_scale, found_inf, avg_coef)


def _same(t):
    return t
