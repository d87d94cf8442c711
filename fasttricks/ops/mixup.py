"""Mixup blend: the reference and the dispatcher.

The math is NOTE [mixup blend math] in csrc/include/fasttricks/mixup_math.h.

    x_mix[i] = lam[i] * x[i] + (1 - lam[i]) * x[j(i)]

in fp32 math (fp64 for fp64), with j(i) = B-1-i for flip pairing (in place:
both rows of a pair are read before either is written; the middle row of an
odd batch pairs with itself and stays as it is) or j(i) = perm[i] (out of
place). uint8 results round half up. Each sample must be one dense block of
memory (NCHW contiguous or channels-last both are); other layouts go through
a contiguous copy.
"""
from __future__ import annotations

import torch

from fasttricks import _backends
from fasttricks._checks import check_values_in

__all__ = ["mixup_blend", "mixup_blend_reference"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.uint8)


def mixup_blend_reference(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Out of place, rows of x as [B, ...]; the formula above in torch ops."""
    B = x.shape[0]
    op = torch.float64 if x.dtype == torch.float64 else torch.float32
    src = x.flip(0) if perm is None else x[perm]
    shape = (B,) + (1,) * (x.dim() - 1)
    lam = lam.to(device=x.device, dtype=torch.float32).view(shape)
    mix = lam.to(op) * x.to(op) + (1.0 - lam).to(op) * src.to(op)
    if x.dtype == torch.uint8:
        mix = torch.floor(mix + 0.5).clamp_(0, 255)
    out = mix.to(x.dtype)
    if perm is None and B % 2 == 1:
        out[B // 2] = x[B // 2]
    return out


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """A [B, D] view of t's memory when each sample is one dense block, else None."""
    B = t.shape[0]
    D = t[0].numel() if B else 0
    if B == 0 or D == 0:
        return t.reshape(B, D)
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) and t.dim() == 4:
        if t.stride(0) == D or B == 1:
            return t.as_strided((B, D), (D, 1))
    return None


def check_blend_args(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor | None) -> None:
    if x.dim() < 1:
        raise ValueError("mixup: x needs a batch dimension")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"mixup: unsupported dtype {x.dtype} (supported: {SUPPORTED_DTYPES})")
    B = x.shape[0]
    if lam.shape != (B,):
        raise ValueError(f"mixup: lam must have shape ({B},), got {tuple(lam.shape)}")
    if perm is not None:
        if perm.shape != (B,) or perm.dtype != torch.int64:
            raise ValueError(f"mixup: perm must be an int64 tensor of shape ({B},)")
        check_values_in(perm, 0, B - 1, IndexError, f"mixup: perm has indices outside [0, {B})")


def mixup_blend(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor | None = None, *, inplace: bool = False,
                backend: str = "auto") -> torch.Tensor:
    """Blend the rows of x. `lam` is a float tensor of shape [B] (one value per
    sample; repeat one value for per-batch mixup). `perm=None` pairs row i
    with row B-1-i and may run in place (`inplace=True`); an arbitrary `perm`
    writes a new tensor."""
    _backends.check_backend_name(backend)
    check_blend_args(x, lam, perm)
    if perm is not None and inplace:
        raise ValueError("mixup: an arbitrary permutation cannot run in place (use flip pairing)")
    name = _backends.resolve(backend, x.device)
    if name == "triton" and x.dtype == torch.float64:
        if backend != "auto":
            raise TypeError("mixup: the triton backend serves float32, bfloat16, float16 and uint8")
        name = "reference"
    if name == "reference":
        out = mixup_blend_reference(x, lam, perm)
        return x.copy_(out) if inplace else out
    lam32 = lam.to(device=x.device, dtype=torch.float32).contiguous()
    perm = perm.to(x.device).contiguous() if perm is not None else None
    src = x if _rows(x) is not None else x.contiguous()
    out = src if inplace else torch.empty_like(src)
    x_rows, out_rows = _rows(src), _rows(out)
    if name == "cpu":
        _backends.cpu_ext().mixup_blend_rows(x_rows, out_rows, lam32, perm)
    elif name == "triton":
        from fasttricks.kernels.mixup import launch_mixup

        launch_mixup(x_rows, out_rows, lam32, perm)
    elif name == "cuda":
        _backends.cuda_ext().mixup_blend_rows(x_rows, out_rows, lam32, perm)
    B = x.shape[0]
    if perm is None and B % 2 == 1 and out is not src:  # the kernels leave the self-paired middle row
        out[B // 2].copy_(src[B // 2])
    if inplace and out is not x:
        x.copy_(out)
        return x
    return out
