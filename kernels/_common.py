"""Pieces the Triton optimizer kernels share."""
import torch
import triton
import triton.language as tl

BLOCK = 1024

_dummies: dict = {}


def dummy(device) -> torch.Tensor:
    """A float32 tensor to pass where a pointer argument is switched off."""
    key = str(device)
    if key not in _dummies:
        _dummies[key] = torch.zeros(1, dtype=torch.float32, device=device)
    return _dummies[key]


@triton.jit
def table_ptr(ptrs_ptr, n_tensors, t, ROW: tl.constexpr, DTYPE: tl.constexpr):
    """Row ROW of the pointer table, for tensor t, as a pointer to DTYPE."""
    return tl.load(ptrs_ptr + ROW * n_tensors + t).to(tl.pointer_type(DTYPE))


@triton.jit
def lerp_average(avg, w, coef):
    """NOTE [weight averaging lerp] (csrc/include/fasttricks/common.h)."""
    return tl.where(coef < 0.5, avg + coef * (w - avg), w - (w - avg) * (1.0 - coef))




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
