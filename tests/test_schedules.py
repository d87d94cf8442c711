"""Schedules (docs/tricks.md) step by step against torch's, Bag of Tricks'
formulas, state_dict round trips, tensor lr and bad arguments."""
import copy
import math

import pytest
import torch
from torch.optim import lr_scheduler as tl

import fasttricks
from fasttricks import schedules as fs


def optimizer(cls=torch.optim.SGD, lr=0.1, groups=2, **kw):
    params = [[torch.zeros(2, requires_grad=True)] for _ in range(groups)]
    return cls([{"params": p, "lr": lr * (i + 1)} for i, p in enumerate(params)], lr=lr, **kw)


def trace(make, steps, key="lr"):
    """lrs (and momenta / beta1) of every group before each step."""
    opt = optimizer(**make.get("opt", {}))
    sched = make["sched"](opt)
    out = []
    for _ in range(steps):
        out.append([(g["lr"], g.get("momentum", g.get("betas", (None,))[0])) for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def assert_same(ours, theirs, steps, opt_kw=None):
    opt_kw = opt_kw or {}
    a = trace({"sched": ours, "opt": opt_kw}, steps)
    b = trace({"sched": theirs, "opt": opt_kw}, steps)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


SGD_M = {"momentum": 0.9}
ADAM = {"cls": torch.optim.AdamW}


@pytest.mark.parametrize("ours, theirs, steps, opt_kw", [
    (lambda o: fs.SGDR(o, T_0=5), lambda o: tl.CosineAnnealingWarmRestarts(o, T_0=5), 23, None),
    (lambda o: fs.SGDR(o, T_0=3, T_mult=2, eta_min=1e-3),
     lambda o: tl.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2, eta_min=1e-3), 50, None),
    (lambda o: fs.CyclicLR(o, 0.01, 0.1, step_size_up=4),
     lambda o: tl.CyclicLR(o, 0.01, 0.1, step_size_up=4), 30, SGD_M),
    (lambda o: fs.CyclicLR(o, [0.01, 0.02], 0.1, step_size_up=3, step_size_down=5, mode="triangular2"),
     lambda o: tl.CyclicLR(o, [0.01, 0.02], 0.1, step_size_up=3, step_size_down=5, mode="triangular2"), 40, SGD_M),
    (lambda o: fs.CyclicLR(o, 0.001, 0.01, step_size_up=5, mode="exp_range", gamma=0.97, base_momentum=0.85,
                           max_momentum=0.95),
     lambda o: tl.CyclicLR(o, 0.001, 0.01, step_size_up=5, mode="exp_range", gamma=0.97, base_momentum=0.85,
                           max_momentum=0.95), 30, ADAM),
    (lambda o: fs.OneCycle(o, max_lr=0.5, total_steps=40),
     lambda o: tl.OneCycleLR(o, max_lr=0.5, total_steps=40), 40, SGD_M),
    (lambda o: fs.OneCycle(o, max_lr=[0.5, 0.2], epochs=3, steps_per_epoch=7, three_phase=True,
                           anneal_strategy="linear"),
     lambda o: tl.OneCycleLR(o, max_lr=[0.5, 0.2], epochs=3, steps_per_epoch=7, three_phase=True,
                             anneal_strategy="linear"), 21, ADAM),
    (lambda o: fs.PolyDecay(o, total_iters=10, power=2.0),
     lambda o: tl.PolynomialLR(o, total_iters=10, power=2.0), 15, None),
    (lambda o: fs.StepDecay(o, step_size=3, gamma=0.5), lambda o: tl.StepLR(o, step_size=3, gamma=0.5), 12, None),
    (lambda o: fs.StepDecay(o, milestones=[2, 5, 9]), lambda o: tl.MultiStepLR(o, milestones=[2, 5, 9]), 12, None),
    (lambda o: fs.CosineDecay(o, T_max=10, eta_min=0.01),
     lambda o: tl.CosineAnnealingLR(o, T_max=10, eta_min=0.01), 11, None),
    (lambda o: fs.Warmup(o, 4), lambda o: tl.LinearLR(o, start_factor=0.25, total_iters=3), 10, None),
    (lambda o: fs.warmup_cosine(o, 3, 12, min_lr=0.001),
     lambda o: tl.SequentialLR(o, [tl.LinearLR(o, start_factor=1 / 3, total_iters=2),
                                   tl.CosineAnnealingLR(o, T_max=9, eta_min=0.001)], milestones=[3]), 12, None),
])
def test_equals_torch_step_by_step(ours, theirs, steps, opt_kw):
    assert_same(ours, theirs, steps, opt_kw)


def test_seed_warmup_and_cosine_formulas():
    opt = optimizer(groups=1, lr=0.4)
    sched = fs.warmup_cosine(opt, warmup_steps=5, total_steps=25)
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for i in range(1, 6):  # batch i of the warmup: i * eta / m
        assert lrs[i - 1] == pytest.approx(i * 0.4 / 5)
    for t in range(20):  # then 0.5 * (1 + cos(t pi / T)) * eta
        assert lrs[5 + t] == pytest.approx(0.5 * (1 + math.cos(t * math.pi / 20)) * 0.4)
    assert fs.linear_scaling_lr(0.1, 1024) == pytest.approx(0.4)


@pytest.mark.parametrize("make", [
    lambda o: fs.warmup_cosine(o, 4, 30),
    lambda o: fs.SGDR(o, T_0=4, T_mult=2),
    lambda o: fs.OneCycle(o, max_lr=1.0, total_steps=30),
    lambda o: fs.CyclicLR(o, 0.01, 0.1, step_size_up=3),
])
def test_state_dict_round_trip_continues_identically(make):
    opt_a = optimizer(momentum=0.9)
    a = make(opt_a)
    for _ in range(11):
        opt_a.step()
        a.step()
    saved = copy.deepcopy((opt_a.state_dict(), a.state_dict()))
    torch.save(saved[1], __import__("io").BytesIO())  # picklable: no optimizer, no lambdas
    opt_b = optimizer(momentum=0.9)
    b = make(opt_b)
    opt_b.load_state_dict(saved[0])
    b.load_state_dict(saved[1])
    for _ in range(15):
        assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_b.param_groups]
        assert [g["momentum"] for g in opt_a.param_groups] == [g["momentum"] for g in opt_b.param_groups]
        for o, s in ((opt_a, a), (opt_b, b)):
            o.step()
            s.step()


