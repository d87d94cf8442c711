"""The step engine: plans built from a family's record and cached, and the eager step over them.

The record is fasttricks/ops/family.py's; the cache is NOTE [plan cache].
The eager step rolls back whatever it did when it raises, and retries once
when a param's grad turned sparse.

It takes the state, the param groups and their options as arguments and
never calls back into the optimizer object; the optimizer (optim/_fused.py)
is torch's face and hands each step here. A collaborator passed in, the
fused sampler, is asked for the step's averaging coefficient (NOTE [fused
weight averaging]).
"""
from __future__ import annotations

import itertools

import torch

from fasttricks.ops._plan import is_dtensor, local_shards
from fasttricks.ops.family import Family, is_extra_key, own_state_empty
from fasttricks.ops.precision import average_dtype, rounds_stochastically, uses_master
from fasttricks.ops.rounding import step_key
from fasttricks.optim._plan_cache import GroupPlans, PlanCache, backend_for, normalise_state
from fasttricks.optim._tracked import ParamList


class RoundingSteps:
    """NOTE [stochastic rounding]: the random bits of step k are keyed by
    (seed, k); k counts the steps taken with rounding on."""

    __slots__ = ("seed", "step", "key")

    def __init__(self, seed: int, step: int):
        self.seed, self.step, self.key = seed, step, 0

    def advance(self) -> None:
        self.step += 1
        self.key = step_key(self.seed, self.step)

    def undo(self) -> None:
        self.step -= 1


def _same(t):
    return t


# NOTE [sparse grads]
# torch's SGD takes sparse gradients (nn.Embedding(sparse=True)). A family
# with `sparse` steps params that have one outside the fused plans, with
# torch's single-tensor formulas in torch ops, while the dense params of the
# group still take the fused step; the others raise torch's RuntimeError from
# their plans.


