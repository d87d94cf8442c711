"""The plan cache: an optimizer's group plans, kept until something they hold changes.

One plan per param group and device/dtype bucket, built once (by
fasttricks/optim/_engine.py) and reused.

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
gather (csrc/host/plans.h, fasttricks/ops/_plan.py) before writing anything.
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
from fasttricks.ops.family import is_extra_key
from fasttricks.ops.precision import state_dtype, uses_master

DEVICE_BACKENDS = ("triton", "cuda")


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
    """NOTE [plan cache]: the group plans of one optimizer, valid while the
    state container and its version are the ones they were built against
    (fasttricks/optim/_engine.py looks them up and builds them)."""

    def __init__(self) -> None:
        self.groups: dict[int, GroupPlans] = {}
        self.state = None
        self.state_version = -1

    def clear(self) -> None:
        self.groups = {}
        self.state = None

    def follow(self, state) -> None:
        """Forget every plan if `state` is not the container (or version) the plans were built against."""
        if state is not self.state or state.version.n != self.state_version:
            self.groups = {}
            self.state = state

    def settled(self, entries) -> None:
        """After a lookup: keep the groups still in the optimizer, and take the
        builds' own state writes as the version the plans match."""
        if len(self.groups) != len(entries):  # groups that left the optimizer
            self.groups = {id(e.group): e for e in entries}
        self.state_version = self.state.version.n

    def write_state(self, state, writes) -> None:
        """The optimizer's own state writes after a step, [(param, key, value)]:
        they change nothing the plans hold, so they keep the cache valid."""
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
