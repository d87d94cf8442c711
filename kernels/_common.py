"""Pieces the Triton optimizer kernels share."""
import torch
import triton
import triton.language as tl

BLOCK = 1024

_constants: dict = {}


def constant(device, value: float = 0.0) -> torch.Tensor:
    """A one-element float32 tensor holding `value`, passed where an optional
    pointer argument is absent: found_inf 0, grad_scale 1, an unused lr."""
    key = (str(device), value)
    if key not in _constants:
        _constants[key] = torch.full((1,), value, dtype=torch.float32, device=device)
    return _constants[key]


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
def store_weights(ptrs_ptr, n_tensors, t, offs, mask, w, avg_coef, MASTER_ROW: tl.constexpr,
                  AVG_ROW: tl.constexpr, PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                  MATH_DTYPE: tl.constexpr, MASTER: tl.constexpr, AVERAGE: tl.constexpr):
    """What both write back: the fp32 master, the param (the master rounded)
    and the running average updated in the same pass."""
    if MASTER:
        tl.store(table_ptr(ptrs_ptr, n_tensors, t, MASTER_ROW, STATE_DTYPE) + offs, w.to(STATE_DTYPE), mask=mask)
    tl.store(table_ptr(ptrs_ptr, n_tensors, t, 0, PARAM_DTYPE) + offs, w.to(PARAM_DTYPE), mask=mask)
    if AVERAGE:
        avg_ptr = table_ptr(ptrs_ptr, n_tensors, t, AVG_ROW, STATE_DTYPE)
        a = tl.load(avg_ptr + offs, mask=mask, other=0.0).to(MATH_DTYPE)
        tl.store(avg_ptr + offs, lerp_average(a, w, avg_coef).to(STATE_DTYPE), mask=mask)




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
