"""The Python side of a plan: one bucket of params with their optimizer state.

One device and one param dtype, built once and stepped many times.

The C++ CPU plans (csrc/host/plans.h) follow the same contract; this base
serves the reference, Triton and CUDA backends:

* `gather()` finds the parameters that have a gradient this step and validates
  every one of them before anything is written, so a bad step changes nothing;
* `set_averages()` attaches one running average per parameter, updated in the
  same pass with coefficient `avg_coef` (NOTE [weight averaging lerp] in
  csrc/include/fasttricks/common.h; skipped when `avg_coef == 0`).
"""
from __future__ import annotations

import importlib

import torch

from fasttricks import _backends
from fasttricks.ops.precision import LOW_PRECISION

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_grad(op: str, p: torch.Tensor, g: torch.Tensor) -> None:
    if g.is_sparse:
        raise RuntimeError(f"{op} does not support sparse gradients; use torch.optim.SparseAdam or a dense gradient")
    if g.dtype != p.dtype:
        raise TypeError(f"{op}: gradient dtype {g.dtype} differs from parameter dtype {p.dtype}")
    if g.shape != p.shape:
        raise RuntimeError(f"{op}: gradient shape {tuple(g.shape)} differs from parameter shape {tuple(p.shape)}")
    if g.device != p.device:
        raise RuntimeError(f"{op}: gradient on {g.device}, parameter on {p.device}")


def is_dtensor(t) -> bool:
    global _DTensor
    if _DTensor is None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch built without distributed
            DTensor = ()
        _DTensor = DTensor
    return bool(_DTensor) and isinstance(t, _DTensor)


_DTensor = None


def local_shards(tensors):
    """NOTE [DTensor shards] (fasttricks/optim/_engine.py): the fused plans run on
    each rank's local piece of DTensor params and state; other tensors pass."""
    return None if tensors is None else [t._local_tensor if is_dtensor(t) else t for t in tensors]


def plan_for_backend(backend: str, op: str, *, reference, cpu, device, cuda_launch):
    """The one dispatch of the families' plan makers: `reference()`, `cpu(ext)`
    and `device(launch)` build the plan for their backend. The Triton launch
    (`fasttricks.kernels.<op>.launch_<op>`) is imported only when asked for:
    it imports triton."""
    if backend == "reference":
        return reference()
    if backend == "cpu":
        return cpu(_backends.cpu_ext())
    if backend == "triton":
        return device(getattr(importlib.import_module(f"fasttricks.kernels.{op}"), f"launch_{op}"))
    if backend == "cuda":
        return device(cuda_launch)
    raise ValueError(f"Invalid backend: {backend!r}")


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def found_inf_set(found_inf: torch.Tensor | None) -> bool:
    """Host-side check (reference backend only: it synchronises)."""
    return found_inf is not None and bool(found_inf.item() != 0)


def inv_grad_scale(grad_scale: torch.Tensor | None) -> float:
    return 1.0 if grad_scale is None else 1.0 / float(grad_scale.item())


class PlanBase:
    """`slots` maps a state name to one tensor per parameter (or None when the
    slot is unused); the slot "master" holds fp32 master weights, the others
    share one state dtype. `rounding`: the params' indices, the keys of their
    stochastic rounding (NOTE [stochastic rounding]), or None when it is off."""

    op = "optimizer"

    def __init__(self, params, slots: dict[str, list | None], rounding=None):
        if not params:
            raise ValueError(f"{self.op} plan: no parameters")
        self.params = list(params)
        self.slots = slots
        self.param_dtype = self.params[0].dtype
        self.device = self.params[0].device
        for p in self.params:
            if p.dtype != self.param_dtype or p.device != self.device:
                raise TypeError(f"{self.op} plan: one bucket needs one device and dtype")
        if self.param_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{self.op}: unsupported parameter dtype {self.param_dtype} (supported: {SUPPORTED_DTYPES})")
        self.master = slots.get("master") is not None
        state = next((ts for name, ts in slots.items() if name != "master" and ts), None)
        self.state_dtype = state[0].dtype if state else (torch.float32 if self.master else self.param_dtype)
        if self.state_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{self.op}: unsupported state dtype {self.state_dtype}")
        if self.master and (self.state_dtype != torch.float32 or self.param_dtype not in LOW_PRECISION):
            raise TypeError(f"{self.op}: master weights are for bf16/fp16 params with fp32 state")
        self.rounding = None if rounding is None else [int(k) for k in rounding]
        if self.rounding is not None and len(self.rounding) != len(self.params):
            raise ValueError(f"{self.op}: one rounding key per parameter")
        # fp32 averages (and master) for bf16/fp16 params with master weights or stochastic rounding
        self.avg_dtype = (opmath_dtype(self.param_dtype) if self.master or self.rounding is not None
                          else self.param_dtype)
        self.averages: list | None = None

    def __len__(self) -> int:
        return len(self.params)

    def set_averages(self, averages) -> None:
        averages = list(averages) if averages else None
        if averages is not None and len(averages) != len(self.params):
            raise ValueError(f"{self.op}: one average per parameter (or none)")
        self.averages = averages

    def _check_state(self, what: str, t: torch.Tensor, p: torch.Tensor, dtype=None) -> None:
        dtype = dtype or self.state_dtype
        if t.dtype != dtype:
            raise TypeError(f"{self.op}: {what} has dtype {t.dtype}, expected {dtype}")
        if t.shape != p.shape:
            raise RuntimeError(f"{self.op}: {what} shape {tuple(t.shape)} differs from parameter shape "
                               f"{tuple(p.shape)}")

    def check(self) -> None:
        """Raises what this step's gather would raise, and writes nothing."""
        self.gather()

    def gather(self) -> tuple[list[int], list[torch.Tensor]]:
        index, grads = [], []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            check_grad(self.op, p, g)
            if p.dtype != self.param_dtype:
                raise TypeError(f"{self.op}: parameter dtype changed from {self.param_dtype} to {p.dtype} "
                                "after the optimizer state was created")
            for name, tensors in self.slots.items():
                if tensors is not None:
                    self._check_state(f"optimizer state {name!r}", tensors[i], p,
                                      torch.float32 if name == "master" else None)
            if self.averages is not None:
                self._check_state("average", self.averages[i], p, self.avg_dtype)
            index.append(i)
            grads.append(g)
        return index, grads


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (any permutation of a contiguous layout)."""
    if t.numel() <= 1:
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True

