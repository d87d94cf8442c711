"""Triton kernels (installed as fasttricks.kernels). Importing this imports
triton; nothing is compiled or launched until a kernel is first used."""
import contextlib

import torch
import triton.language as tl


def device_guard(t: torch.Tensor):
    """Launch on `t`'s GPU, whichever is current (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64,
             torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.uint8: tl.uint8}
# Names of the same types in triton.compile signatures (ahead-of-time checks).
SIG_DTYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
              torch.uint8: "u8"}
# The precisions the optimizer kernels serve (docs/precision.md), as (param
# dtype, state dtype, master weights, stochastic rounding).
_F32, _F64, _BF16, _F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
PRECISIONS = ((_F32, _F32, False, False), (_BF16, _BF16, False, False), (_F16, _F16, False, False),
              (_BF16, _F32, True, False), (_F16, _F32, True, False), (_F64, _F64, False, False),
              # fp32 state without a master copy, bf16 state for fp32/fp16 params
              (_BF16, _F32, False, False), (_F16, _F32, False, False), (_F32, _BF16, False, False),
              (_F16, _BF16, False, False),
              # stochastic rounding wherever a 16-bit tensor is written
              (_BF16, _BF16, False, True), (_F16, _F16, False, True), (_BF16, _F32, False, True),
              (_F16, _F32, False, True), (_F32, _BF16, False, True), (_F16, _BF16, False, True))


def precision_name(p, s, master, sr) -> str:
    return f"{SIG_DTYPES[p]}/{SIG_DTYPES[s]}{'+master' if master else ''}{'+sr' if sr else ''}"
