"""SGD / SGDW: every backend against the fp64 truth; SGDW against an
independent formula; momentum first-step semantics."""
import pytest
import torch

from helpers import BACKENDS, SHAPES, assert_close_rule, assert_param_is_rounded_master, make_grads, \
    make_params, max_err, rule_factor, train
from fasttricks import optim as fo

CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1),
    dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
]


# fp64 is served on the CPU backends only.
BACKEND_DTYPES = [(b, d) for b in BACKENDS for d in (torch.float32, torch.bfloat16, torch.float64)
                  if not (b == "triton" and d == torch.float64)]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_torch(backend, cfg, dtype):
    steps = make_grads(SHAPES, 4)
    base = make_params(SHAPES, dtype)
    ours, _ = train(lambda ps: fo.SGD(ps, backend=backend, **cfg), base, steps)
    peer, _ = train(lambda ps: torch.optim.SGD(ps, foreach=False, **cfg), base, steps)
    truth, _ = train(lambda ps: torch.optim.SGD(ps, foreach=False, **cfg), base, steps, torch.float64)
    assert max_err(ours, base) > 1e-2
    assert_close_rule(ours, peer, truth, floor=1e-12 if dtype == torch.float64 else 1e-7,
                      factor=rule_factor(backend, dtype))


def sgdw_formula(params, grads_seq, lr, momentum, wd):
    """SGDW written out independently: decay the weights, then heavy-ball SGD."""
    ws = [p.detach().double().clone() for p in params]
    bufs = [None] * len(ws)
    for grads in grads_seq:
        for i, g in enumerate(grads):
            ws[i] = ws[i] * (1 - lr * wd)
            bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
            ws[i] = ws[i] - lr * bufs[i]
    return ws


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgdw_formula(backend):
    steps = make_grads(SHAPES, 4)
    base = make_params(SHAPES, torch.float32)
    ours, opt = train(lambda ps: fo.SGDW(ps, backend=backend, lr=0.1, momentum=0.9, weight_decay=0.5), base, steps)
    assert opt.group_options(opt.param_groups[0])["decoupled_weight_decay"] is True
    assert max_err(ours, sgdw_formula(base, steps, 0.1, 0.9, 0.5)) < 1e-5
    coupled, _ = train(lambda ps: fo.SGD(ps, backend=backend, lr=0.1, momentum=0.9, weight_decay=0.5), base, steps)
    assert max_err(ours, coupled) > 1e-3  # decoupled decay really differs from L2


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_copies_grad_without_dampening(backend):
    p = torch.zeros(5, requires_grad=True)
    opt = fo.SGD([p], backend=backend, lr=1.0, momentum=0.9, dampening=0.5)
    p.grad = torch.ones(5)
    opt.step()
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.ones(5))
    opt.step()  # buf = 0.9 * 1 + 0.5 * 1
    assert torch.allclose(opt.state[p]["momentum_buffer"], torch.full((5,), 1.4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights(backend):
    steps = make_grads(SHAPES, 3)
    base = make_params(SHAPES, torch.bfloat16)
    cfg = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    params, opt = train(lambda ps: fo.SGD(ps, backend=backend, master_weights=True, **cfg), base, steps)
    rounded = [[g.to(torch.bfloat16) for g in gs] for gs in steps]
    peer, _ = train(lambda ps: torch.optim.SGD(ps, foreach=False, **cfg), base, rounded, torch.float32)
    truth, _ = train(lambda ps: torch.optim.SGD(ps, foreach=False, **cfg), base, rounded, torch.float64)
    masters = [opt.state[p]["master_param"] for p in params]
    assert_close_rule(masters, peer, truth)
    assert all(opt.state[p]["momentum_buffer"].dtype == torch.float32 for p in params)
    assert_param_is_rounded_master(backend, params, masters, torch.bfloat16)