def test_tensor_lr_is_filled_in_place():
    p = torch.zeros(3, requires_grad=True)
    opt = fasttricks.optim.AdamW([p], lr=torch.tensor(0.01), backend="reference")
    lr = opt.param_groups[0]["lr"]
    sched = fs.warmup_cosine(opt, 2, 10)
    for _ in range(4):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] is lr and torch.is_tensor(lr)
    assert lr.item() == pytest.approx(0.5 * (1 + math.cos(2 * math.pi / 8)) * 0.01)


@pytest.mark.parametrize("make, error, message", [
    (lambda o: fs.Warmup(o, 0), ValueError, "warmup_steps"),
    (lambda o: fs.warmup_cosine(o, 10, 10), ValueError, "shorter than total_steps"),
    (lambda o: fs.StepDecay(o, step_size=-1), ValueError, "step_size"),
    (lambda o: fs.StepDecay(o), ValueError, "exactly one"),
    (lambda o: fs.CosineDecay(o, T_max=0), ValueError, "T_max"),
    (lambda o: fs.SGDR(o, T_0=0), ValueError, "T_0"),
    (lambda o: fs.CyclicLR(o, 0.1, 0.01), ValueError, "base_lr <= max_lr"),
    (lambda o: fs.CyclicLR(o, 0.01, 0.1, mode="sine"), ValueError, "mode"),
    (lambda o: fs.OneCycle(o, max_lr=0.1), ValueError, "total_steps"),
    (lambda o: fs.OneCycle(o, max_lr=0.1, total_steps=10, pct_start=1.5), ValueError, "pct_start"),
    (lambda o: fs.OneCycle(o, max_lr=0.1, total_steps=10, base_momentum=0.99), ValueError, "base_momentum"),
    (lambda o: fs.Warmup(o, 2, after=tl.StepLR(o, 3)), TypeError, "SequentialLR"),
    (lambda o: fs.linear_scaling_lr(0.1, 0), ValueError, "batch_size"),
])
def test_bad_arguments_raise(make, error, message):
    with pytest.raises(error, match=message):
        make(optimizer(momentum=0.9))


def test_one_cycle_refuses_to_run_past_total_steps():
    opt = optimizer(momentum=0.9)
    sched = fs.OneCycle(opt, max_lr=0.1, total_steps=3)
    for _ in range(3):
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="Tried to step 4 times"):
        sched.step()