class StepEngine:
    def __init__(self, family: Family):
        self.family = family
        self.cache = PlanCache()

    def clear(self) -> None:
        self.cache.clear()

    def write_state(self, state, writes) -> None:
        """State writes that change nothing a plan holds (keep the cache valid)."""
        self.cache.write_state(state, writes)

    def settle(self, state) -> None:
        """Write what the plans' last steps settled (family.commit), e.g. before a checkpoint."""
        if self.family.commit is not None:
            for entry in list(self.cache.groups.values()):
                self._commit(state, entry, wait=True)

    # ---- the plans (NOTE [plan cache]) ----------------------------------------------

    def plans(self, state, groups, options, sampler) -> list[GroupPlans]:
        """The plans of every group, cached or built again where something they
        hold changed. O(groups) per step."""
        cache = self.cache
        cache.follow(state)
        entries = []
        for group, opts in zip(groups, options):
            if type(group["params"]) is not ParamList:
                group["params"] = ParamList(group["params"])
            # Read as they are, not through rounds_stochastically() and friends:
            # this runs every step, and each call costs the cold step time.
            flags = (opts["backend"], opts["master_weights"], opts["stochastic_rounding"], opts["state_dtype"],
                     group.get("differentiable"), *self.family.plan_flags(group, opts))
            entry = cache.groups.get(id(group))
            if entry is None or not entry.valid(group, flags):
                if entry is not None and self.family.commit is not None:
                    self._commit(state, entry, wait=True)  # rebuilt: keep what its first steps started
                entry = cache.groups[id(group)] = self._build_group(state, groups, group, opts, flags, sampler)
            entries.append(entry)
        cache.settled(entries)
        return entries

    def _build_group(self, state, groups, group, options, flags, sampler) -> GroupPlans:
        if group.get("differentiable") or any(p.device.type == "meta" for p in group["params"]):
            return GroupPlans(group, flags, [], [], [], torch_step=True)
        family = self.family
        buckets: dict[tuple, list] = {}
        stateless, created, sparse = [], [], []
        backends: dict = {}
        try:
            for p in group["params"]:
                if family.sparse is not None and p.grad is not None and p.grad.is_sparse:
                    sparse.append(p)  # NOTE [sparse grads]
                    continue
                s = state.get(p)
                if own_state_empty(s):
                    created.append(p)  # dropped below unless this build fills it
                if family.needs_state(group, s):
                    if p.grad is None:
                        stateless.append(p)
                        continue
                    s = family.init_state(state, group, p)
                if s or uses_master(options, p.dtype):
                    normalise_state(p, state[p], options, backend_for(options, p.device, backends))
                buckets.setdefault((p.device, p.dtype, is_dtensor(p)), []).append(p)
            created = [p for p in created if not own_state_empty(state.get(p))]
            entry = self._build_buckets(state, groups, group, options, flags, buckets, stateless, backends, sampler)
            entry.sparse = sparse
        except BaseException:
            forget_state(state, [p for p in created if not own_state_empty(state.get(p))])
            raise
        entry.created = created
        return entry

    def _build_buckets(self, state, groups, group, options, flags, buckets, stateless, backends,
                       sampler) -> GroupPlans:
        plans, shards, real_views = [], [], []
        index = None
        rounding_on = rounds_stochastically(options)
        if rounding_on:  # NOTE [stochastic rounding]: keyed by the index among all params
            index = {id(p): i for i, p in enumerate(itertools.chain.from_iterable(g["params"] for g in groups))}
        for (device, dtype, sharded), params in buckets.items():
            backend = backend_for(options, device, backends)
            view = None
            if dtype.is_complex:  # NOTE [complex params]
                views = {id(p): torch.view_as_real(p.detach()) for p in params}
                view = lambda t, views=views: views.get(id(t)) if id(t) in views else torch.view_as_real(t)  # noqa: E731
                real_views += [(p, views[id(p)]) for p in params]
            rounding = [index[id(p)] for p in params] if index is not None else None
            plan = self.family.build_plan(state, backend, group, options, params, uses_master(options, dtype),
                                          view or _same, rounding)
            if sampler is not None:
                averages = [(view or _same)(a) for a in sampler.averages_for(params, average_dtype(options, dtype))]
                plan.set_averages(local_shards(averages) if sharded and backend != "reference" else averages)
            if sharded and backend != "reference":
                shards += [(p, p._local_tensor) for p in params]
            plans.append(plan)
        return GroupPlans(group, flags, plans, stateless, shards, real_views=real_views, rounding=rounding_on)

    def _commit(self, state, entry, wait: bool) -> None:
        for plan in entry.buckets:
            self.cache.write_state(state, self.family.commit(plan, wait))

    # ---- the step ------------------------------------------------------------------

    def step(self, state, groups, options, grad_scale, found_inf, *, grad_mul: float, rounding: RoundingSteps,
             sampler, retry_sparse: bool = True) -> bool:
        """One eager step over every group; False when a group needs torch's own
        step instead (differentiable=True, meta params), nothing done. A step
        that raises writes nothing (NOTE [found_inf contract] for found_inf)."""
        family = self.family
        entries = self.plans(state, groups, options, sampler)
        shards, real_views = [], []
        rounding_on = False
        for entry in entries:  # one pass: this runs every step
            if entry.torch_step:
                return False
            rounding_on = rounding_on or entry.rounding
            if entry.shards or entry.real_views:
                shards += entry.shards
                real_views += entry.real_views
        if rounding_on:  # NOTE [stochastic rounding]: this step's key
            rounding.advance()
        try:
            if shards:
                bind_shard_grads(shards)
            if real_views:
                bind_real_view_grads(real_views, family.name)
            if len(entries) > 1 or len(entries[0].buckets) > 1 or entries[0].sparse:
                # A bad grad in a later plan must not leave the earlier ones
                # stepped: every plan is checked before any steps, but the one
                # that steps first (when no sparse params go before it), whose
                # own step checks before it writes.
                first = not any(entry.sparse for entry in entries)
                for entry in entries:
                    for plan in entry.buckets:
                        if first:
                            first = False
                            continue
                        plan.check()
                    if entry.sparse:
                        family.sparse.check(entry.sparse)
            avg_coef = sampler.begin_step() if sampler is not None else 0.0
            try:
                # The sparse params first: their torch ops are the only part of a
                # step that can still fail once the plans have been checked.
                for group, opts, entry in zip(groups, options, entries):
                    if entry.sparse:
                        self.cache.write_state(state, family.sparse.step(
                            state, group, opts, entry.sparse, grad_scale, found_inf, avg_coef, grad_mul,
                            sampler.averages_for if sampler is not None else None))
                for group, entry in zip(groups, entries):
                    hyper = family.hyper(group, grad_mul, rounding.key)
                    for plan in entry.buckets:
                        self._step_plan(state, plan, hyper, grad_scale, found_inf, avg_coef)
            except BaseException:
                if sampler is not None:  # the plans check before writing: nothing was stepped
                    sampler.cancel_step()
                raise
        except BaseException as exc:
            # ... and the state this step created goes again (the plans are built anew next time).
            for entry in entries:
                forget_state(state, entry.created)
            self.cache.clear()
            if rounding_on:
                rounding.undo()
            # A param that had a dense grad when its plan was built has a sparse
            # one now (its plan refused it, writing nothing): the plans, rebuilt
            # as after any failed step, take it out of the fused step (NOTE
            # [sparse grads]). Asked of the grads, not of the error's wording.
            if not (retry_sparse and isinstance(exc, RuntimeError) and family.sparse is not None and any(
                    p.grad is not None and p.grad.is_sparse for g in groups for p in g["params"])):
                raise
            return self.step(state, groups, options, grad_scale, found_inf, grad_mul=grad_mul, rounding=rounding,
                             sampler=sampler, retry_sparse=False)
        finally:
            for _, view in shards + real_views:  # the params' grads own these: do not keep them alive
                view.grad = None
        for entry in entries:
            entry.created = ()
        if sampler is not None:
            sampler.end_step(avg_coef, found_inf)
        return True

    def _step_plan(self, state, plan, hyper, grad_scale, found_inf, avg_coef) -> None:
        commit = self.family.commit
        if commit is not None:
            self.cache.write_state(state, commit(plan, True))  # a previous step's device found_inf is read by now
        n = plan.step(hyper, grad_scale, found_inf, avg_coef)
        if commit is not None and n > 0:
            self.cache.write_state(state, commit(plan, False))


