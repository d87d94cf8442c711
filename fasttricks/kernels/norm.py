"""Multi-tensor norm partials in Triton, for gradient clipping (NOTE [clip in
the step] in fasttricks/optim/_clip.py; the host side is fasttricks/ops/norm.py).

One program per CHUNK elements of one tensor, over the grad row of a packed
pointer table (NOTE [pointer table]); each writes its chunk's sum of squares
(two-norm) or largest |x| (inf-norm, NaN if the chunk holds one) to out[c],
in fp32 (fp64 for fp64 grads). The host sums or takes the max of the
partials on the device. A leaf: imports no fasttricks.ops.
"""
import torch
import triton
import triton.language as tl

from fasttricks._table import CHUNK
from fasttricks.kernels import SIG_DTYPES, TL_DTYPES
from fasttricks.kernels._common import BLOCK, COMPILE_OPTIONS

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@triton.jit
def norm_partials_kernel(ptrs_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors, out_ptr,
                         GRAD_ROW: tl.constexpr, GRAD_DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr,
                         INF: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid)
    start = tl.load(chunk_start_ptr + pid)
    numel = tl.load(numels_ptr + t)
    grad = tl.load(ptrs_ptr + GRAD_ROW * n_tensors + t).to(tl.pointer_type(GRAD_DTYPE))
    acc = tl.zeros([BLOCK], dtype=MATH_DTYPE)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for off in tl.range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        x = tl.load(grad + offs, mask=offs < numel, other=0.0).to(MATH_DTYPE)
        if INF:
            acc = tl.maximum(acc, tl.abs(x))
            nan = nan | (x != x).to(tl.int32)
        else:
            acc += x * x
    if INF:
        # A NaN anywhere makes the norm NaN, as torch's; tl.maximum need not keep one.
        result = tl.where(tl.max(nan, axis=0) != 0, float("nan"), tl.max(acc, axis=0))
    else:
        result = tl.sum(acc, axis=0)
    tl.store(out_ptr + pid, result)


def norm_constexprs(grad_dtype, inf: bool, grad_row: int) -> dict:
    """The kernel's compile-time arguments, for launch_norm_partials and aot_variants alike."""
    math = tl.float64 if grad_dtype == torch.float64 else tl.float32
    return {"GRAD_ROW": int(grad_row), "GRAD_DTYPE": TL_DTYPES[grad_dtype], "MATH_DTYPE": math, "INF": bool(inf),
            "CHUNK": CHUNK, "BLOCK": BLOCK}


def launch_norm_partials(tables, out, *, grad_dtype, inf, grad_row):
    """One launch over a packed table: out[c] gets chunk c's partial."""
    ptrs, numels, chunk_tensor, chunk_start, n, n_chunks = tables
    norm_partials_kernel[(n_chunks,)](ptrs, numels, chunk_tensor, chunk_start, n, out,
                                      **norm_constexprs(grad_dtype, inf, grad_row), **COMPILE_OPTIONS)


SIGNATURE = {"ptrs_ptr": "*i64", "numels_ptr": "*i64", "chunk_tensor_ptr": "*i64", "chunk_start_ptr": "*i64",
             "n_tensors": "i32"}


def aot_variants():
    """Every variant launch_norm_partials can select, for the compile tests."""
    for dtype in DTYPES:
        for inf in (False, True):
            const = norm_constexprs(dtype, inf, 1)
            out = "*fp64" if dtype == torch.float64 else "*fp32"
            yield (f"norm[{SIG_DTYPES[dtype]},{'inf' if inf else '2'}]", norm_partials_kernel,
                   {**SIGNATURE, "out_ptr": out, **{k: "constexpr" for k in const}}, const, COMPILE_OPTIONS)
