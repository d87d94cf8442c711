"""Fused multi-tensor Adam/AdamW step in Triton (NOTE [Adam math] in
csrc/include/fasttricks/adam_math.h; the reference is fasttricks/ops/adam.py).

One program per CHUNK elements of one tensor; the pointer table (NOTE
[pointer table], fasttricks/_table.py) is packed by the device plan that calls
launch_adam. Step counts, lr, grad_scale and found_inf are read on the device,
so a step never synchronises with the host. A leaf: imports no fasttricks.ops.
"""
import triton
import triton.language as tl

from fasttricks._table import ADAM_ROW, CHUNK
from fasttricks.kernels._common import (BLOCK, aot_variants_of, chunk_prologue, div_ieee, draw_bits, launch_step,
                                        load_weight_and_grad, next_word, precision_constexprs,
                                        rounding_tensor_key, sqrt_ieee, store_rounded, store_weights, table_ptr)

EXP_AVG: tl.constexpr = tl.constexpr(ADAM_ROW["exp_avg"])
EXP_AVG_SQ: tl.constexpr = tl.constexpr(ADAM_ROW["exp_avg_sq"])
MAX_EXP_AVG_SQ: tl.constexpr = tl.constexpr(ADAM_ROW["max_exp_avg_sq"])
MASTER_ROW: tl.constexpr = tl.constexpr(ADAM_ROW["master"])
AVG_ROW: tl.constexpr = tl.constexpr(ADAM_ROW["avg"])
STEP_ROW: tl.constexpr = tl.constexpr(ADAM_ROW["step"])
KEY_ROW: tl.constexpr = tl.constexpr(ADAM_ROW["key"])


# n_tensors and round_key are not specialised: Triton would compile a new
# variant whenever the number of params with a grad, or the stochastic-rounding
# key of a step (a hash, so at a random step), became 1 or a multiple of 16.
@triton.jit(do_not_specialize=["n_tensors", "round_key"])
def adam_kernel(ptrs_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors,
                lr, lr_ptr, one_minus_beta1, one_minus_beta2, eps, weight_decay, grad_mul, grad_scale_ptr, found_inf_ptr,
                avg_coef, round_key,
                PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, AVG_DTYPE: tl.constexpr,
                MATH_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MASTER: tl.constexpr,
                SR: tl.constexpr, AVERAGE: tl.constexpr, LR_IS_TENSOR: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK: tl.constexpr):
    t, start, numel, lr, mul = chunk_prologue(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, lr, lr_ptr, grad_mul,
                                              grad_scale_ptr, found_inf_ptr, MATH_DTYPE, LR_IS_TENSOR)
    if SR:  # NOTE [stochastic rounding]
        key = rounding_tensor_key(ptrs_ptr, n_tensors, t, round_key, KEY_ROW)
    m_ptr = table_ptr(ptrs_ptr, n_tensors, t, EXP_AVG, STATE_DTYPE)
    v_ptr = table_ptr(ptrs_ptr, n_tensors, t, EXP_AVG_SQ, STATE_DTYPE)
    step_ptr = table_ptr(ptrs_ptr, n_tensors, t, STEP_ROW, tl.float32)

    step = tl.load(step_ptr).to(MATH_DTYPE)
    # Bias corrections 1 - beta^t in fp64 from 1 - beta (given by the host in
    # double): in fp32, 1 - 0.999^t loses ~5 digits to cancellation.
    b1_64 = 1.0 - tl.cast(one_minus_beta1, tl.float64)
    b2_64 = 1.0 - tl.cast(one_minus_beta2, tl.float64)
    step_64 = tl.cast(step, tl.float64)
    bc1 = 1.0 - tl.exp2(step_64 * tl.log2(b1_64))
    bc2 = 1.0 - tl.exp2(step_64 * tl.log2(b2_64))
    step_size = tl.cast(tl.cast(lr, tl.float64) / bc1, MATH_DTYPE)
    inv_bc2_sqrt = tl.cast(1.0 / tl.sqrt(bc2), MATH_DTYPE)
    b1 = tl.cast(b1_64, MATH_DTYPE)
    b2 = tl.cast(b2_64, MATH_DTYPE)
    # 1 - beta as the host computed it in double, rounded once: 1 - b2 in fp32 from a
    # rounded b2 = fp32(0.999) is off by 1.3e-5 relative (docs/precision.md).
    omb1 = tl.cast(one_minus_beta1, MATH_DTYPE)
    omb2 = tl.cast(one_minus_beta2, MATH_DTYPE)
    decay = 1.0 - lr * weight_decay

    for off in tl.range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < numel
        w, g = load_weight_and_grad(ptrs_ptr, n_tensors, t, offs, mask, mul, weight_decay, decay, MASTER_ROW, PARAM_DTYPE,
                                    STATE_DTYPE, MATH_DTYPE, MASTER, DECOUPLED)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(MATH_DTYPE)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(MATH_DTYPE)
        m = b1 * m + omb1 * g
        v = b2 * v + omb2 * (g * g)
        # word0: param (low half), exp_avg (high); word1: exp_avg_sq; word2: max_exp_avg_sq.
        if SR:
            bits0 = draw_bits(key, offs)
            bits1 = next_word(bits0)
        else:
            bits0 = offs
            bits1 = offs
        second = v
        if AMSGRAD:
            vmax_ptr = table_ptr(ptrs_ptr, n_tensors, t, MAX_EXP_AVG_SQ, STATE_DTYPE)
            vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(MATH_DTYPE), v)
            if SR:
                bits2 = next_word(bits1)
            else:
                bits2 = offs
            store_rounded(vmax_ptr + offs, mask, vmax, bits2, 16, True, STATE_DTYPE, SR)
            second = vmax
        denom = sqrt_ieee(second, MATH_DTYPE) * inv_bc2_sqrt + eps
        w = w - div_ieee(step_size * m, denom, MATH_DTYPE)  # the order of NOTE [Adam math]
        store_rounded(m_ptr + offs, mask, m, bits0, 16, False, STATE_DTYPE, SR)
        store_rounded(v_ptr + offs, mask, v, bits1, 16, True, STATE_DTYPE, SR)
        store_weights(ptrs_ptr, n_tensors, t, offs, mask, w, avg_coef, bits0, MASTER_ROW, AVG_ROW, PARAM_DTYPE,
                      STATE_DTYPE, AVG_DTYPE, MATH_DTYPE, MASTER, AVERAGE, SR)


