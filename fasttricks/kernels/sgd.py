"""Fused multi-tensor SGD/SGDW step in Triton (NOTE [SGD math] in
csrc/include/fasttricks/sgd_math.h; the reference is fasttricks/ops/sgd.py).
A leaf, as fasttricks/kernels/adam.py: the device plan packs the table and calls launch_sgd."""
import itertools

import triton
import triton.language as tl

from fasttricks._table import CHUNK, SGD_ROW, grad_multiplier, scalar_arg
from fasttricks.kernels import PRECISIONS, precision_name
from fasttricks.kernels._common import (BLOCK, COMPILE_OPTIONS, chunk_prologue, constant, draw_bits,
                                        load_weight_and_grad, precision_constexprs, round_key_arg,
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
    ptrs, numels, chunk_tensor, chunk_start, n, n_chunks = tables
    lr_value, lr_tensor = scalar_arg(hyper.lr, device)
    device_scalar = lambda t, absent: t if t is not None else constant(device, absent)  # noqa: E731
    sgd_kernel[(n_chunks,)](
        ptrs, numels, chunk_tensor, chunk_start, n,
        lr_value, device_scalar(lr_tensor, 0.0), float(hyper.weight_decay),
        float(hyper.momentum), float(hyper.dampening), grad_multiplier(hyper),
        device_scalar(grad_scale, 1.0), device_scalar(found_inf, 0.0), float(avg_coef),
        round_key_arg(hyper),
        **sgd_constexprs(param_dtype, state_dtype, momentum=hyper.momentum != 0, nesterov=nesterov,
                         decoupled=decoupled, average=average, lr_is_tensor=lr_tensor is not None, master=master,
                         stochastic_rounding=stochastic_rounding), **COMPILE_OPTIONS)


SIGNATURE = {"ptrs_ptr": "*i64", "numels_ptr": "*i64", "chunk_tensor_ptr": "*i64", "chunk_start_ptr": "*i64",
             "n_tensors": "i32", "lr": "fp32", "lr_ptr": "*fp32", "weight_decay": "fp32", "momentum": "fp32",
             "dampening": "fp32", "grad_mul": "fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
             "avg_coef": "fp32", "round_key": "i32"}
SWITCHES = ("momentum", "nesterov", "decoupled", "average", "lr_is_tensor")


def aot_variants():
    """Every variant launch_sgd can select (nesterov only with momentum), for the compile tests."""
    for (p, s, master, sr), switches in itertools.product(PRECISIONS,
                                                          itertools.product((False, True), repeat=len(SWITCHES))):
        flags = dict(zip(SWITCHES, switches))
        if flags["nesterov"] and not flags["momentum"]:
            continue
        const = sgd_constexprs(p, s, **flags, master=master, stochastic_rounding=sr)
        yield (f"sgd[{precision_name(p, s, master, sr)},{''.join(str(int(b)) for b in switches)}]", sgd_kernel,
               {**SIGNATURE, **{k: "constexpr" for k in const}}, const, COMPILE_OPTIONS)
