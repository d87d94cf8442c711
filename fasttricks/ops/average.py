"""The weight-averaging update shared by every sampling method (docs/sampling.md):

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
def average_reference_(averages: list[torch.Tensor], weights: list[torch.Tensor], coef: float) -> None:
    """In place over lists: averages[i] <- lerp(averages[i], weights[i], coef).
    Pairs must share dtype and device; weights in another dtype are cast first."""
    if coef == 0 or not averages:
        return
    if not 0.0 < coef <= 1.0:
        raise ValueError(f"averaging coefficient must be in (0, 1], got {coef}")
    if len(averages) != len(weights):
        raise ValueError("average_reference_: one weight per average")
    weights = [w if w.dtype == a.dtype else w.to(a.dtype) for a, w in zip(averages, weights)]
    torch._foreach_lerp_(averages, weights, float(coef))
