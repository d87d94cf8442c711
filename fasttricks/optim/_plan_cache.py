"""The plans of an optimizer (one per param group and device/dtype bucket),
built once and reused until something they hold changes.

NOTE [plan cache]
A plan holds references to its params and their state tensors (and, in C++,
their pointers and checked layouts), so it must be rebuilt whenever a user
changes any of them through torch's public surface. Every such change goes
through a container the optimizer controls and that counts its changes
(fasttricks/optim/_tracked.py):

* `optimizer.state` is a StateDict: replacing or clearing it, or any entry of
  it, or assigning a tensor (or None) into a param's state dict, bumps its
  version; assigning a new object to `optimizer.state` changes its identity;
* `param_group["params"]` is a ParamList with its own version; a new list, a
  new group dict (`load_state_dict`, `add_param_group`) changes identity;
* the group's switches (backend, master weights, amsgrad, momentum on/off,
  ...) are compared each step;
* params that had no grad (and so no state) when the plans were built are
  watched for one; DTensor params for a replaced local shard;
* a group with `differentiable=True` or meta params gets no plans: its step
  is torch's own.

The check costs O(groups) per step plus the params still without grad, never
a walk over every tensor. What a plan can verify itself at step time -- a
param's grad, dtype, shape and layout (`p.data` swapped) -- it checks in its
gather (csrc/cpu/plans.h, fasttricks/ops/_plan.py) before writing anything.
Of each state tensor it checks that it still holds the storage recorded for
it, and that storage the same memory: `state_tensor.data = t` (the usual way
of moving optimizer state between devices), `set_`, a reallocating `resize_`
or a storage freed and reallocated in place keep the tensor object. Such a
param then takes the full check, which reads its state afresh, and a pointer
the plan cached is never written once its memory may be gone. The plan does
not hold the old storages: state moved off a device is freed there.
"""
from __future__ import annotations

import torch

from fasttricks import _backends
from fasttricks.ops._plan import is_dtensor
from fasttricks.ops.precision import state_dtype, uses_master
from fasttricks.optim._tracked import ParamList, StateDict

DEVICE_BACKENDS = ("triton", "cuda")


def is_extra_key(key) -> bool:
    """Whether a param's state entry is one the optimizer's own math never
    reads: a sampler's average or counters, the stochastic-rounding counters
    (NOTE [state-resident extras] in fasttricks/optim/_fused.py). Their names
    hold a '/', which torch's own state keys never do."""
    return isinstance(key, str) and "/" in key


def own_state_empty(state) -> bool:
    """Whether a param's state holds nothing of the optimizer's own (it may
    hold extras: is_extra_key)."""
    return not state or all(is_extra_key(k) for k in state)


def normalise_state(p, state, options, backend: str) -> None:
    """State dtypes and devices as the kernels need them (after a checkpoint
    load, a change of master_weights or state_dtype, or torch writing the
    step as float64 under a float64 default dtype): see state_dtype(); `step`
    a 0-dim float tensor, float32 on the param's device for the device
    backends (their kernels read it as float32), float32 or float64 on the
    CPU otherwise."""
    master = uses_master(options, p.dtype)
    want = state_dtype(options, p.dtype)
    for k, v in list(state.items()):
        if k == "step" or is_extra_key(k) or not torch.is_tensor(v) or not (v.is_floating_point() or v.is_complex()):
            continue
        if k == "master_param" and not master:
            del state[k]
        elif k == "master_param" and (v.dtype != torch.float32 or v.device != p.device):
            state[k] = v.to(device=p.device, dtype=torch.float32)
        elif k != "master_param" and (v.dtype != want or v.device != p.device):
            state[k] = v.to(device=p.device, dtype=want)
    if master and "master_param" not in state:
        state["master_param"] = p.detach().to(torch.float32, copy=True)
    step = state.get("step")
    if step is None:
        return
    device = p.device if p.device.type != "cpu" else torch.device("cpu")
    dtypes = (torch.float32,) if backend in DEVICE_BACKENDS else (torch.float32, torch.float64)
    if not torch.is_tensor(step):
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
    elif step.device != device or step.dtype not in dtypes:
        state["step"] = step.to(device=device, dtype=torch.float32)


class GroupPlans:
    """The plans of one param group, and what they were built from."""

    __slots__ = ("group", "params", "params_version", "flags", "buckets", "stateless", "shards", "real_views",
                 "created", "torch_step", "rounding", "sparse")

    def __init__(self, group, flags, buckets, stateless, shards, torch_step=False, real_views=(), rounding=False):
        self.group = group
        self.params = group["params"]
        self.params_version = self.params.version
        self.flags = flags
        self.buckets = buckets
        self.stateless = stateless  # params without grad or state when built
        self.shards = shards        # NOTE [DTensor shards]: (DTensor param, its local tensor)
        self.real_views = real_views  # NOTE [complex params]: (complex param, its real view)
        self.created = ()           # params whose state this build created, until a step commits
        self.torch_step = torch_step  # differentiable=True or meta params: torch's own step runs them
        self.rounding = rounding
        self.sparse = []            # NOTE [sparse grads]: params stepped outside the plans

    def valid(self, group, flags) -> bool:
        params = group["params"]
        # The lists are usually empty: tested first, so that the common case
        # creates no generator (this runs every step).
        return (self.group is group and params is self.params and params.version == self.params_version
                and flags == self.flags
                and (not self.stateless or not any(p.grad is not None for p in self.stateless))
                and (not self.shards or all(p._local_tensor is local for p, local in self.shards))
                and (not self.real_views or all(v.data_ptr() == p.data_ptr() and v.shape[:-1] == p.shape
                                                for p, v in self.real_views))
                and (not self.sparse or all(p.grad is None or p.grad.is_sparse for p in self.sparse)))


class PlanCache:
    """NOTE [plan cache]. `optimizer` supplies `_plan_flags(group)` and
    `_build_group(group, flags) -> GroupPlans`."""

    def __init__(self) -> None:
        self.groups: dict[int, GroupPlans] = {}
        self.state = None
        self.state_version = -1

    def clear(self) -> None:
        self.groups = {}
        self.state = None

    def lookup(self, optimizer) -> list[GroupPlans]:
        state = optimizer.state
        if type(state) is not StateDict:
            state = optimizer.state = StateDict(state)
        if state is not self.state or state.version.n != self.state_version:
            self.groups = {}
            self.state = state
        entries = []
        for group in optimizer.param_groups:
            if type(group["params"]) is not ParamList:
                group["params"] = ParamList(group["params"])
            flags = optimizer._plan_flags(group)
            entry = self.groups.get(id(group))
            if entry is None or not entry.valid(group, flags):
                entry = self.groups[id(group)] = optimizer._build_group(group, flags)
            entries.append(entry)
        if len(self.groups) != len(entries):  # groups that left the optimizer
            self.groups = {id(e.group): e for e in entries}
        self.state_version = state.version.n  # the builds' own writes
        return entries

    def write_state(self, optimizer, writes) -> None:
        """The optimizer's own state writes after a step, [(param, key, value)]:
        they change nothing the plans hold, so they keep the cache valid."""
        state = optimizer.state
        in_sync = state is self.state and state.version.n == self.state_version
        for p, key, value in writes:
            state[p][key] = value
        if in_sync:
            self.state_version = state.version.n


def backend_for(options, device, cache: dict) -> str:
    """The concrete backend of a group (its options) for `device` (resolved once per build)."""
    if device not in cache:
        cache[device] = _backends.resolve(options["backend"], device)
    return cache[device]


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
