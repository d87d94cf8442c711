"""torch's face of a fasttricks optimizer: options, checkpoints, samplers and step().

Each fasttricks optimizer subclasses torch's own (SGD, Adam, AdamW), so the
constructor arguments, defaults, validation, exception types, state_dict
layout and hooks are torch's. This mixin replaces only the step: per param
group it keeps plans (one per device/dtype bucket, built by fasttricks/ops;
cached as NOTE [plan cache] in _plan_cache.py says), and each step is one
call into a backend per plan. The route of one step is drawn in
docs/architecture.md.

NOTE [found_inf contract]
Under a GradScaler the optimizers behave as torch.optim's non-fused ones by
default: `_step_supports_amp_scaling` is off, so the scaler unscales the
grads itself, checks them for infs and does not call `step()` at all on an
overflow. Frameworks rely on that: Lightning clips grads under 16-mixed only
for optimizers that do not unscale inside their step, and accelerate and the
HF Trainer see a skipped step (and hold the LR schedule) by `step()` not
being called. `fused=True`, torch's own opt-in, turns on the fused unscale:
the scaler then hands the step `grad_scale` and `found_inf` as attributes,
the kernels divide the gradients by grad_scale, and a step with found_inf
set changes nothing at all: params, moments, step counters and weight
averages keep their values, and no state is created that a committed step
would have created (SGD's momentum buffer).

NOTE [fused weight averaging]
One weight sampler (fasttricks.sampling) per optimizer can be fused
(`attach_averager`): its running averages are attached to the plans, and each
step asks it for the step's coefficient c (0 = no sample) before launching
the kernels, which then update w_hat <- w_hat + c (w - w_hat) in the same
memory pass. Further samplers on the same optimizer run as step post-hooks.

NOTE [group options]
Our per-group settings (backend, master_weights, stochastic_rounding,
state_dtype; SGD's decoupled_weight_decay) live beside `param_groups`, never
in them: torch's machinery reads every key of a live group (DCP's flattened
load looks each one up in the checkpoint, torch's add_param_group copies
`defaults` into every group, a torch optimizer that loads our checkpoint
copies its group keys). A group dict given to the constructor or to
add_param_group may carry them; they are taken out of it. The store maps a
group (by identity) to its options; `group_options(group)` reads them,
`set_group_options(group, ...)` changes them (that group's plans are
rebuilt); load_state_dict keeps each group's options by position, as torch
keeps its params; deepcopy and pickle keep them (__getstate__).
"""
from __future__ import annotations

import itertools

import torch

from fasttricks import _backends
from fasttricks.ops.family import Family
from fasttricks.ops.precision import check_precision_options, rounds_stochastically, state_dtype, uses_master
from fasttricks.ops.norm import NormPlans
from fasttricks.optim import _clip, _compat, _compiled
from fasttricks.optim._engine import RoundingSteps, StepEngine
from fasttricks.optim._tracked import StateDict, plain
from fasttricks.optim.state_extras import (LEGACY_ROUNDING_STATE_KEY, LEGACY_SAMPLER_STATE_KEY, ROUNDING_SEED_KEY,
                                           ROUNDING_STEP_KEY, anchor_param, drop_extras, is_extra_key, write_state)

# NOTE [group options]: the options every family has.
FT_OPTION_NAMES = ("backend", "master_weights", "stochastic_rounding", "state_dtype")


