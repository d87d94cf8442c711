"""Soft-target cross-entropy and knowledge distillation (docs/tricks.md).

For a MixedTarget (fasttricks.mixup) the target row is
t = on * (lam * onehot(y_a) + (1 - lam) * onehot(y_b)) + off, with sum(t) = 1, so

    CE_i = logsumexp(z_i) - on * (lam_i z[i, y_a] + (1 - lam_i) z[i, y_b]) - off * sum_j z_ij
    dCE_i/dz_i = softmax(z_i) - t_i

Both are computed from per-row scalars and two gathers: no B x C target is
built, forward or backward (the gradient itself is B x C, as any loss's). On
the CPU the C++ kernels (csrc/cpu/soft_ce.cpp) allocate no B x C buffer in the
forward at all.
"""
from __future__ import annotations

import torch

from fasttricks import _backends
from fasttricks._checks import check_values_in
from fasttricks.mixup import MixedTarget

__all__ = ["soft_target_cross_entropy", "distillation_loss"]


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_backend(backend: str, logits: torch.Tensor) -> str:
    """The kernel for a factored soft-target CE: "cpu" (csrc/cpu/soft_ce.cpp),
    "triton" (fasttricks/kernels/soft_ce.py) or "reference" (torch ops). "auto" takes the
    C++ kernel for CPU logits and the Triton one for GPU logits, where they
    serve the dtype; an explicit backend that cannot run raises."""
    _backends.check_backend_name(backend)
    served = logits.dtype in KERNEL_DTYPES
    if backend == "auto":
        if not served:
            return "reference"
        name = _backends.resolve("auto", logits.device)
        if name == "cuda":  # no CUDA C++ kernel for the loss: Triton serves the GPU
            name = "triton" if _backends.available("triton", logits.device) is None else "reference"
        return name
    if backend == "reference":
        return backend
    if backend == "cuda":
        raise RuntimeError("soft_target_cross_entropy has no CUDA C++ kernel: use backend='triton' (or 'auto')")
    _backends.resolve(backend, logits.device)  # raises if unavailable
    if not served:
        raise TypeError(f"soft_target_cross_entropy: the {backend} kernel serves float32, bfloat16 and float16 "
                        f"logits, got {logits.dtype}")
    return backend


def _kernels(backend: str):
    """(forward, backward) of a kernel backend."""
    if backend == "cpu":
        ext = _backends.cpu_ext()
        return ext.soft_ce_forward, ext.soft_ce_backward
    from fasttricks.kernels import soft_ce

    return soft_ce.forward, soft_ce.backward


class _FactoredSoftTargetCE(torch.autograd.Function):
    """With a kernel ("cpu", "triton"): one pass per row, no B x C buffer in
    the forward, the gradient written straight into its output. "reference":
    the same formula in torch ops (the forward's logsumexp keeps one B x C
    temporary)."""

    @staticmethod
    def forward(ctx, logits, y_a, y_b, lam, on, off, backend):
        if backend != "reference":
            if logits.stride(1) != 1:
                logits = logits.contiguous()
            loss, lse = _kernels(backend)[0](logits, y_a, y_b, lam.float().contiguous(), on, off)
        else:
            z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
            lse = torch.logsumexp(z, dim=1)
            mixed = lam.to(z.dtype) * z.gather(1, y_a[:, None]).squeeze(1) + \
                (1 - lam.to(z.dtype)) * z.gather(1, y_b[:, None]).squeeze(1)
            loss = lse - on * mixed
            if off != 0:
                loss = loss - off * z.sum(dim=1)
        ctx.save_for_backward(logits, lse, y_a, y_b, lam)
        ctx.on, ctx.off, ctx.backend = on, off, backend
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, y_a, y_b, lam = ctx.saved_tensors
        if ctx.backend != "reference":
            grad = _kernels(ctx.backend)[1](logits, lse, y_a, y_b, lam.float().contiguous(),
                                            grad_loss.float().contiguous(), ctx.on, ctx.off)
            return grad, None, None, None, None, None, None
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        g = grad_loss.to(z.dtype)
        grad = torch.exp(z - lse[:, None])            # softmax, in a fresh buffer that becomes the gradient
        if ctx.off != 0:
            grad.sub_(ctx.off)
        lam = lam.to(z.dtype)
        grad.scatter_add_(1, y_a[:, None], (-ctx.on * lam)[:, None])
        grad.scatter_add_(1, y_b[:, None], (-ctx.on * (1 - lam))[:, None])
        grad.mul_(g[:, None])
        return grad.to(logits.dtype), None, None, None, None, None, None


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")


def soft_target_cross_entropy(logits: torch.Tensor, target, reduction: str = "mean", *,
                              backend: str = "auto") -> torch.Tensor:
    """Cross-entropy against a soft target: a MixedTarget (factored, fused
    forward and backward without a B x C target), a dense [B, C] probability
    target, or class indices (plain cross-entropy).

    `backend` picks the kernel of the factored case (see resolve_backend):
    "auto" | "reference" | "cpu" | "triton". Dense targets (distillation's
    probability rows) and class indices always take torch's own ops."""
    _check_logits(logits)
    _backends.check_backend_name(backend)
    B, C = logits.shape
    if isinstance(target, MixedTarget):
        if target.num_classes != C:
            raise ValueError(f"target has {target.num_classes} classes, logits have {C}")
        if target.y_a.shape[0] != B:
            raise ValueError(f"target has {target.y_a.shape[0]} rows, logits have {B}")
        on, off = target.coefficients
        name = resolve_backend(backend, logits)
        y_a, y_b = (y.to(device=logits.device, dtype=torch.int64) for y in (target.y_a, target.y_b))
        if name == "triton":  # the C++ kernel checks its own; torch's gather raises for the reference
            for y in (y_a, y_b):
                check_values_in(y, 0, C - 1, IndexError, f"soft-target CE: class indices must be in [0, {C})")
        loss = _FactoredSoftTargetCE.apply(logits, y_a.contiguous(), y_b.contiguous(), target.lam.to(logits.device),
                                           on, off, name)
        return _reduce(loss.to(logits.dtype), reduction)
    if not torch.is_tensor(target):
        raise TypeError(f"target must be a MixedTarget or a tensor, got {type(target).__name__}")
    if target.dim() == 1:
        if target.shape[0] != B:
            raise ValueError(f"target has {target.shape[0]} labels, logits have {B} rows")
        return torch.nn.functional.cross_entropy(logits, target, reduction=reduction)
    if target.shape != logits.shape:
        raise ValueError(f"dense target shape {tuple(target.shape)} differs from logits {tuple(logits.shape)}")
    loss = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1)
    return _reduce(loss, reduction)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target, T: float = 1.0,
                      reduction: str = "mean") -> torch.Tensor:
    """Knowledge distillation (Bag of Tricks, eq. 6):

        CE(p, softmax(z)) + T^2 * CE(softmax(r / T), softmax(z / T))

    z = student logits, r = teacher logits (no gradient flows to the
    teacher), p = the true target (class indices, a MixedTarget or a dense
    target). T^2 keeps the soft term's gradient scale independent of T."""
    _check_logits(student_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} differ from student "
                         f"{tuple(student_logits.shape)}")
    T = float(T)
    if not T > 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    hard = soft_target_cross_entropy(student_logits, target, reduction=reduction)
    soft_target = torch.softmax(teacher_logits.detach().float() / T, dim=1).to(student_logits.dtype)
    soft = soft_target_cross_entropy(student_logits / T, soft_target, reduction=reduction)
    return hard + T * T * soft
