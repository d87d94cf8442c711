"""What the device plans (fasttricks/ops) and the kernels (fasttricks/kernels/, the CUDA
extension) agree on. NOTE [pointer table] (csrc/include/fasttricks/table.h):
the row layout of the pointer tables, for Python and Triton; the C++/CUDA
copy is that header, and tests/test_plan_cache.py holds them equal. A leaf
module: the Triton kernels import it, and it imports nothing of fasttricks."""
import torch

CHUNK = 4096  # elements per Triton program / CUDA block

# Rows in order. "step" holds pointers to float32 step counters; "first" is a
# flag row (1 where SGD's momentum buffer has not had its first step); "key"
# a flag row of the params' stochastic-rounding keys (their index among the
# optimizer's params; NOTE [stochastic rounding] in docs/precision.md).
ADAM_ROWS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master", "avg", "step", "key")
SGD_ROWS = ("param", "grad", "momentum_buffer", "master", "avg", "first", "key")

ADAM_ROW = {name: i for i, name in enumerate(ADAM_ROWS)}
SGD_ROW = {name: i for i, name in enumerate(SGD_ROWS)}


def scalar_arg(value, device):
    """(float value, tensor or None) of a hyper-parameter that may be a tensor
    (tensor lr): a tensor stays on `device` and is read by the kernel, so the
    step never synchronises and works under CUDA graphs."""
    if torch.is_tensor(value):
        # Non-blocking, as torch's fused optimizers copy a CPU lr: no host sync per step.
        return 0.0, value.to(device=device, dtype=torch.float32, non_blocking=True)
    return float(value), None


def grad_multiplier(hyper) -> float:
    """The gradient factor of a hyper-parameter record: its grad_mul, negated under maximize."""
    return float(hyper.grad_mul) * (-1.0 if hyper.maximize else 1.0)
