"""Fused multi-tensor SGD/SGDW step in Triton (NOTE [SGD math] in
csrc/include/fasttricks/sgd_math.h; the reference is fasttricks/ops/sgd.py).
A leaf, as fasttricks/kernels/adam.py: the device plan packs the table and calls launch_sgd."""
import triton
import triton.language as tl

from fasttricks._table import CHUNK, SGD_ROW
from fasttricks.kernels._common import (BLOCK, aot_variants_of, chunk_prologue, draw_bits, launch_step,
                                        load_weight_and_grad, precision_constexprs,
                                        rounding_tensor_key, store_rounded, store_weights, table_ptr)

BUF_ROW: tl.constexpr = tl.constexpr(SGD_ROW["momentum_buffer"])
MASTER_ROW: tl.constexpr = tl.constexpr(SGD_ROW["master"])
AVG_ROW: tl.constexpr = tl.constexpr(SGD_ROW["avg"])
FIRST_ROW: tl.constexpr = tl.constexpr(SGD_ROW["first"])
KEY_ROW: tl.constexpr = tl.constexpr(SGD_ROW["key"])


@triton.jit(do_not_specialize=["n_tensors", "round_key"])  # see adam_kernel
def sgd_kernel(ptrs_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors,
               lr, lr_ptr, weight_decay, momentum, dampening, grad_mul, grad_scale_ptr, found_inf_ptr,
               avg_coef, round_key,
               PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, AVG_DTYPE: tl.constexpr,
               MATH_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, DECOUPLED: tl.constexpr,
               MASTER: tl.constexpr, SR: tl.constexpr, AVERAGE: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, numel, lr, mul = chunk_prologue(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, lr, lr_ptr, grad_mul,
                                              grad_scale_ptr, found_inf_ptr, MATH_DTYPE, LR_IS_TENSOR)
    if SR:  # NOTE [stochastic rounding]
        key = rounding_tensor_key(ptrs_ptr, n_tensors, t, round_key, KEY_ROW)
    decay = 1.0 - lr * weight_decay
    first = tl.load(ptrs_ptr + FIRST_ROW * n_tensors + t) != 0

    for off in tl.range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < numel
        w, g = load_weight_and_grad(ptrs_ptr, n_tensors, t, offs, mask, mul, weight_decay, decay, MASTER_ROW, PARAM_DTYPE,
                                    STATE_DTYPE, MATH_DTYPE, MASTER, DECOUPLED)
        if SR:  # word0: param (low half), momentum buffer (high)
            bits0 = draw_bits(key, offs)
        else:
            bits0 = offs
        if MOMENTUM:
            buf_ptr = table_ptr(ptrs_ptr, n_tensors, t, BUF_ROW, STATE_DTYPE)
            buf = tl.load(buf_ptr + offs, mask=mask & (not first), other=0.0).to(MATH_DTYPE)
            buf = tl.where(first, g, momentum * buf + (1.0 - dampening) * g)
            store_rounded(buf_ptr + offs, mask, buf, bits0, 16, False, STATE_DTYPE, SR)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        w = w - lr * g
        store_weights(ptrs_ptr, n_tensors, t, offs, mask, w, avg_coef, bits0, MASTER_ROW, AVG_ROW, PARAM_DTYPE,
                      STATE_DTYPE, AVG_DTYPE, MATH_DTYPE, MASTER, AVERAGE, SR)


def sgd_constexprs(param_dtype, state_dtype, *, momentum, nesterov, decoupled, average, lr_is_tensor, master,
                   stochastic_rounding) -> dict:
    """The kernel's compile-time arguments, for launch_sgd and aot_variants alike."""
    return {**precision_constexprs(param_dtype, state_dtype, master, stochastic_rounding),
            "MOMENTUM": bool(momentum), "NESTEROV": bool(nesterov) and bool(momentum), "DECOUPLED": bool(decoupled),
            "AVERAGE": bool(average), "LR_IS_TENSOR": bool(lr_is_tensor), "CHUNK": CHUNK, "BLOCK": BLOCK}


def launch_sgd(tables, hyper, *, param_dtype, state_dtype, grad_scale, found_inf, avg_coef, nesterov, decoupled,
               average, device, master, stochastic_rounding):
    """One launch over a packed table; `hyper` has the fields of fasttricks.ops.sgd.SgdHyper."""
    launch_step(sgd_kernel, tables, hyper,
                (float(hyper.weight_decay), float(hyper.momentum), float(hyper.dampening)),
                lambda lr_is_tensor: sgd_constexprs(param_dtype, state_dtype, momentum=hyper.momentum != 0,
                                                    nesterov=nesterov, decoupled=decoupled, average=average,
                                                    lr_is_tensor=lr_is_tensor, master=master,
                                                    stochastic_rounding=stochastic_rounding),
                device=device, grad_scale=grad_scale, found_inf=found_inf, avg_coef=avg_coef)


def aot_variants():
    """Every variant launch_sgd can select (nesterov only with momentum), for the compile tests."""
    return aot_variants_of("sgd", sgd_kernel, {"weight_decay": "fp32", "momentum": "fp32", "dampening": "fp32"},
                           ("momentum", "nesterov", "decoupled", "average", "lr_is_tensor"), sgd_constexprs,
                           allowed=lambda flags: flags["momentum"] or not flags["nesterov"])
