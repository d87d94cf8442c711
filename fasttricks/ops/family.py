"""An optimizer family as data: the record the step engine builds and steps plans from.

What fasttricks/optim/_engine.py needs to know of Adam or SGD, as one plain
record per family, defined at the end of fasttricks/ops/adam.py and
fasttricks/ops/sgd.py.

The record's functions take what they work on as arguments (the optimizer's
state dict, a param group and its fasttricks options), never the optimizer
object, so the route of a step only goes downward: optimizer, engine, family,
plan, kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

__all__ = ["Family", "SparseSteps", "hyper_record", "is_extra_key", "own_state_empty"]

#: (name, type, default) of the fields every family's hyper record ends with:
#: the sign, the gradient factor the engine folds in (NOTE [found_inf contract]
#: keeps grad_scale apart) and the step's rounding key (NOTE [stochastic
#: rounding]; plans with rounding keys only).
STEP_FIELDS = (("maximize", bool, False), ("grad_mul", float, 1.0), ("round_key", int, 0))


def hyper_record(module: str, name: str, fields: list[tuple[str, Any]], doc: str):
    """A family's hyper-parameter record, defined in `module`: a NamedTuple of
    the family's own `fields` (without defaults), then STEP_FIELDS. A tuple,
    because the C++ plans read it by position (csrc/cpu/module.cpp exports the
    order it reads)."""
    record = NamedTuple(name, [*fields, *((n, t) for n, t, _ in STEP_FIELDS)])
    record.__module__ = module  # where pickle finds it
    record.__new__.__defaults__ = tuple(default for _, _, default in STEP_FIELDS)
    record.__doc__ = doc
    return record


@dataclass(frozen=True)
class SparseSteps:
    """NOTE [sparse grads] (fasttricks/optim/_engine.py): a family that steps
    sparse gradients outside its fused plans."""
    #: (params) -> None: raise (writing nothing) for a sparse grad the step cannot take
    check: Callable[[list], None]
    #: (state, group, options, params, grad_scale, found_inf, avg_coef, grad_mul, averages_for)
    #: -> state writes [(param, key, value)]; averages_for(params, dtype) gives the fused averages
    step: Callable[..., list]


@dataclass(frozen=True)
class Family:
    name: str
    #: (group, options) -> the family's switches of a group; a change rebuilds its plans
    plan_flags: Callable[[dict, dict], tuple]
    #: (group, state of p or None) -> whether p needs state before its plan is built
    #: (then it waits, stateless, for its first grad)
    needs_state: Callable[[dict, Any], bool]
    #: (state, group, p) -> p's state, created in torch's layout
    init_state: Callable[[Any, dict, Any], Any]
    #: (state, backend, group, options, params, master, view, rounding) -> a plan for
    #: one bucket; `view` maps a param or state tensor to what the plan steps (NOTE
    #: [complex params]), `rounding` holds the params' keys (None: round to nearest)
    build_plan: Callable[..., Any]
    #: (group, grad_mul, round_key) -> the hyper-parameter record every backend takes
    hyper: Callable[[dict, float, int], Any]
    sparse: SparseSteps | None = None
    #: (plan, wait) -> state writes that the plan's last steps settled (SGD's new
    #: momentum buffers, NOTE [deferred found_inf]); wait=False only when free
    commit: Callable[[Any, bool], list] | None = None


def is_extra_key(key) -> bool:
    """Whether a param's state entry is one the optimizer's own math never
    reads: a sampler's average or counters, the stochastic-rounding counters
    (NOTE [state-resident extras] in fasttricks/optim/state_extras.py). Their names
    hold a '/', which torch's own state keys never do."""
    return isinstance(key, str) and "/" in key


def own_state_empty(state) -> bool:
    """Whether a param's state holds nothing of the optimizer's own (it may
    hold extras: is_extra_key)."""
    return not state or all(is_extra_key(k) for k in state)
