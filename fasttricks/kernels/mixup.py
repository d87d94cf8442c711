"""Fused mixup blend in Triton (NOTE [mixup blend math] in
csrc/include/fasttricks/mixup_math.h; the reference is fasttricks/ops/mixup.py).

Programs run over (row or row pair, chunk of the row). FLIP pairs row i with
row B-1-i and loads both before storing either (in place); otherwise row i
blends with row perm[i] into a separate output."""
import torch
import triton
import triton.language as tl

from fasttricks.kernels import TL_DTYPES, device_guard
from fasttricks.kernels._common import BLOCK

CHUNK = 8192
MAX_GRID_Y = 65535
# NOTE [mixup blend math] (csrc/include/fasttricks/mixup_math.h): no FMA
# contraction, so that uint8 pixels round as on every other backend.
COMPILE_OPTIONS = {"enable_fp_fusion": False}
SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.uint8)


@triton.jit
def _blend(a, b, lam, IS_UINT8: tl.constexpr):
    mix = lam * a + (1.0 - lam) * b
    if IS_UINT8:
        mix = tl.minimum(tl.maximum(tl.floor(mix + 0.5), 0.0), 255.0)
    return mix


@triton.jit
def mixup_kernel(x_ptr, out_ptr, lam_ptr, perm_ptr, n_rows, row_elems,
                 DTYPE: tl.constexpr, FLIP: tl.constexpr, IS_UINT8: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr):
    r = tl.program_id(0)
    i = r.to(tl.int64)
    if FLIP:
        j = n_rows - 1 - i
    else:
        j = tl.load(perm_ptr + r)
    lam_i = tl.load(lam_ptr + i)
    lam_j = tl.load(lam_ptr + j)
    # The grid's second axis is capped at 65535: its programs stride over the
    # chunks of a long row.
    # NOTE [runtime loop bounds] (fasttricks/kernels/soft_ce.py): a while loop.
    first, stride = tl.program_id(1), tl.num_programs(1)
    n_chunks = tl.cdiv(tl.cdiv(row_elems, CHUNK) - first, stride)
    k = tl.zeros((), tl.int64)
    while k < n_chunks:
        start = (first + k * stride).to(tl.int64) * CHUNK
        for off in tl.range(0, CHUNK, BLOCK):
            offs = start + off + tl.arange(0, BLOCK)
            mask = offs < row_elems
            a = tl.load(x_ptr + i * row_elems + offs, mask=mask, other=0).to(tl.float32)
            b = tl.load(x_ptr + j * row_elems + offs, mask=mask, other=0).to(tl.float32)
            tl.store(out_ptr + i * row_elems + offs, _blend(a, b, lam_i, IS_UINT8).to(DTYPE), mask=mask)
            if FLIP:
                tl.store(out_ptr + j * row_elems + offs, _blend(b, a, lam_j, IS_UINT8).to(DTYPE), mask=mask)
        k += 1


def launch_mixup(x: torch.Tensor, out: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor | None) -> None:
    """x, out: contiguous [B, D]; lam: float32 [B] on x's device; perm: int64 [B] or None (flip).
    The middle row of an odd flip batch is not written (the dispatcher copies it)."""
    rows, row_elems = x.shape
    flip = perm is None
    programs = rows // 2 if flip else rows
    if programs == 0 or row_elems == 0:
        return
    grid = (programs, min(triton.cdiv(row_elems, CHUNK), MAX_GRID_Y))
    with device_guard(x):
        mixup_kernel[grid](x, out, lam, perm if perm is not None else lam, rows, row_elems,
                           DTYPE=TL_DTYPES[x.dtype], FLIP=flip, IS_UINT8=x.dtype == torch.uint8, CHUNK=CHUNK,
                           BLOCK=BLOCK, **COMPILE_OPTIONS)


def aot_variants():
    """(name, fn, signature, constexprs, compile options) of every variant launch_mixup can launch."""
    from fasttricks.kernels import SIG_DTYPES

    out = []
    for dtype in SUPPORTED:
        tl_name = SIG_DTYPES[dtype]
        for flip in (True, False):
            sig = {"x_ptr": f"*{tl_name}", "out_ptr": f"*{tl_name}", "lam_ptr": "*fp32",
                   "perm_ptr": "*fp32" if flip else "*i64", "n_rows": "i32", "row_elems": "i64",
                   "DTYPE": "constexpr", "FLIP": "constexpr", "IS_UINT8": "constexpr", "CHUNK": "constexpr",
                   "BLOCK": "constexpr"}
            const = {"DTYPE": TL_DTYPES[dtype], "FLIP": flip, "IS_UINT8": dtype == torch.uint8, "CHUNK": CHUNK,
                     "BLOCK": BLOCK}
            out.append((f"mixup_{tl_name}_{'flip' if flip else 'perm'}", mixup_kernel, sig, const, COMPILE_OPTIONS))
    return out
