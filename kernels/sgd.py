"""Fused multi-tensor SGD/SGDW step in Triton (NOTE [SGD math] in
csrc/include/fasttricks/sgd_math.h; the reference is fasttricks/ops/sgd.py)."""
import torch
import triton
import triton.language as tl

from fasttricks.kernels import TL_DTYPES
from fasttricks.kernels._common import BLOCK, chunk_prologue, dummy, load_weight_and_grad, store_weights, table_ptr
from fasttricks.ops._device import CHUNK, scalar_arg
from fasttricks.ops.sgd import DeviceSgdPlan



@triton.jit
def sgd_kernel(ptrs_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors,
               lr, lr_ptr, weight_decay, momentum, dampening, grad_mul, grad_scale_ptr, found_inf_ptr,
               avg_coef,
               PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, DECOUPLED: tl.constexpr,
               MASTER: tl.constexpr, AVERAGE: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr,
               BLOCK: tl.constexpr):
    t, start, numel, lr, mul = chunk_prologue(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, lr, lr_ptr, grad_mul,
                                              grad_scale_ptr, found_inf_ptr, MATH_DTYPE, LR_IS_TENSOR,
                                              HAS_GRAD_SCALE, HAS_FOUND_INF)
    decay = 1.0 - lr * weight_decay
    first = tl.load(ptrs_ptr + 5 * n_tensors + t) != 0

    for off in tl.range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < numel
        w, g = load_weight_and_grad(ptrs_ptr, n_tensors, t, offs, mask, mul, weight_decay, decay, 3, PARAM_DTYPE,
                                    STATE_DTYPE, MATH_DTYPE, MASTER, DECOUPLED)
        if MOMENTUM:
            buf_ptr = table_ptr(ptrs_ptr, n_tensors, t, 2, STATE_DTYPE)
            buf = tl.load(buf_ptr + offs, mask=mask & (not first), other=0.0).to(MATH_DTYPE)
            buf = tl.where(first, g, momentum * buf + (1.0 - dampening) * g)
            tl.store(buf_ptr + offs, buf.to(STATE_DTYPE), mask=mask)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        w = w - lr * g
        store_weights(ptrs_ptr, n_tensors, t, offs, mask, w, avg_coef, 3, 4, PARAM_DTYPE, STATE_DTYPE, MATH_DTYPE,
                      MASTER, AVERAGE)


def launch_sgd(tables, *, param_dtype, state_dtype, lr, weight_decay, momentum, dampening, grad_mul,
               grad_scale, found_inf, avg_coef, nesterov, decoupled, average, device):
    ptrs, numels, chunk_tensor, chunk_start, n, n_chunks = tables
    lr_value, lr_tensor = scalar_arg(lr, device)
    fallback = dummy(device)
    sgd_kernel[(n_chunks,)](
        ptrs, numels, chunk_tensor, chunk_start, n,
        lr_value, lr_tensor if lr_tensor is not None else fallback, float(weight_decay), float(momentum),
        float(dampening), float(grad_mul), grad_scale if grad_scale is not None else fallback,
        found_inf if found_inf is not None else fallback, float(avg_coef),
        PARAM_DTYPE=TL_DTYPES[param_dtype], STATE_DTYPE=TL_DTYPES[state_dtype],
        MATH_DTYPE=tl.float64 if param_dtype == torch.float64 else tl.float32,
        MOMENTUM=momentum != 0, NESTEROV=nesterov, DECOUPLED=decoupled, MASTER=state_dtype != param_dtype,
        AVERAGE=average, LR_IS_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, CHUNK=CHUNK, BLOCK=BLOCK)


class TritonSgdPlan(DeviceSgdPlan):
    launch = staticmethod(launch_sgd)




def aot_variants():
    from fasttricks.kernels import SIG_DTYPES

    sig = {"ptrs_ptr": "*i64", "numels_ptr": "*i64", "chunk_tensor_ptr": "*i64", "chunk_start_ptr": "*i64",
           "n_tensors": "i32", "lr": "fp32", "lr_ptr": "*fp32", "weight_decay": "fp32", "momentum": "fp32",
           "dampening": "fp32", "grad_mul": "fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
           "avg_coef": "fp32"}
    pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
             (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)]
    for p, s in pairs:
        for mom, nes, dec, avg, flags in ((False, False, False, False, False), (True, True, True, True, True),
                                          (True, False, False, False, True)):
            const = {"PARAM_DTYPE": TL_DTYPES[p], "STATE_DTYPE": TL_DTYPES[s],
                     "MATH_DTYPE": tl.float64 if p == torch.float64 else tl.float32, "MOMENTUM": mom,
                     "NESTEROV": nes, "DECOUPLED": dec, "MASTER": p != s, "AVERAGE": avg, "LR_IS_TENSOR": flags,
                     "HAS_GRAD_SCALE": flags, "HAS_FOUND_INF": flags, "CHUNK": CHUNK, "BLOCK": BLOCK}
            yield f"sgd[{SIG_DTYPES[p]}/{SIG_DTYPES[s]},mom={mom},nes={nes}]", sgd_kernel, \
                {**sig, **{k: "constexpr" for k in const}}, const
