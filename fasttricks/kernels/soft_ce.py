"""Soft-target cross-entropy against a factored mixup target, in Triton
(docs/tricks.md; the reference is the torch-ops path of fasttricks/losses.py,
the CPU twin csrc/cpu/soft_ce.cpp).

For row i with logits z, classes y_a, y_b, weight lam and the smoothing
coefficients (on, off) of the target t = on * (lam e_ya + (1 - lam) e_yb) + off:

    loss_i = logsumexp(z) - on * (lam z[y_a] + (1 - lam) z[y_b]) - off * sum_j z_j
    dloss_i / dz_j = (softmax(z)_j - t_j) * grad_loss_i

One program per row. The forward reads the row once, in blocks of BLOCK_C,
keeping a running maximum and sum (an online logsumexp): no B x C temporary,
any number of classes. The backward writes the gradient straight into its
output. Math in fp32 for fp32, bf16 and fp16 logits. A leaf: imports no
fasttricks.ops.
"""
import itertools

import torch
import triton
import triton.language as tl

from fasttricks.kernels import SIG_DTYPES, TL_DTYPES, device_guard

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# NOTE [runtime loop bounds]
# The class loops run to n_classes, a runtime (not specialised) argument, as
# `while` loops: triton 3.6's interpreter holds such a scalar as a one-element
# array, which a `for ... in tl.range(0, n_classes, ...)` bound cannot be
# converted from (TypeError under numpy 2), while a `while` condition can.
# Compiled, both are the same scf loop.
BLOCK_SIZES = (256, 1024, 4096)


def block_c(num_classes: int) -> int:
    """The class block of a launch: the smallest of BLOCK_SIZES that holds a row, else the largest."""
    return next((b for b in BLOCK_SIZES if num_classes <= b), BLOCK_SIZES[-1])


@triton.jit(do_not_specialize=["n_classes", "row_stride"])
def soft_ce_forward_kernel(logits_ptr, y_a_ptr, y_b_ptr, lam_ptr, loss_ptr, lse_ptr, n_classes, row_stride,
                           on, off, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_C)
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    total = tl.zeros((), tl.float32)
    start = tl.zeros((), tl.int32)
    while start < n_classes:  # NOTE [runtime loop bounds]
        mask = start + cols < n_classes
        z = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        # Masked classes (-inf logits) may fill whole blocks: while the row
        # has seen nothing else, shift by 0, not by -inf (-inf - -inf is NaN).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift), axis=0)
        running_max = new_max
        total += tl.sum(tl.where(mask, z, 0.0), axis=0)
        start += BLOCK_C
    lse = running_max + tl.log(running_sum)
    lam = tl.load(lam_ptr + row)
    z_a = tl.load(base + tl.load(y_a_ptr + row)).to(tl.float32)
    z_b = tl.load(base + tl.load(y_b_ptr + row)).to(tl.float32)
    # off = 0 (no smoothing) takes no part: 0 * (-inf) of masked classes would be NaN.
    loss = lse - on * (lam * z_a + (1.0 - lam) * z_b) - off * tl.where(off != 0.0, total, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit(do_not_specialize=["n_classes", "row_stride"])
def soft_ce_backward_kernel(logits_ptr, lse_ptr, y_a_ptr, y_b_ptr, lam_ptr, grad_loss_ptr, grad_ptr, n_classes,
                            row_stride, on, off, OUT_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    out = grad_ptr + row * n_classes
    cols = tl.arange(0, BLOCK_C)
    lse = tl.load(lse_ptr + row)
    lam = tl.load(lam_ptr + row)
    y_a = tl.load(y_a_ptr + row)
    y_b = tl.load(y_b_ptr + row)
    g = tl.load(grad_loss_ptr + row).to(tl.float32)
    start = tl.zeros((), tl.int32)
    while start < n_classes:  # NOTE [runtime loop bounds]
        j = start + cols
        mask = j < n_classes
        z = tl.load(base + j, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse) - off
        p = p - tl.where(j == y_a, on * lam, 0.0) - tl.where(j == y_b, on * (1.0 - lam), 0.0)
        tl.store(out + j, (p * g).to(OUT_DTYPE), mask=mask)
        start += BLOCK_C


def forward(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor, on: float,
            off: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss[B], lse[B]) in float32. logits: [B, C] with unit stride along C;
    y_a, y_b: int64 [B] in range; lam: float32 [B]."""
    B, C = logits.shape
    loss = torch.empty(B, dtype=torch.float32, device=logits.device)
    lse = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B:
        with device_guard(logits):
            soft_ce_forward_kernel[(B,)](logits, y_a, y_b, lam, loss, lse, C, logits.stride(0), float(on),
                                         float(off), BLOCK_C=block_c(C))
    return loss, lse


def backward(logits: torch.Tensor, lse: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor,
             grad_loss: torch.Tensor, on: float, off: float) -> torch.Tensor:
    """The gradient with respect to the logits, contiguous, in their dtype."""
    B, C = logits.shape
    grad = torch.empty((B, C), dtype=logits.dtype, device=logits.device)
    if B:
        with device_guard(logits):
            soft_ce_backward_kernel[(B,)](logits, lse, y_a, y_b, lam, grad_loss.contiguous(), grad, C,
                                          logits.stride(0), float(on), float(off), OUT_DTYPE=TL_DTYPES[logits.dtype],
                                          BLOCK_C=block_c(C))
    return grad


def aot_variants():
    """(name, kernel, signature, constexprs, compile options) of every variant the
    launches can select: each logits dtype x each class block, forward and backward."""
    for dtype, block in itertools.product(DTYPES, BLOCK_SIZES):
        t = SIG_DTYPES[dtype]
        sig = {"logits_ptr": f"*{t}", "y_a_ptr": "*i64", "y_b_ptr": "*i64", "lam_ptr": "*fp32", "loss_ptr": "*fp32",
               "lse_ptr": "*fp32", "n_classes": "i32", "row_stride": "i64", "on": "fp32", "off": "fp32",
               "BLOCK_C": "constexpr"}
        yield f"soft_ce_fwd[{t},{block}]", soft_ce_forward_kernel, sig, {"BLOCK_C": block}, {}
        sig = {"logits_ptr": f"*{t}", "lse_ptr": "*fp32", "y_a_ptr": "*i64", "y_b_ptr": "*i64", "lam_ptr": "*fp32",
               "grad_loss_ptr": "*fp32", "grad_ptr": f"*{t}", "n_classes": "i32", "row_stride": "i64", "on": "fp32",
               "off": "fp32", "OUT_DTYPE": "constexpr", "BLOCK_C": "constexpr"}
        yield (f"soft_ce_bwd[{t},{block}]", soft_ce_backward_kernel, sig,
               {"OUT_DTYPE": TL_DTYPES[dtype], "BLOCK_C": block}, {})
