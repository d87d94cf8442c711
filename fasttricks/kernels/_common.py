"""Pieces the Triton optimizer kernels share."""
import itertools

import torch
import triton
import triton.language as tl

from fasttricks._table import grad_multiplier, scalar_arg
from fasttricks.kernels import PRECISIONS, TL_DTYPES, precision_name

BLOCK = 1024
# No FMA contraction: each multiply and add rounds once, in the order of the
# C++ math headers, so that every backend computes the same fp32 bits and
# stochastic rounding then draws the same way (NOTE [stochastic rounding]).
# The step is memory-bound, so the few extra instructions should not show
# (not yet measured on a GPU).
COMPILE_OPTIONS = {"enable_fp_fusion": False}

_constants: dict = {}

LOW_PRECISION = (torch.bfloat16, torch.float16)


def precision_constexprs(param_dtype, state_dtype, master: bool, stochastic_rounding: bool) -> dict:
    """The dtype switches both optimizer kernels take: MASTER, SR only where a
    16-bit tensor is written from fp32 math, the average's dtype. The policy
    is fasttricks/ops/precision.py's (a leaf cannot import it; a test in
    tests/test_precision.py holds the two equal)."""
    sr = bool(stochastic_rounding) and not master and (param_dtype in LOW_PRECISION or state_dtype in LOW_PRECISION)
    math = tl.float64 if param_dtype == torch.float64 else tl.float32
    return {"PARAM_DTYPE": TL_DTYPES[param_dtype], "STATE_DTYPE": TL_DTYPES[state_dtype],
            "AVG_DTYPE": math if (master or sr) and param_dtype in LOW_PRECISION else TL_DTYPES[param_dtype],
            "MATH_DTYPE": math, "MASTER": bool(master), "SR": sr}


def round_key_arg(hyper) -> int:
    """The step's rounding key (NOTE [stochastic rounding]) as the kernels take
    it: minus 2**31, always an int32, so Triton never compiles a variant for
    its size (rounding_tensor_key adds it back)."""
    return int(hyper.round_key) - 2**31


def constant(device, value: float = 0.0) -> torch.Tensor:
    """A one-element float32 tensor holding `value`, passed where an optional
    pointer argument is absent: found_inf 0, grad_scale 1, an unused lr."""
    key = (str(device), value)
    if key not in _constants:
        _constants[key] = torch.full((1,), value, dtype=torch.float32, device=device)
    return _constants[key]


def launch_step(kernel, tables, hyper, family_args: tuple, constexprs, *, device, grad_scale, found_inf, avg_coef):
    """One launch of an optimizer kernel over a packed table, in the argument
    order both kernels take: the table, the lr (a tensor lr is read on the
    device), the family's own `family_args`, then the gradient multiplier,
    grad_scale, found_inf, the averaging coefficient and the rounding key.
    `constexprs(lr_is_tensor)` gives the kernel's compile-time arguments."""
    ptrs, numels, chunk_tensor, chunk_start, n, n_chunks = tables
    lr_value, lr_tensor = scalar_arg(hyper.lr, device)
    device_scalar = lambda t, absent: t if t is not None else constant(device, absent)  # noqa: E731
    kernel[(n_chunks,)](
        ptrs, numels, chunk_tensor, chunk_start, n, lr_value, device_scalar(lr_tensor, 0.0), *family_args,
        grad_multiplier(hyper), device_scalar(grad_scale, 1.0), device_scalar(found_inf, 0.0), float(avg_coef),
        round_key_arg(hyper), **constexprs(lr_tensor is not None), **COMPILE_OPTIONS)


# The runtime arguments both optimizer kernels take around their own (launch_step's order).
TABLE_SIGNATURE = {"ptrs_ptr": "*i64", "numels_ptr": "*i64", "chunk_tensor_ptr": "*i64", "chunk_start_ptr": "*i64",
                   "n_tensors": "i32", "lr": "fp32", "lr_ptr": "*fp32"}
STEP_SIGNATURE = {"grad_mul": "fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "avg_coef": "fp32",
                  "round_key": "i32"}


