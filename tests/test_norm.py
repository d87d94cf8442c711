"""The multi-tensor total norm behind opt.clip_grad_norm_ (fasttricks/ops/norm.py):
every backend against torch.nn.utils.get_total_norm computed in fp64, NaN and
inf as torch has them, and the same bits run to run."""
import math

import pytest
import torch

from fasttricks import _backends
from fasttricks.ops.norm import NormPlans, reference_total_norm
from helpers import BACKENDS

# (): one element; (0,): none; (4099,): past a 4096 chunk; (70001,): past a
# CPU block of 65536 elements; (3, 5) and (33,): partial vector units.
SHAPES = [(), (0,), (3, 5), (33,), (4099,), (70001,)]
SMALL = [(), (0,), (3, 5), (33,), (4099,)]  # under the Triton interpreter
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _params(shapes, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(dtype)
    return params


def _norm(backend, params, norm_type):
    return NormPlans().total_norm(params, [p.grad for p in params], norm_type, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_equal_to_torch_in_fp64(backend, dtype, norm_type):
    params = _params(SMALL if backend == "triton" else SHAPES, dtype, scale=3.0)
    grads = [p.grad for p in params]
    ours = _norm(backend, params, norm_type)
    # torch refuses the inf-norm of an empty tensor (no identity); ours reads it as 0
    truth = torch.nn.utils.get_total_norm([g.double() for g in grads if g.numel()], norm_type)
    assert ours.shape == () and ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # fp32 accumulation: within a few fp32 roundings of the truth (fp64 grads: of fp64's)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(ours.double(), truth, rtol=rtol, atol=0)
    torch.testing.assert_close(ours, reference_total_norm(grads, norm_type), rtol=rtol, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_nan_and_inf_as_torch_has_them(backend, bad, norm_type):
    params = _params([(5,), (4099,), (3,)], torch.float32)
    params[1].grad[4097] = bad
    expected = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
    ours = _norm(backend, params, norm_type)
    assert math.isnan(ours) == math.isnan(expected) and math.isinf(ours) == math.isinf(expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_params_without_grads(backend):
    params = _params([(7,), (40,)], torch.float32) + _params([(9,), (3,)], torch.bfloat16, seed=1)
    params[2].grad = None
    with_grad = [p for p in params if p.grad is not None]
    ours = _norm(backend, with_grad, 2.0)
    truth = torch.nn.utils.get_total_norm([p.grad.double() for p in with_grad], 2.0)
    torch.testing.assert_close(ours.double(), truth, rtol=2e-6, atol=0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU extension not built")
def test_cpu_norm_is_the_same_every_run_on_every_thread_count():
    params = _params([(300_000,), (5,), (70_001,)], torch.float32)
    grads = [p.grad for p in params]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            results.append(_backends.cpu_ext().total_norm(grads, 2.0))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend")
def test_device_plans_follow_new_grads_and_params():
    """The triton norm packs its table once and compares pointers every call:
    new grad tensors and a new param list are both seen."""
    plans = NormPlans()
    params = _params([(5,), (300,)], torch.float32)
    first = plans.total_norm(params, [p.grad for p in params], 2.0, "triton")
    for p in params:
        p.grad = p.grad * 2
    second = plans.total_norm(params, [p.grad for p in params], 2.0, "triton")
    torch.testing.assert_close(second, first * 2, rtol=1e-6, atol=0)
    more = params + _params([(7,)], torch.float32, seed=3)
    third = plans.total_norm(more, [p.grad for p in more], 2.0, "triton")
    truth = torch.nn.utils.get_total_norm([p.grad.double() for p in more], 2.0)
    torch.testing.assert_close(third.double(), truth, rtol=2e-6, atol=0)


def test_other_norm_types_and_foreign_grads_take_torchs_norm():
    import fasttricks.optim as fo
    params = _params([(5,), (6,)], torch.float32)
    opt = fo.SGD(params, lr=0.1, backend="reference" if "cpu" not in BACKENDS else "cpu")
    for norm_type in (1.0, 3.0):
        expected = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        torch.testing.assert_close(opt.clip_grad_norm_(1.0, norm_type), expected)
    bf16 = _params([(5,)], torch.bfloat16)
    opt = fo.AdamW(bf16, lr=0.1)
    norm = opt.clip_grad_norm_(1.0)
    assert norm.dtype == torch.bfloat16  # torch's dtype, the grads'
    torch.testing.assert_close(norm, torch.nn.utils.get_total_norm([bf16[0].grad], 2.0))
