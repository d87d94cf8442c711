"""Fused multi-tensor Adam/AdamW step in Triton (NOTE [Adam math] in
csrc/include/fasttricks/adam_math.h; the reference is fasttricks/ops/adam.py).

One program per CHUNK elements of one tensor; the pointer tables are built by
fasttricks.ops._device.DevicePlan. Step counts, lr, grad_scale and found_inf
are read on the device, so a step never synchronises with the host.
"""
import torch
import triton
import triton.language as tl

from fasttricks.kernels import TL_DTYPES
from fasttricks.kernels._common import (BLOCK, chunk_prologue, div_ieee, dummy, load_weight_and_grad, sqrt_ieee,
                                        store_weights, table_ptr)
from fasttricks.ops._device import CHUNK, scalar_arg
from fasttricks.ops.adam import DeviceAdamPlan



@triton.jit
def adam_kernel(ptrs_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors,
                lr, lr_ptr, one_minus_beta1, one_minus_beta2, eps, weight_decay, grad_mul, grad_scale_ptr, found_inf_ptr,
                avg_coef,
                PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr,
                AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MASTER: tl.constexpr,
                AVERAGE: tl.constexpr, LR_IS_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, numel, lr, mul = chunk_prologue(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, lr, lr_ptr, grad_mul,
                                              grad_scale_ptr, found_inf_ptr, MATH_DTYPE, LR_IS_TENSOR,
                                              HAS_GRAD_SCALE, HAS_FOUND_INF)
    m_ptr = table_ptr(ptrs_ptr, n_tensors, t, 2, STATE_DTYPE)
    v_ptr = table_ptr(ptrs_ptr, n_tensors, t, 3, STATE_DTYPE)
    step_ptr = table_ptr(ptrs_ptr, n_tensors, t, 7, tl.float32)

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
        w, g = load_weight_and_grad(ptrs_ptr, n_tensors, t, offs, mask, mul, weight_decay, decay, 5, PARAM_DTYPE,
                                    STATE_DTYPE, MATH_DTYPE, MASTER, DECOUPLED)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(MATH_DTYPE)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(MATH_DTYPE)
        m = b1 * m + omb1 * g
        v = b2 * v + omb2 * (g * g)
        second = v
        if AMSGRAD:
            vmax_ptr = table_ptr(ptrs_ptr, n_tensors, t, 4, STATE_DTYPE)
            vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(MATH_DTYPE), v)
            tl.store(vmax_ptr + offs, vmax.to(STATE_DTYPE), mask=mask)
            second = vmax
        denom = sqrt_ieee(second, MATH_DTYPE) * inv_bc2_sqrt + eps
        w = w - step_size * div_ieee(m, denom, MATH_DTYPE)
        tl.store(m_ptr + offs, m.to(STATE_DTYPE), mask=mask)
        tl.store(v_ptr + offs, v.to(STATE_DTYPE), mask=mask)
        store_weights(ptrs_ptr, n_tensors, t, offs, mask, w, avg_coef, 5, 6, PARAM_DTYPE, STATE_DTYPE, MATH_DTYPE,
                      MASTER, AVERAGE)


def launch_adam(tables, *, param_dtype, state_dtype, lr, beta1, beta2, eps, weight_decay, grad_mul,
                grad_scale, found_inf, avg_coef, amsgrad, decoupled, average, device):
    ptrs, numels, chunk_tensor, chunk_start, n, n_chunks = tables
    lr_value, lr_tensor = scalar_arg(lr, device)
    fallback = dummy(device)
    adam_kernel[(n_chunks,)](
        ptrs, numels, chunk_tensor, chunk_start, n,
        lr_value, lr_tensor if lr_tensor is not None else fallback, 1.0 - float(beta1), 1.0 - float(beta2), float(eps),
        float(weight_decay), float(grad_mul),
        grad_scale if grad_scale is not None else fallback,
        found_inf if found_inf is not None else fallback, float(avg_coef),
        PARAM_DTYPE=TL_DTYPES[param_dtype], STATE_DTYPE=TL_DTYPES[state_dtype],
        MATH_DTYPE=tl.float64 if param_dtype == torch.float64 else tl.float32,
        AMSGRAD=amsgrad, DECOUPLED=decoupled, MASTER=state_dtype != param_dtype, AVERAGE=average,
        LR_IS_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, CHUNK=CHUNK, BLOCK=BLOCK)


class TritonAdamPlan(DeviceAdamPlan):
    launch = staticmethod(launch_adam)




def aot_variants():
    """(kernel, signature, constexprs) for every dtype/switch combination the
    host can launch; tests compile each for sm_90 without a GPU."""
    from fasttricks.kernels import SIG_DTYPES

    sig = {"ptrs_ptr": "*i64", "numels_ptr": "*i64", "chunk_tensor_ptr": "*i64", "chunk_start_ptr": "*i64",
           "n_tensors": "i32", "lr": "fp32", "lr_ptr": "*fp32", "one_minus_beta1": "fp32", "one_minus_beta2": "fp32",
           "eps": "fp32", "weight_decay": "fp32", "grad_mul": "fp32", "grad_scale_ptr": "*fp32",
           "found_inf_ptr": "*fp32", "avg_coef": "fp32"}
    pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
             (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)]
    for p, s in pairs:
        for amsgrad, decoupled, average, flags in ((False, True, False, False), (True, False, True, True)):
            const = {"PARAM_DTYPE": TL_DTYPES[p], "STATE_DTYPE": TL_DTYPES[s],
                     "MATH_DTYPE": tl.float64 if p == torch.float64 else tl.float32, "AMSGRAD": amsgrad,
                     "DECOUPLED": decoupled, "MASTER": p != s, "AVERAGE": average, "LR_IS_TENSOR": flags,
                     "HAS_GRAD_SCALE": flags, "HAS_FOUND_INF": flags, "CHUNK": CHUNK, "BLOCK": BLOCK}
            yield f"adam[{SIG_DTYPES[p]}/{SIG_DTYPES[s]},ams={amsgrad},avg={average}]", adam_kernel, \
                {**sig, **{k: "constexpr" for k in const}}, const
