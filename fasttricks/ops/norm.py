"""The total norm of many grads on every backend: the one multi-tensor pass behind gradient clipping.

NOTE [clip in the step] in fasttricks/optim/_clip.py says how the clip uses
it. Norm types 2 and inf run in our kernels: the reference in torch ops, cpu
in fasttricks._C.total_norm (one parallel pass over all tensors), triton and
cuda as one program per 4096-element chunk over a packed table of the grads
(NOTE [pointer table]) writing a partial per chunk, summed (or maxed) on the
device. 16-bit grads accumulate in fp32, fp64 grads in fp64; the result is a
0-dim float32 tensor (float64 when a grad is fp64) on the grads' device, and
nothing waits for it. For the same grads it equals
torch.nn.utils.get_total_norm within fp32 rounding (where torch refuses the
inf-norm of an empty grad, an empty grad adds nothing here); torch's own result is in
the grads' dtype, which NormPlans.total_norm's caller casts to.
"""
from __future__ import annotations

import math

import torch

from fasttricks import _backends
from fasttricks.ops._device import DevicePlan
from fasttricks.ops._plan import opmath_dtype

__all__ = ["KERNEL_NORM_TYPES", "reference_total_norm", "NormPlans"]

KERNEL_NORM_TYPES = (2.0, math.inf)


def _accumulate_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def reference_total_norm(tensors, norm_type: float) -> torch.Tensor:
    """The spec the kernels are tested against: each tensor's norm in the
    accumulation dtype, then the norm of those norms."""
    acc = _accumulate_dtype(tensors)
    if not tensors:
        return torch.zeros((), dtype=acc)
    # An empty tensor adds nothing (torch refuses its inf-norm: a max has no identity).
    norms = [torch.linalg.vector_norm(t, norm_type, dtype=acc) if t.numel() else torch.zeros((), dtype=acc,
                                                                                               device=t.device)
             for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def _combine(partials: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The total norm from per-chunk partials (sums of squares, or largest |x|), on their device."""
    flat = torch.cat([p.double() for p in partials]) if len(partials) > 1 else partials[0].double()
    total = flat.amax() if math.isinf(norm_type) else flat.sum().sqrt()
    return total.to(_accumulate_dtype(partials))


class DeviceNormPlan(DevicePlan):
    """The norm's plan for one (device, dtype) bucket of params: packs the
    pointers of their grads (one table row) as the optimizer plans do, and
    launches the backend's norm-partials kernel."""

    op = "norm"
    ROWS = ("param", "grad")

    def __init__(self, params, launch):
        super().__init__(params, {}, launch, {})

    def partials(self, inf: bool) -> torch.Tensor | None:
        n, tables, _, keep = self.pack()  # grads laid out unlike their params are read from temporaries
        if not n:
            return None
        out = torch.empty(tables[5], dtype=opmath_dtype(self.param_dtype), device=self.device)
        with self.device_guard():
            self.launch(tables, out, grad_dtype=self.param_dtype, inf=inf, grad_row=self.ROWS.index("grad"))
        del keep
        return out


def _cuda_norm_launch(tables, out, **kw):
    ptrs, numels, chunk_tensor, chunk_start, n, _ = tables
    _backends.cuda_ext().norm_partials(ptrs, numels, chunk_tensor, chunk_start, n, out=out, **kw)


class NormPlans:
    """An optimizer's norm plans, one per (device, dtype) bucket of its params,
    built when the params with a grad change (their grads' pointers are
    compared every call, as the step's are)."""

    def __init__(self):
        self._key = None
        self._plans: list[DeviceNormPlan] = []

    def total_norm(self, params, grads, norm_type: float, backend: str) -> torch.Tensor:
        """The norm of `grads`, the grads of `params` (dense, real, each of its
        param's dtype, on one device), on `backend` (a concrete one). The
        reference and cpu backends read `grads` alone (`params` may be None)."""
        if backend == "reference":
            return reference_total_norm(grads, norm_type)
        if backend == "cpu":
            return _backends.cpu_ext().total_norm(grads, norm_type)
        key = (backend, tuple(map(id, params)))
        if key != self._key:
            buckets: dict = {}
            for p in params:
                buckets.setdefault(p.dtype, []).append(p)
            if backend == "triton":
                from fasttricks.kernels.norm import launch_norm_partials as launch
            else:
                launch = _cuda_norm_launch
            self._plans = [DeviceNormPlan(ps, launch) for ps in buckets.values()]
            self._key = key
        partials = [x for x in (plan.partials(math.isinf(norm_type)) for plan in self._plans) if x is not None]
        if not partials:
            return torch.zeros((), dtype=_accumulate_dtype(grads), device=grads[0].device)
        return _combine(partials, norm_type)
