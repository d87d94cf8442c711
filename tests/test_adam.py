"""Adam / AdamW: every backend against the fp64 truth (torch.optim in fp64),
the reference against torch.optim, master weights, averaging in the kernel."""
import pytest
import torch

from helpers import BACKENDS, rule_factor, train, assert_param_is_rounded_master, SHAPES, assert_close_rule, clone_params, make_grads, make_params, max_err, run
from fasttricks import optim as fo
from fasttricks.ops import adam_reference_, make_adam_plan
from fasttricks.ops.adam import AdamHyper

CONFIGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
    dict(lr=1e-2, weight_decay=0.1, maximize=True),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, decoupled_weight_decay=True),
]


def _dtypes(backend):
    return [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if backend != "triton" else [])


def _torch_cases():
    """(ours, torch's, config); AdamW takes no decoupled_weight_decay argument."""
    for cfg in CONFIGS:
        yield pytest.param(fo.Adam, torch.optim.Adam, cfg, id="Adam-" + _cfg_id(cfg))
        if "decoupled_weight_decay" not in cfg:
            yield pytest.param(fo.AdamW, torch.optim.AdamW, cfg, id="AdamW-" + _cfg_id(cfg))


def _cfg_id(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,tcls,cfg", list(_torch_cases()))
def test_matches_torch_fp32(backend, cls, tcls, cfg):
    steps = make_grads(SHAPES, 4)
    base = make_params(SHAPES, torch.float32)
    ours, _ = train(lambda ps: cls(ps, backend=backend, **cfg), base, steps)
    peer, _ = train(lambda ps: tcls(ps, foreach=False, **cfg), base, steps)
    truth, _ = train(lambda ps: tcls(ps, foreach=False, **cfg), base, steps, torch.float64)
    assert max_err(ours, base) > 1e-3  # it moved
    assert_close_rule(ours, peer, truth)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_and_fp64(backend):
    # eps=1e-8 underflows in fp16 and sends torch's own fp16 Adam (the peer) to NaN.
    cfg = dict(lr=1e-2, eps=1e-3, weight_decay=0.1, amsgrad=True)
    steps = make_grads(SHAPES, 3)
    for dtype in _dtypes(backend):
        base = make_params(SHAPES, dtype)
        ours, _ = train(lambda ps: fo.Adam(ps, backend=backend, **cfg), base, steps)
        peer, _ = train(lambda ps: torch.optim.Adam(ps, foreach=False, **cfg), base, steps)
        truth, _ = train(lambda ps: torch.optim.Adam(ps, foreach=False, **cfg), base, steps, torch.float64)
        assert max_err(ours, base) > 1e-3
        for p, b in zip(ours, base):
            assert p.dtype == b.dtype
        assert_close_rule(ours, peer, truth, floor=1e-12 if dtype == torch.float64 else 1e-7,
                          factor=rule_factor(backend, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights(backend, dtype):
    """bf16/fp16 params with an fp32 master: the master follows the fp32 math
    (as torch's upcast + fp32 step would) and the param is the master rounded."""
    cfg = dict(lr=1e-2, weight_decay=0.01)
    steps = make_grads(SHAPES, 4)
    base = make_params(SHAPES, dtype)
    params = clone_params(base)
    opt = fo.AdamW(params, backend=backend, master_weights=True, **cfg)
    run(opt, params, steps)
    # Peer: torch in fp32 fed the same (bf16-rounded) gradients.
    rounded = [[g.to(dtype) for g in gs] for gs in steps]
    peer, _ = train(lambda ps: torch.optim.AdamW(ps, foreach=False, **cfg), base, rounded, torch.float32)
    truth, _ = train(lambda ps: torch.optim.AdamW(ps, foreach=False, **cfg), base, rounded, torch.float64)
    masters = [opt.state[p]["master_param"] for p in params]
    assert all(m.dtype == torch.float32 for m in masters)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in params)
    assert_close_rule(masters, peer, truth)
    assert_param_is_rounded_master(backend, params, masters, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tensors_and_noncontiguous(backend):
    shapes = [(i % 5 + 1,) for i in range(161)] + [(6, 4)]
    steps = make_grads(shapes, 2)
    base = make_params(shapes, torch.float32)
    base[-1] = base[-1].detach().t().requires_grad_()  # a transposed (non-contiguous) param
    steps = [gs[:-1] + [gs[-1].t()] for gs in steps]
    ours_params = clone_params(base)
    ours_params[-1] = base[-1].detach().clone().t().contiguous().t().requires_grad_()
    assert not ours_params[-1].is_contiguous()
    ours = run(fo.Adam(ours_params, backend=backend, lr=0.1), ours_params, steps)
    peer, _ = train(lambda ps: torch.optim.Adam(ps, foreach=False, lr=0.1), base, steps)
    assert max_err(ours, base) > 1e-2
    assert max_err(ours, peer) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_skipped(backend):
    params = make_params([(4,), (3,)], torch.float32)
    opt = fo.Adam(params, backend=backend, lr=0.1)
    params[0].grad = torch.ones(4)
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), before)
    assert len(opt.state[params[1]]) == 0 and float(opt.state[params[0]]["step"]) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_plan_average_in_same_pass(backend, amsgrad):
    """The running average w_hat <- w_hat + c (w - w_hat) updated by the step kernel."""
    shapes = [(5,), (4099,)]
    params = make_params(shapes, torch.float32)
    ref_params = clone_params(params)
    states = [dict(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), vmax=torch.zeros_like(p),
                   step=torch.zeros(()), avg=p.detach().clone()) for p in (params + ref_params)]
    plan = make_adam_plan(backend, params, [s["step"] for s in states[:2]], [s["exp_avg"] for s in states[:2]],
                          [s["exp_avg_sq"] for s in states[:2]], [s["vmax"] for s in states[:2]], None,
                          amsgrad=amsgrad, decoupled=True)
    plan.set_averages([s["avg"] for s in states[:2]])
    for k, grads in enumerate(make_grads(shapes, 3)):
        coef = [0.5, 1.0, 0.25][k]
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.float(), g.float()
        assert plan.step(AdamHyper(1e-2, 0.9, 0.999, 1e-8, 0.01), None, None, coef) == 2
        rs = states[2:]
        adam_reference_([q for q in ref_params], [q.grad for q in ref_params], [s["exp_avg"] for s in rs],
                        [s["exp_avg_sq"] for s in rs], [s["vmax"] for s in rs], [s["step"] for s in rs],
                        averages=[s["avg"] for s in rs], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.01, amsgrad=amsgrad, decoupled=True, avg_coef=coef)
        if coef == 1.0:  # NOTE [weight averaging lerp]: c = 1 copies the weights exactly
            assert all(torch.equal(s["avg"], p.detach()) for s, p in zip(states[:2], params))
    assert max_err([s["avg"] for s in states[:2]], [s["avg"] for s in states[2:]]) < 1e-6
    assert max_err(params, ref_params) < 1e-6


def test_reference_matches_torch_exactly_enough():
    """The reference is the spec: within fp32 rounding of torch's for-loop Adam."""
    steps = make_grads(SHAPES, 5)
    base = make_params(SHAPES, torch.float32)
    for cfg in CONFIGS:
        ours, _ = train(lambda ps: fo.Adam(ps, backend="reference", **cfg), base, steps)
        peer, _ = train(lambda ps: torch.optim.Adam(ps, foreach=False, **cfg), base, steps)
        assert max_err(ours, base) > 1e-3
        assert max_err(ours, peer) < 1e-5
