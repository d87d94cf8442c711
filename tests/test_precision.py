"""The precision rule (docs/precision.md): from zero initialisation, each backend's fp32
update may be off torch's fp64 update by at most RULE x what torch's own fp32
update is off. A kernel that computes a hyper-parameter in fp32 from a rounded
input (1 - beta2 from fp32(0.999): 100x torch's error) fails it."""
import pytest
import torch

from helpers import BACKENDS
from fasttricks import optim as fo

RULE = 3.0
N = 1 << 14


def _update(make_opt, dtype, steps=3):
    g = torch.Generator().manual_seed(0)
    # From zero: the update is then the param itself, not lost in the rounding of |p| ~ 1.
    p0 = torch.zeros(N, dtype=torch.float64)
    grads = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(steps)]
    p = p0.to(dtype).clone().requires_grad_()
    opt = make_opt([p])
    for grad in grads:
        p.grad = grad.to(dtype)
        opt.step()
    return (p.detach().double() - p0.to(dtype).double())


def _median_rel_err(update, truth):
    return ((update - truth).abs() / truth.abs().clamp_min(1e-30)).median().item()


CASES = [
    ("Adam", dict(lr=1e-3)),
    ("Adam", dict(lr=1e-3, betas=(0.9, 0.999), amsgrad=True, weight_decay=0.01)),
    ("AdamW", dict(lr=1e-3, weight_decay=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,cfg", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_update_error_is_of_torch_fp32_order(backend, name, cfg):
    torch_cls = getattr(torch.optim, name)
    truth = _update(lambda ps: torch_cls(ps, foreach=False, **cfg), torch.float64)
    torch_err = _median_rel_err(_update(lambda ps: torch_cls(ps, foreach=False, **cfg), torch.float32), truth)
    ours_err = _median_rel_err(_update(lambda ps: getattr(fo, name)(ps, backend=backend, **cfg), torch.float32),
                               truth)
    assert torch_err > 0, "the fp32 run must differ from fp64, or the rule compares nothing"
    assert ours_err <= RULE * torch_err, (
        f"{backend} {name}: median relative error {ours_err:.3g} against fp64, torch fp32 {torch_err:.3g}")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend")
def test_the_triton_kernels_follow_the_precision_policy():
    """kernels/_common.py restates ops/precision.py's per-plan switches (the
    kernels are leaves): the two agree on every dtype combination."""
    from fasttricks.kernels import TL_DTYPES
    from fasttricks.kernels._common import precision_constexprs
    from fasttricks.ops.precision import LOW_PRECISION, plan_average_dtype, plan_rounds_stochastically

    params = [d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64) if d in TL_DTYPES]
    checked = 0
    for param in params:
        for state in {torch.float32, torch.bfloat16, param}:
            for master in (False, True):
                if master and (param not in LOW_PRECISION or state != torch.float32):
                    continue  # the plans refuse these
                for sr in (False, True):
                    switches = precision_constexprs(param, state, master, sr)
                    assert switches["SR"] == plan_rounds_stochastically(param, state, master, sr)
                    assert switches["AVG_DTYPE"] == TL_DTYPES[plan_average_dtype(param, state, master, sr)]
                    assert switches["MASTER"] == master
                    checked += 1
    assert checked >= 20