def forget_state(state, params) -> None:
    """A step that raises writes nothing: state entries it created go again
    (the extras, NOTE [state-resident extras], stay)."""
    for p in params:
        s = state.get(p)
        if s is None:
            continue
        extras = {k: v for k, v in s.items() if is_extra_key(k)}
        if extras:
            state[p] = extras
        else:
            state.pop(p, None)


# ---- binding the views a plan steps ------------------------------------------------

# NOTE [DTensor shards]
# DTensor params (FSDP2's fully_shard, tensor parallel) keep each rank's piece
# in a plain local tensor. The fused plans run on those: the state tensors are
# DTensors laid out like their params, so local shards line up element for
# element, and the step is elementwise. Each step binds the local grad to the
# local param for the C++/device plans to read, after checking that the grad
# is placed like its param (a Partial grad would need a reduction first). The
# plans are rebuilt if a param's local tensor is ever replaced.


# NOTE [complex params]
# torch steps a complex param as its real view (torch.view_as_real: the real
# and imaginary parts as a trailing dimension of 2), with its grad and state
# viewed the same way; Adam's g * g is then taken part by part, as torch does.
# The plans run on those views (the state stays complex, as torch keeps it):
# each step binds the real view of the param's grad to the param's real view,
# for the C++ and device plans to read, and unbinds it afterwards. A param whose
# memory was replaced (`p.data = ...`) gets a new view (GroupPlans.valid).


def bind_real_view_grads(views, op: str) -> None:
    for p, view in views:
        g = p.grad
        if g is not None:
            if g.is_sparse:
                raise RuntimeError(f"{op} does not support sparse gradients")
            if g.dtype != p.dtype or g.shape != p.shape:
                raise RuntimeError(f"{op}: gradient {g.dtype} {tuple(g.shape)} does not match the complex parameter "
                                   f"{p.dtype} {tuple(p.shape)}")
            g = torch.view_as_real(g)
        view.grad = g


def bind_shard_grads(shards) -> None:
    for p, local in shards:
        g = p.grad
        if g is None:
            local.grad = None
            continue
        if not is_dtensor(g) or g.placements != p.placements or g.device_mesh != p.device_mesh:
            raise RuntimeError(
                "fasttricks: a DTensor parameter's grad must be a DTensor placed like the parameter "
                f"(param {p.placements}, grad {getattr(g, 'placements', type(g).__name__)}); "
                "redistribute it or use backend='reference'")
        local.grad = g._local_tensor