def adam_constexprs(param_dtype, state_dtype, *, amsgrad, decoupled, average, lr_is_tensor, master,
                    stochastic_rounding) -> dict:
    """The kernel's compile-time arguments: what launch_adam passes, and what
    aot_variants compiles ahead of time, built by this one function."""
    return {**precision_constexprs(param_dtype, state_dtype, master, stochastic_rounding),
            "AMSGRAD": bool(amsgrad), "DECOUPLED": bool(decoupled),
            "AVERAGE": bool(average), "LR_IS_TENSOR": bool(lr_is_tensor), "CHUNK": CHUNK, "BLOCK": BLOCK}


def launch_adam(tables, hyper, *, param_dtype, state_dtype, grad_scale, found_inf, avg_coef, amsgrad, decoupled,
                average, device, master, stochastic_rounding):
    """One launch over a packed table. `hyper` has the fields of
    fasttricks.ops.adam.AdamHyper; 1 - beta is computed here, in double."""
    launch_step(adam_kernel, tables, hyper,
                (1.0 - float(hyper.beta1), 1.0 - float(hyper.beta2), float(hyper.eps), float(hyper.weight_decay)),
                lambda lr_is_tensor: adam_constexprs(param_dtype, state_dtype, amsgrad=amsgrad, decoupled=decoupled,
                                                     average=average, lr_is_tensor=lr_is_tensor, master=master,
                                                     stochastic_rounding=stochastic_rounding),
                device=device, grad_scale=grad_scale, found_inf=found_inf, avg_coef=avg_coef)


def aot_variants():
    """Every variant launch_adam can select, for the compile tests (sm_90 and sm_80, no GPU)."""
    return aot_variants_of("adam", adam_kernel, {"one_minus_beta1": "fp32", "one_minus_beta2": "fp32", "eps": "fp32",
                                                 "weight_decay": "fp32"},
                           ("amsgrad", "decoupled", "average", "lr_is_tensor"), adam_constexprs)
