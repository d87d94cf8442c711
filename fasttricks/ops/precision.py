"""The precision policy: master copies, stochastic rounding, and the dtypes of state and averages.

Which dtypes a param's master copy, state and averages take, and when writes
round stochastically (docs/precision.md).

The one room that rule is written in: the optimizers, their plans and the
samplers read it here. The Triton kernels are leaves and cannot import it;
kernels/_common.py restates the per-plan switches, and
tests/test_precision.py holds the two equal over every dtype combination.
"""
from __future__ import annotations

import torch

__all__ = ["LOW_PRECISION", "uses_master", "rounds_stochastically", "state_dtype", "average_dtype",
           "check_precision_options", "plan_rounds_stochastically", "plan_average_dtype"]

LOW_PRECISION = (torch.bfloat16, torch.float16)


# The functions below take a group's fasttricks options (NOTE [group options]
# in fasttricks/optim/_fused.py): a mapping with backend, master_weights,
# stochastic_rounding and state_dtype; an empty one (a torch optimizer's group)
# means all off.


def uses_master(options, dtype: torch.dtype) -> bool:
    """Whether params of `dtype` under `options` keep an fp32 master copy."""
    return bool(options.get("master_weights")) and dtype in LOW_PRECISION


def rounds_stochastically(options) -> bool:
    """Whether the group's bf16/fp16 writes (params, state) round
    stochastically (NOTE [stochastic rounding], fasttricks/ops/rounding.py)."""
    return bool(options.get("stochastic_rounding"))


def state_dtype(options, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a param's moments / momentum buffer (docs/precision.md):
    the group's `state_dtype` when one was asked for, else fp32 with master
    weights and the param's own dtype without."""
    asked = options.get("state_dtype")
    if asked is not None and param_dtype in (torch.float32,) + LOW_PRECISION:
        return asked
    return torch.float32 if uses_master(options, param_dtype) else param_dtype


def average_dtype(options, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a fused sampler's running average (and of the master copy):
    fp32 for bf16/fp16 params with master weights or stochastic rounding
    (a bf16 average would lose the small increments of an EMA), else the
    param's own dtype."""
    if param_dtype in LOW_PRECISION and (uses_master(options, param_dtype) or rounds_stochastically(options)):
        return torch.float32
    return param_dtype


def check_precision_options(master_weights, stochastic_rounding, state_dtype_asked) -> None:
    """The constructors' checks of the precision switches (ValueError)."""
    if state_dtype_asked not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"state_dtype must be None, torch.float32 or torch.bfloat16, got {state_dtype_asked}")
    if master_weights and stochastic_rounding:
        raise ValueError("master_weights and stochastic_rounding are two ways to keep small updates: choose one")
    if master_weights and state_dtype_asked == torch.bfloat16:
        raise ValueError("master_weights keeps fp32 state; state_dtype=torch.bfloat16 needs master_weights=False")


def plan_rounds_stochastically(param_dtype, state_dtype_, master: bool, stochastic_rounding: bool) -> bool:
    """Whether a plan's kernel rounds stochastically: only where a 16-bit
    tensor is written from fp32 math without a master copy."""
    return bool(stochastic_rounding) and not master and (param_dtype in LOW_PRECISION or
                                                         state_dtype_ in LOW_PRECISION)


def plan_average_dtype(param_dtype, state_dtype_, master: bool, stochastic_rounding: bool) -> torch.dtype:
    """The dtype a plan's kernel keeps a fused average in (average_dtype, per plan)."""
    sr = plan_rounds_stochastically(param_dtype, state_dtype_, master, stochastic_rounding)
    return torch.float32 if (master or sr) and param_dtype in LOW_PRECISION else param_dtype
