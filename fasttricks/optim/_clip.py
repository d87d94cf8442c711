"""Gradient clipping folded into the next step: the norm now, the clip inside the step's kernels.

NOTE [clip in the step]
`opt.clip_grad_norm_(max_norm)` computes the total norm of the grads the
next step will read (one multi-tensor pass of our own for norm types 2 and
inf, on the optimizer's backend: fasttricks/ops/norm.py; torch's
get_total_norm for other norm types and grads our kernels do not take) and
returns it as torch's `clip_grad_norm_` does, in the grads' dtype, with no
host sync (error_if_nonfinite reads it, as torch does). It
does not rewrite the grads: the step applies the coefficient
c = min(1, max_norm / (norm / grad_scale + 1e-6)) through the gradient scale
its kernels already divide by (grad_scale / c), and a norm that is inf or NaN
skips the step exactly as the GradScaler's found_inf does (nothing changes).
Under the fused unscale (fused=True) the norm is of the scaled grads, and
the scale the scaler hands the step divides it out; without it, call the
scaler's unscale_ first, as with torch. `p.grad` keeps its unclipped values
until the step; `inplace=True` rewrites them as torch does, for code that
reads them. The clip applies to the next successful step and is dropped by
zero_grad. DTensor grads sharded over one 1-D mesh (FSDP2) take each rank's
norm of its shards and one all-reduce, and the clip goes into the step on
the local shards; grads on several devices, sparse grads and DTensors laid
out otherwise are clipped in place after torch's norm, as torch does. The
fp32 norm the step folds in is kept apart from the returned one, which has
torch's dtype (the grads'): bf16 grads clip by the fp32 norm.
"""
from __future__ import annotations

import functools

import torch

from fasttricks import _backends
from fasttricks.ops._plan import is_dtensor
from fasttricks.ops.norm import KERNEL_NORM_TYPES, NormPlans

__all__ = ["PendingClip", "total_norm"]


class PendingClip:
    """The norm and max_norm of a clip the next step applies."""

    __slots__ = ("norm", "max_norm")

    def __init__(self, norm: torch.Tensor, max_norm: float):
        self.norm, self.max_norm = norm, max_norm

    def fold(self, grad_scale, found_inf):
        """(grad_scale, found_inf) for the step: the clip's coefficient in the
        scale, a non-finite norm in found_inf. Device ops only."""
        norm = self.norm.to(torch.float32)
        true_norm = norm if grad_scale is None else norm / grad_scale.to(norm.device, torch.float32)
        coef = torch.clamp(self.max_norm / (true_norm + 1e-6), max=1.0)
        scale = 1.0 / coef if grad_scale is None else grad_scale.to(torch.float32) / coef.to(grad_scale.device)
        nonfinite = (~torch.isfinite(norm)).to(torch.float32)
        if found_inf is None:
            found_inf = nonfinite
        else:
            found_inf = torch.maximum(found_inf.to(torch.float32), nonfinite.to(found_inf.device))
        return scale.reshape(()), found_inf.reshape(())


def total_norm(params, norm_type: float, error_if_nonfinite: bool, foreach, backend: str, plans: NormPlans):
    """(norm as torch returns it, norm for the step or None) of the grads of
    `params` (all with a grad). None for the step where it cannot take the
    clip as a scale (grads on several devices, sparse grads, DTensors not
    sharded over one 1-D mesh): the caller clips those in place, as torch
    does. `backend`: the optimizer's (possibly "auto")."""
    grads = [p.grad for p in params]
    if any(is_dtensor(g) for g in grads):
        sharded = _sharded_norm(grads, float(norm_type), error_if_nonfinite, backend, plans)
        if sharded is not None:
            return sharded
    devices = {g.device for g in grads}
    if len(devices) > 1 or any(g.is_sparse or is_dtensor(g) for g in grads):
        return torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach), None
    if float(norm_type) not in KERNEL_NORM_TYPES or any(g.is_complex() or g.dtype != p.dtype
                                                        for p, g in zip(params, grads)):
        norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
        return norm, norm
    norm = plans.total_norm(params, grads, float(norm_type), _backends.resolve(backend, grads[0].device))
    _check_finite(norm, norm_type, error_if_nonfinite)
    return norm.to(_torch_dtype(grads)), norm


def _torch_dtype(grads) -> torch.dtype:
    """The dtype of torch's total norm: the grads' dtypes promoted."""
    return functools.reduce(torch.promote_types, {g.dtype for g in grads})


def _check_finite(norm, norm_type, error_if_nonfinite: bool) -> None:
    if error_if_nonfinite and not torch.isfinite(norm):  # a host read, as torch's
        raise RuntimeError(f"The total norm of order {float(norm_type)} of the gradients is non-finite, so it "
                           "cannot be clipped; pass error_if_nonfinite=False to clip by it anyway")


def _sharded_norm(grads, norm_type: float, error_if_nonfinite: bool, backend: str, plans: NormPlans):
    """The norm of DTensor grads sharded over one 1-D mesh (FSDP2's layout),
    with one all-reduce: each rank's norm of its local shards (our kernel on
    the CPU, torch ops elsewhere), then the sum of squares (two-norm) or the
    max (inf-norm, with a NaN flag beside it) across the mesh. None where the
    grads are laid out otherwise (torch's get_total_norm then)."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = grads[0].device_mesh
    if (norm_type not in KERNEL_NORM_TYPES or mesh.ndim != 1
            or any(not is_dtensor(g) or g.device_mesh != mesh or not all(pl.is_shard() for pl in g.placements)
                   or g.is_complex() for g in grads)):
        return None
    local = [g.to_local() for g in grads]
    concrete = _backends.resolve(backend, local[0].device)
    local_norm = plans.total_norm(None, local, norm_type, concrete if concrete in ("cpu", "reference") else "reference")
    group = mesh.get_group()
    if norm_type == 2.0:
        total = local_norm.square()
        torch.distributed.all_reduce(total, torch.distributed.ReduceOp.SUM, group=group)
        total = total.sqrt()
    else:  # gloo's max need not keep a NaN: a flag travels beside the value
        nan = local_norm.isnan()
        both = torch.stack([torch.where(nan, 0.0, local_norm), nan.to(local_norm.dtype)])
        torch.distributed.all_reduce(both, torch.distributed.ReduceOp.MAX, group=group)
        total = torch.where(both[1] > 0, float("nan"), both[0])
    _check_finite(total, norm_type, error_if_nonfinite)
    returned = DTensor.from_local(total.to(_torch_dtype(grads)), mesh, [Replicate()], run_check=False)
    return returned, total
