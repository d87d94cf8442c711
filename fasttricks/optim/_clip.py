"""Gradient clipping folded into the next step: the norm now, the clip inside the step's kernels.

NOTE [clip in the step]
`opt.clip_grad_norm_(max_norm)` computes the total norm of the grads the
next step will read (torch.nn.utils.get_total_norm, one multi-tensor pass)
and returns it as torch's `clip_grad_norm_` does, with no host sync. It
does not rewrite the grads: the step applies the coefficient
c = min(1, max_norm / (norm / grad_scale + 1e-6)) through the gradient scale
its kernels already divide by (grad_scale / c), and a norm that is inf or NaN
skips the step exactly as the GradScaler's found_inf does (nothing changes).
Under the fused unscale (fused=True) the norm is of the scaled grads, and
the scale the scaler hands the step divides it out; without it, call the
scaler's unscale_ first, as with torch. `p.grad` keeps its unclipped values
until the step; `inplace=True` rewrites them as torch does, for code that
reads them. The clip applies to the next successful step and is dropped by
zero_grad; grads on several devices are clipped in place.
"""
from __future__ import annotations

import torch

__all__ = ["PendingClip", "grads_of"]


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


def grads_of(param_groups) -> list[torch.Tensor]:
    return [p.grad for group in param_groups for p in group["params"] if p.grad is not None]
