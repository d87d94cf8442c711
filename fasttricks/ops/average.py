"""The weight-averaging update every sampling method shares.

The update of docs/sampling.md:

    w_hat <- w_hat + c * (w - w_hat)

evaluated as torch.lerp does (NOTE [weight averaging lerp] in
csrc/include/fasttricks/common.h): c == 1 copies w exactly, c == 0 is skipped.

With a fasttricks optimizer the update runs inside the optimizer's kernels
(NOTE [fused weight averaging] in fasttricks/optim/_fused.py); this is the
reference, and the post-hook path for any other optimizer.
"""
from __future__ import annotations

import torch

__all__ = ["average_reference_"]


@torch.no_grad()
def average_reference_(averages: list[torch.Tensor], weights: list[torch.Tensor], coef: float,
                       skip: torch.Tensor | None = None) -> None:
    """In place over lists: averages[i] <- lerp(averages[i], weights[i], coef).
    Pairs must share dtype and device; weights in another dtype are cast first.
    `skip` (a GradScaler's found_inf) leaves every average as it is where it
    is non-zero; it is read on the device (NOTE [deferred found_inf] in
    fasttricks/ops/host_flag.py)."""
    if coef == 0 or not averages:
        return
    if not 0.0 < coef <= 1.0:
        raise ValueError(f"averaging coefficient must be in (0, 1], got {coef}")
    if len(averages) != len(weights):
        raise ValueError("average_reference_: one weight per average")
    weights = [w if w.dtype == a.dtype else w.to(a.dtype) for a, w in zip(averages, weights)]
    if skip is None:
        torch._foreach_lerp_(averages, weights, float(coef))
        return
    # Selecting afterwards keeps the lerp's rounding exactly that of the unskipped update.
    moved = torch._foreach_lerp(averages, weights, float(coef))
    skipped = {}
    for a, m in zip(averages, moved):
        if a.device not in skipped:
            skipped[a.device] = skip.to(a.device, non_blocking=True) != 0
        a.copy_(torch.where(skipped[a.device], a, m))