def aot_variants_of(name: str, kernel, family_signature: dict, switches: tuple, constexprs, allowed=None):
    """(name, kernel, signature, constexprs, compile options) of every variant an
    optimizer launch can select: each precision x each combination of its
    `switches` that `allowed(flags)` admits; the compile tests build each."""
    signature = {**TABLE_SIGNATURE, **family_signature, **STEP_SIGNATURE}
    for (p, s, master, sr), values in itertools.product(PRECISIONS, itertools.product((False, True),
                                                                                       repeat=len(switches))):
        flags = dict(zip(switches, values))
        if allowed is not None and not allowed(flags):
            continue
        const = constexprs(p, s, **flags, master=master, stochastic_rounding=sr)
        yield (f"{name}[{precision_name(p, s, master, sr)},{''.join(str(int(b)) for b in values)}]", kernel,
               {**signature, **{k: "constexpr" for k in const}}, const, COMPILE_OPTIONS)


@triton.jit
def table_ptr(ptrs_ptr, n_tensors, t, ROW: tl.constexpr, DTYPE: tl.constexpr):
    """Row ROW of the pointer table, for tensor t, as a pointer to DTYPE."""
    return tl.load(ptrs_ptr + ROW * n_tensors + t).to(tl.pointer_type(DTYPE))


@triton.jit
def lerp_average(avg, w, coef):
    """NOTE [weight averaging lerp] (csrc/include/fasttricks/common.h)."""
    return tl.where(coef < 0.5, avg + coef * (w - avg), w - (w - avg) * (1.0 - coef))


@triton.jit
def load_weight_and_grad(ptrs_ptr, n_tensors, t, offs, mask, mul, weight_decay, decay,
                         MASTER_ROW: tl.constexpr, PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                         MATH_DTYPE: tl.constexpr, MASTER: tl.constexpr, DECOUPLED: tl.constexpr):
    """What both optimizer kernels load: w (the fp32 master when there is one)
    and the scaled gradient g, with the weight decay applied (decoupled: w
    shrinks by `decay`; coupled: g + wd * w). Rows 0 and 1 are param and grad."""
    if MASTER:
        w = tl.load(table_ptr(ptrs_ptr, n_tensors, t, MASTER_ROW, STATE_DTYPE) + offs, mask=mask,
                    other=0.0).to(MATH_DTYPE)
    else:
        w = tl.load(table_ptr(ptrs_ptr, n_tensors, t, 0, PARAM_DTYPE) + offs, mask=mask, other=0.0).to(MATH_DTYPE)
    g = tl.load(table_ptr(ptrs_ptr, n_tensors, t, 1, PARAM_DTYPE) + offs, mask=mask, other=0.0).to(MATH_DTYPE) * mul
    if DECOUPLED:
        w = w * decay
    else:
        g = tl.where(weight_decay != 0.0, g + weight_decay * w, g)
    return w, g


@triton.jit
def store_weights(ptrs_ptr, n_tensors, t, offs, mask, w, avg_coef, bits, MASTER_ROW: tl.constexpr,
                  AVG_ROW: tl.constexpr, PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                  AVG_DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr, MASTER: tl.constexpr, AVERAGE: tl.constexpr,
                  SR: tl.constexpr):
    """What both write back: the fp32 master, the param (the master rounded,
    or w rounded stochastically with the low half of `bits`) and the running
    average updated in the same pass."""
    if MASTER:
        tl.store(table_ptr(ptrs_ptr, n_tensors, t, MASTER_ROW, STATE_DTYPE) + offs, w.to(STATE_DTYPE), mask=mask)
    store_rounded(table_ptr(ptrs_ptr, n_tensors, t, 0, PARAM_DTYPE) + offs, mask, w, bits, 0, False, PARAM_DTYPE,
                  SR and not MASTER)
    if AVERAGE:
        avg_ptr = table_ptr(ptrs_ptr, n_tensors, t, AVG_ROW, AVG_DTYPE)
        a = tl.load(avg_ptr + offs, mask=mask, other=0.0).to(MATH_DTYPE)
        tl.store(avg_ptr + offs, lerp_average(a, w, avg_coef).to(AVG_DTYPE), mask=mask)


# NOTE [stochastic rounding] (docs/precision.md; the reference is
# fasttricks/ops/rounding.py, the C++/CUDA copy is csrc/include/fasttricks/rounding.h): the same integer ops.

