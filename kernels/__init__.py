"""Triton kernels (installed as fasttricks.kernels). Importing this imports
triton; nothing is compiled or launched until a kernel is first used."""
import torch
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64,
             torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.uint8: tl.uint8}
# Names of the same types in triton.compile signatures (ahead-of-time checks).
SIG_DTYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
              torch.uint8: "u8"}
# (param dtype, state dtype) pairs the optimizer kernels serve; state != param
# means fp32 master weights.
STATE_PAIRS = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
               (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64))