class FusedOptimizerMixin:
    """Mixed in before a torch.optim class: torch's face of a fasttricks
    optimizer (options, checkpoints, sampler attachment) over a StepEngine.
    Subclasses set `_family` (fasttricks/ops/family.py) and may extend
    `_option_names` (their own per-group options)."""

    _family: Family

    _option_names = FT_OPTION_NAMES
    _option_defaults: dict = {}  # a family's defaults for options beyond FT_OPTION_NAMES

    profile_hook_step = staticmethod(_compat.profile_hook_step)

    def _ft_init(self, backend: str, master_weights: bool, stochastic_rounding: bool = False,
                 state_dtype=None, rounding_seed: int = 0) -> None:
        _backends.check_backend_name(backend)
        check_precision_options(master_weights, stochastic_rounding, state_dtype)
        if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int):
            raise TypeError(f"rounding_seed must be an int, got {type(rounding_seed).__name__}")
        self._ft_defaults = {"backend": backend, "master_weights": bool(master_weights),
                             "stochastic_rounding": bool(stochastic_rounding), "state_dtype": state_dtype,
                             **self._option_defaults}
        given = self.__dict__.get("_ft_options", {})
        self._ft_options = {}
        for group in self.param_groups:
            entry = given.get(id(group))
            self._ft_options[id(group)] = (group, self._complete_options(entry[1] if entry else {}))
        if backend not in ("auto", "reference"):
            devices = {p.device for g in self.param_groups for p in g["params"]}
            for device in devices or {torch.device("cpu")}:
                _backends.resolve(backend, device)  # raises if unavailable: no silent fallback
        # NOTE [stochastic rounding]: the random bits of step k are keyed by
        # (rounding_seed, k); k counts the steps taken with rounding on.
        self.rounding_seed = rounding_seed
        self._ft_round_step = 0
        # NOTE [found_inf contract]: the fused unscale only on torch's opt-in.
        self._step_supports_amp_scaling = any(bool(g.get("fused")) for g in self.param_groups)
        self.state = StateDict(self.state)
        self._ft_engine = StepEngine(self._family)
        # Random gradient and friends fold a factor into the step's gradient
        # scale here; 1.0 means off.
        self.grad_multiplier = 1.0
        self._ft_sampler = None  # NOTE [fused weight averaging]
        # NOTE [clip in the step] in _clip.py: the pending clip, 0 or 1 of them. A
        # list mutated in place: a compiled step may not set attributes on the
        # optimizer under torch 2.11's dynamo.
        self._ft_clip = []
        _compiled.register(self)  # NOTE [compiled step]

    # ---- per-group options (NOTE [group options]) ------------------------------

    def _complete_options(self, given: dict) -> dict:
        options = {**self._ft_defaults, **given}
        _backends.check_backend_name(options["backend"])
        check_precision_options(options["master_weights"], options["stochastic_rounding"], options["state_dtype"])
        options["master_weights"] = bool(options["master_weights"])
        options["stochastic_rounding"] = bool(options["stochastic_rounding"])
        return options

    def group_options(self, group) -> dict:
        """The fasttricks options of `group` (one of `param_groups`): backend,
        master_weights, stochastic_rounding, state_dtype (and SGD's
        decoupled_weight_decay). Read-only: change them with set_group_options."""
        entry = self._ft_options.get(id(group))
        if entry is None or entry[0] is not group:  # a group dict put in by hand: the defaults
            entry = self._ft_options[id(group)] = (group, self._complete_options(self._take_options(group)))
        return entry[1]

    def set_group_options(self, group, **options) -> None:
        """Change fasttricks options of one param group (a dict of
        `param_groups`, or its index); the group's plans are rebuilt."""
        if isinstance(group, int):
            group = self.param_groups[group]
        unknown = sorted(set(options) - set(self._option_names))
        if unknown:
            raise TypeError(f"set_group_options: unknown option(s) {unknown}; options are {list(self._option_names)}")
        merged = self._complete_options({**self.group_options(group), **options})
        if merged.get("backend") not in ("auto", "reference"):
            for device in {p.device for p in group["params"]}:
                _backends.resolve(merged["backend"], device)
        self._ft_options[id(group)] = (group, merged)

    def _take_options(self, group) -> dict:
        return {k: group.pop(k) for k in self._option_names if k in group}

    def add_param_group(self, param_group):
        if not isinstance(param_group, dict):
            return super().add_param_group(param_group)  # torch's TypeError
        given = self._take_options(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        store = self.__dict__.setdefault("_ft_options", {})
        # Before _ft_init (torch's constructor adds the groups) the defaults are not known yet.
        store[id(group)] = (group, self._complete_options(given) if "_ft_defaults" in self.__dict__ else given)

    # ---- checkpoints -------------------------------------------------------------

    def state_dict(self):
        """torch's state_dict, byte for byte in structure (plain dicts for the
        per-param state, torch's keys only in param_groups), so that torch's
        optimizers load it exactly as one of their own; the extras (NOTE
        [state-resident extras]) ride in the per-param state."""
        self._ft_engine.settle(self.state)
        if any(rounds_stochastically(self.group_options(g)) for g in self.param_groups):
            anchor = anchor_param(self)
            write_state(self, [(anchor, ROUNDING_SEED_KEY, int(self.rounding_seed)),
                               (anchor, ROUNDING_STEP_KEY, int(self._ft_round_step))])
        state_dict = super().state_dict()
        state_dict["state"] = {k: plain(v) for k, v in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict):
        kept = [self.group_options(g) for g in self.param_groups]
        self.__dict__.pop("_ft_claimed_samplers", None)
        super().load_state_dict(state_dict)  # samplers check (pre-hook) and load (post-hook) theirs
        self._ft_options = {}
        for group, options in zip(self.param_groups, kept):
            self._take_options(group)  # an older checkpoint may have saved some
            self._ft_options[id(group)] = (group, options)  # the constructor's settings
        saved_ids = list(itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        saved_states = [state_dict["state"].get(pid) for pid in saved_ids]
        # NOTE [stochastic rounding]: the counters, on the anchor (or, older, beside the state).
        rounding = state_dict.get(LEGACY_ROUNDING_STATE_KEY)
        found = next((s for s in saved_states if isinstance(s, dict) and ROUNDING_STEP_KEY in s), None)
        if found is not None:
            rounding = {"seed": found.get(ROUNDING_SEED_KEY, self.rounding_seed), "step": found[ROUNDING_STEP_KEY]}
        if rounding is not None:
            self.rounding_seed, self._ft_round_step = int(rounding["seed"]), int(rounding["step"])
        # NOTE [sampler checkpoints] (fasttricks/sampling/_checkpoint.py): the samplers
        # attached now loaded theirs in their hooks; the rest wait for their sampler.
        claimed = self.__dict__.pop("_ft_claimed_samplers", set())
        pending = {k: v for k, v in state_dict.get(LEGACY_SAMPLER_STATE_KEY, {}).items() if k not in claimed}
        for state in saved_states:
            for k in state or ():
                if is_extra_key(k) and k.endswith("/total_steps") and k[:-len("/total_steps")] not in claimed:
                    pending.setdefault(k[:-len("/total_steps")], None)  # None: in optimizer.state
        self._ft_pending_samplers = pending
        # torch casts loaded state to the param dtype; master-weight state is
        # fp32 (and so are the averages of 16-bit params with master weights or
        # stochastic rounding), so take those tensors again from the checkpoint
        # at full precision. The claimed samplers' averages are their own again.
        saved_of = iter(saved_states)
        for group in self.param_groups:
            options = self.group_options(group)
            for p in group["params"]:
                saved = next(saved_of, None)
                if not saved:
                    continue
                want = state_dtype(options, p.dtype)
                for k, v in saved.items():
                    if k == "step" or not torch.is_tensor(v) or not v.is_floating_point():
                        continue
                    if is_extra_key(k):
                        if k.split("/", 1)[0] in pending:
                            self.state[p][k] = v.to(device=p.device, copy=True)
                    elif want != p.dtype or uses_master(options, p.dtype):
                        self.state[p][k] = v.to(device=p.device, copy=True,
                                                dtype=torch.float32 if k == "master_param" else want)
        self._ft_engine.clear()

    def __getstate__(self):
        state = super().__getstate__()
        # NOTE [group options]: torch pickles defaults, state and param_groups only.
        state["fasttricks"] = {"defaults": dict(self._ft_defaults),
                               "group_options": [dict(self.group_options(g)) for g in self.param_groups],
                               "rounding_seed": self.rounding_seed, "rounding_step": self._ft_round_step}
        return state

    def __setstate__(self, state):
        extra = state.pop("fasttricks", None)
        super().__setstate__(state)
        self.state = StateDict(self.state)
        self._ft_engine = StepEngine(self._family)
        if extra is not None:  # an unpickled or deep-copied optimizer
            self._ft_defaults = extra["defaults"]
            self._ft_options = {id(g): (g, dict(o)) for g, o in zip(self.param_groups, extra["group_options"])}
            self.rounding_seed, self._ft_round_step = extra["rounding_seed"], extra["rounding_step"]
        elif "_ft_defaults" not in self.__dict__:  # pickled by a version that kept the options in the groups
            self._ft_defaults = {"backend": "auto", "master_weights": False, "stochastic_rounding": False,
                                 "state_dtype": None, **self._option_defaults}
            for k in self._option_names:
                if k in self.defaults:
                    self._ft_defaults[k] = self.defaults.pop(k)
            self._ft_options = {id(g): (g, self._complete_options(self._take_options(g))) for g in self.param_groups}
        # (else: torch's load_state_dict, which sets state and param_groups only: load_state_dict re-keys the options)
        self.__dict__.setdefault("grad_multiplier", 1.0)
        self.__dict__.setdefault("_ft_sampler", None)
        self.__dict__.setdefault("rounding_seed", 0)
        self.__dict__.setdefault("_ft_round_step", 0)
        self.__dict__.setdefault("_ft_clip", [])
        if "_step_supports_amp_scaling" not in self.__dict__:  # NOTE [found_inf contract]: torch's pickling forgets it
            self._step_supports_amp_scaling = any(bool(g.get("fused")) for g in self.param_groups)
        if "_ft_compile_id" not in self.__dict__:  # a copy or an unpickled optimizer
            _compiled.register(self)

    def discard_sampler_state(self) -> list[str]:
        """Forget the sampler states of the last loaded checkpoint that no
        sampler claimed (NOTE [sampler checkpoints]); returns their keys."""
        keys = sorted(self.__dict__.get("_ft_pending_samplers") or ())
        self._ft_pending_samplers = {}
        drop_extras(self, keys)
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
        self._ft_engine.clear()
        return True

    def detach_averager(self, sampler) -> None:
        if self._ft_sampler is sampler:
            self._ft_sampler = None
            self._ft_engine.clear()

    # ---- clipping (NOTE [clip in the step] in _clip.py) -----------------------

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None, inplace: bool = False) -> torch.Tensor:
        """Clip the gradient norm of all params, as torch.nn.utils.clip_grad_norm_
        over this optimizer's params, folded into the next step: returns the
        total norm (a 0-dim tensor, no host sync); the next step scales the
        grads by min(1, max_norm / norm) inside its kernels and skips when the
        norm is not finite. `inplace=True` rewrites the grads now, as torch does."""
        max_norm = float(max_norm)
        if not max_norm >= 0.0:
            raise ValueError(f"max_norm must be >= 0, got {max_norm}")
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        self._ft_clip.clear()
        if not params:
            return torch.tensor(0.0)
        backends = {self.group_options(g)["backend"] for g in self.param_groups}
        plans = self.__dict__.get("_ft_norm_plans")
        if plans is None:  # not pickled: built on first use
            plans = self._ft_norm_plans = NormPlans()
        norm, step_norm = _clip.total_norm(params, norm_type, error_if_nonfinite, foreach,
                                           backends.pop() if len(backends) == 1 else "auto", plans)
        # In place where the step cannot take it as a scale (no step_norm: grads on
        # several devices, sparse grads, DTensors not sharded over one 1-D mesh),
        # or where torch takes the step itself.
        if inplace or step_norm is None or any(group.get("differentiable") for group in self.param_groups):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach)
        else:
            self._ft_clip.append(_clip.PendingClip(step_norm, max_norm))
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._ft_clip.clear()  # a clip applies to the grads it measured
        super().zero_grad(set_to_none)

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
        pending = self._ft_clip
        if pending:  # NOTE [clip in the step]
            grad_scale, found_inf = pending[0].fold(grad_scale, found_inf)
        if not torch.compiler.is_compiling():
            self._eager_step(grad_scale, found_inf)
        elif any(group.get("differentiable") for group in self.param_groups):
            self._torch_step()  # traced as torch's own step
        else:
            _compiled.step(self, grad_scale, found_inf)  # NOTE [compiled step]: one custom op
        if pending:
            pending.clear()
        return loss

    def _torch_step(self) -> None:
        """torch's own step, for what the plans leave to it: `differentiable=True`
        (autograd through the update) and meta params (shapes, no values)."""
        _compat.torch_step(self, None)
        if self._ft_sampler is not None:
            self._ft_sampler.sample_after_step()

    def _options(self) -> list[dict]:
        return [self.group_options(g) for g in self.param_groups]

    def _plans(self):
        """This step's plans (NOTE [plan cache]), cached or built."""
        return self._ft_engine.plans(self.state, self.param_groups, self._options(), self._ft_sampler)

    def _eager_step(self, grad_scale, found_inf) -> None:
        if type(self.state) is not StateDict:  # a plain dict put in by hand: ours again
            self.state = StateDict(self.state)
        rounding = RoundingSteps(self.rounding_seed, self._ft_round_step)
        try:
            done = self._ft_engine.step(self.state, self.param_groups, self._options(), grad_scale, found_inf,
                                        grad_mul=self.grad_multiplier, rounding=rounding, sampler=self._ft_sampler)
        finally:
            self._ft_round_step = rounding.step
        if not done:
            self._torch_step()