@triton.jit
def mix32(x):
    """lowbias32 on uint32."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def rounding_tensor_key(ptrs_ptr, n_tensors, t, round_key, KEY_ROW: tl.constexpr):
    """The tensor's key this step; round_key arrives as round_key_arg made it."""
    step_key = round_key.to(tl.uint32, bitcast=True) ^ 0x80000000
    index = tl.load(ptrs_ptr + KEY_ROW * n_tensors + t).to(tl.uint32)
    return mix32(tl.full([1], 0, tl.uint32) + (step_key ^ mix32(tl.full([1], 0, tl.uint32) + index)))


@triton.jit
def draw_bits(tensor_key, offs):
    """word0 of the random bits of the elements offs."""
    hi = (offs >> 31).to(tl.uint32) * tl.full(offs.shape, 0x85EBCA6B, tl.uint32)
    return mix32((tensor_key ^ hi) + (offs & 0x7FFFFFFF).to(tl.uint32))


@triton.jit
def next_word(bits):
    return bits * tl.full(bits.shape, 0x9E3779B1, tl.uint32)


@triton.jit
def store_rounded(ptr, mask, x, bits, SHIFT: tl.constexpr, FLOOR: tl.constexpr, DTYPE: tl.constexpr,
                  SR: tl.constexpr):
    """x stored as DTYPE: to nearest, or (SR and a 16-bit DTYPE) stochastically
    with the random (bits >> SHIFT) & 0xFFFF; FLOOR: a positive x never becomes 0."""
    if SR and DTYPE == tl.bfloat16:
        r = (bits >> SHIFT) & 0xFFFF
        b = x.to(tl.uint32, bitcast=True)
        out = (b + r) >> 16
        out = tl.where(x != x, 0x7FC0, out)  # NaN: the canonical quiet NaN
        if FLOOR:
            out = tl.where((x > 0.0) & (out == 0), 1, out)
        tl.store(ptr, out.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    elif SR and DTYPE == tl.float16:
        r = ((bits >> SHIFT) & 0xFFFF).to(tl.float32)
        b = x.to(tl.uint32, bitcast=True)
        e = ((b >> 23) & 0xFF).to(tl.int32) - 127
        ulp_exp = tl.minimum(tl.maximum(e, -14), 15) - 10
        scale = ((127 - ulp_exp) << 23).to(tl.uint32).to(tl.float32, bitcast=True)
        unscale = ((127 + ulp_exp) << 23).to(tl.uint32).to(tl.float32, bitcast=True)
        q = x * scale
        fl = tl.floor(q)
        up = tl.where(r < (q - fl) * 65536.0, 1.0, 0.0)
        out = (fl + up) * unscale
        if FLOOR:
            out = tl.where((x > 0.0) & (out == 0.0), 5.9604644775390625e-08, out)
        tl.store(ptr, out.to(tl.float16), mask=mask)
    else:
        tl.store(ptr, x.to(DTYPE), mask=mask)




@triton.jit
def sqrt_ieee(x, MATH_DTYPE: tl.constexpr):
    """Correctly rounded sqrt (sqrt_rn is fp32-only; fp64 sqrt is already IEEE)."""
    if MATH_DTYPE == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def div_ieee(a, b, MATH_DTYPE: tl.constexpr):
    if MATH_DTYPE == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def chunk_prologue(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, lr, lr_ptr, grad_mul, grad_scale_ptr,
                   found_inf_ptr, MATH_DTYPE: tl.constexpr, LR_IS_TENSOR: tl.constexpr):
    """What every optimizer program starts with: its tensor, chunk start and
    element count (0 when found_inf is set: NOTE [found_inf contract]), the
    lr and the gradient multiplier (1 / grad_scale folded in). found_inf and
    grad_scale are always read (a 0 and a 1 when the step has none): two
    scalar loads per program instead of four times the kernel variants."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid)
    start = tl.load(chunk_start_ptr + pid)
    numel = tl.load(numels_ptr + t)
    numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(MATH_DTYPE)
    else:
        lr = tl.cast(lr, MATH_DTYPE)
    mul = tl.cast(grad_mul, MATH_DTYPE) / tl.load(grad_scale_ptr).to(MATH_DTYPE)
    return t, start, numel, lr, mul
