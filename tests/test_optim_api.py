"""The drop-in contract: torch's exceptions, hooks, state_dict both ways,
GradScaler's grad_scale/found_inf, backends and their errors."""
import copy

import pytest
import torch

import fasttricks
from helpers import BACKENDS, SHAPES, clone_params, make_grads, make_params, max_err, run, train
from fasttricks import optim as fo
from fasttricks.ops.host_flag import DeferredFlag

PAIRS = [(fo.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
         (fo.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
         (fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True))]
IDS = ["Adam", "AdamW", "SGD"]


def snapshot(params, opt):
    state = {(i, k): v.clone() for i, p in enumerate(params) for k, v in opt.state[p].items() if torch.is_tensor(v)}
    return [p.detach().clone() for p in params], state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,tcls,cfg", PAIRS, ids=IDS)
def test_found_inf_changes_nothing_and_grad_scale_unscales(backend, cls, tcls, cfg):
    steps = make_grads(SHAPES, 3)
    base = make_params(SHAPES, torch.float32)
    params, opt = train(lambda ps: cls(ps, backend=backend, **cfg), base, steps[:2])
    before_p, before_s = snapshot(params, opt)
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    for p, g in zip(params, steps[2]):
        p.grad = g.float() * 1024
    opt.step()
    after_p, after_s = snapshot(params, opt)
    assert all(torch.equal(a, b) for a, b in zip(before_p, after_p))
    assert before_s.keys() == after_s.keys() and all(torch.equal(before_s[k], after_s[k]) for k in before_s)
    opt.found_inf = torch.tensor(0.0)
    opt.step()  # the same scaled grads, now unscaled by the kernel
    del opt.grad_scale, opt.found_inf
    expected, _ = train(lambda ps: cls(ps, backend=backend, **cfg), base, steps)
    assert max_err(params, expected) < 1e-6


@pytest.mark.parametrize("fused", [None, True], ids=["scaler unscales", "fused unscale"])
@pytest.mark.parametrize("cls,tcls,cfg", PAIRS, ids=IDS)
def test_gradscaler_end_to_end(cls, tcls, cfg, fused):
    """NOTE [found_inf contract]: by default the scaler unscales and skips (as
    for torch's non-fused optimizers); fused=True is torch's opt-in to the
    fused unscale. An overflowing step changes nothing either way."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    ref = torch.nn.Linear(8, 3)
    ref.load_state_dict(model.state_dict())
    opt, ref_opt = cls(model.parameters(), fused=fused, **cfg), tcls(ref.parameters(), **cfg)
    assert opt._step_supports_amp_scaling is bool(fused)
    assert copy.deepcopy(opt)._step_supports_amp_scaling is bool(fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    for i in range(4):
        x = torch.randn(16, 8)
        opt.zero_grad()
        loss = model(x).square().mean() * (float("inf") if i == 1 else 1.0)
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if i == 1:  # the overflow: nothing moved; without the fused unscale, step() was not even called
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            assert len(calls) == (2 if fused else 1)
            continue
        ref_opt.zero_grad()
        ref(x).square().mean().backward()
        ref_opt.step()
    assert max_err(list(model.parameters()), list(ref.parameters())) < 1e-5


@pytest.mark.parametrize("cls,tcls,cfg", PAIRS, ids=IDS)
def test_state_dict_both_ways_with_torch(cls, tcls, cfg):
    steps = make_grads(SHAPES, 6)
    base = make_params(SHAPES, torch.float32)
    # torch -> fasttricks, mid-training
    tparams, topt = train(lambda ps: tcls(ps, **cfg), base, steps[:3])
    params = clone_params(tparams)
    opt = cls(params, **cfg)
    # deepcopy = a save and load: torch's load_state_dict keeps the given tensors when no cast is needed
    opt.load_state_dict(copy.deepcopy(topt.state_dict()))
    run(opt, params, steps[3:])
    run(topt, tparams, steps[3:])
    assert max_err(params, tparams) < 1e-5
    # fasttricks -> torch: same layout, keys and values
    sd = copy.deepcopy(opt.state_dict())
    params2 = clone_params(params)
    topt2 = tcls(params2, **cfg)
    topt2.load_state_dict(sd)
    assert set(topt2.state_dict()["state"][0]) == set(topt.state_dict()["state"][0])
    more = make_grads(SHAPES, 2, seed=7)
    run(topt2, params2, more)
    run(opt, params, more)
    assert max_err(params, params2) < 1e-5


def test_torch_bf16_checkpoint_into_master_weights():
    base = make_params(SHAPES, torch.bfloat16)
    steps = make_grads(SHAPES, 2)
    tparams, topt = train(lambda ps: torch.optim.AdamW(ps, lr=1e-2), base, steps)
    params = clone_params(tparams)
    opt = fo.AdamW(params, lr=1e-2, master_weights=True)
    opt.load_state_dict(copy.deepcopy(topt.state_dict()))
    run(opt, params, make_grads(SHAPES, 1, seed=3))
    st = opt.state[params[2]]
    assert st["exp_avg"].dtype == torch.float32 and st["master_param"].dtype == torch.float32
    assert float(st["step"]) == 3.0
    # and ours (fp32 state) back into ours keeps full precision
    opt2 = fo.AdamW(clone_params(params), lr=1e-2, master_weights=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(opt2.state[opt2.param_groups[0]["params"][2]]["master_param"], st["master_param"])
    assert opt2.group_options(opt2.param_groups[0])["master_weights"] is True
    assert "master_weights" not in opt2.param_groups[0]


@pytest.mark.parametrize("make,message,exc", [
    (lambda p: fo.Adam(p, lr=-1.0), "Invalid learning rate", ValueError),
    (lambda p: fo.AdamW(p, betas=(1.0, 0.9)), "Invalid beta parameter at index 0", ValueError),
    (lambda p: fo.Adam(p, eps=-1.0), "Invalid epsilon value", ValueError),
    (lambda p: fo.SGD(p, lr=0.1, momentum=-0.5), "Invalid momentum value", ValueError),
    (lambda p: fo.SGD(p, lr=0.1, nesterov=True), "Nesterov momentum requires a momentum", ValueError),
    (lambda p: fo.SGDW(p, lr=0.1, weight_decay=-1), "Invalid weight_decay value", ValueError),
    (lambda p: fo.Adam(p, backend="gpu"), "Invalid backend", ValueError),
    (lambda p: fo.Adam(p, backend="cuda"), "backend 'cuda' is unavailable", RuntimeError),
    (lambda p: fo.Adam(p, fused=True, foreach=True), "`fused` and `foreach` cannot be `True` together", RuntimeError),
])
def test_bad_hyperparameters_raise_torch_types(make, message, exc):
    with pytest.raises(exc, match=message):
        make([torch.zeros(3, requires_grad=True)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [fo.Adam, fo.AdamW], ids=["Adam", "AdamW"])  # SGD takes them, as torch's
def test_sparse_gradient_is_a_clear_error_and_changes_nothing(backend, cls):
    params = make_params([(4,), (5, 3)], torch.float32)
    opt = cls(params, backend=backend)
    params[0].grad = torch.ones(4)
    params[1].grad = torch.ones(5, 3).to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, params))
    assert all(float(s["step"]) == 0 for s in opt.state.values() if "step" in s)


def test_hooks_fire_like_torch():
    p = torch.zeros(3, requires_grad=True)
    opt = fo.AdamW([p])
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda o, a, k: calls.append("global"))
    try:
        p.grad = torch.ones(3)
        opt.step()
    finally:
        handle.remove()
    assert calls == ["pre", "post", "global"]
    assert isinstance(opt, torch.optim.AdamW) and isinstance(fo.SGDW([p]), torch.optim.SGD)


def test_scheduler_tensor_lr_and_mixed_dtype_groups():
    a = torch.zeros(4, requires_grad=True)
    b = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    opt = fo.Adam([{"params": [a, b]}], lr=torch.tensor(0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        a.grad, b.grad = torch.ones(4), torch.ones(4, dtype=torch.bfloat16)
        opt.step()
        sched.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.025)
    # Adam's first steps move by ~lr each: 0.1 + 0.05
    assert torch.allclose(a.detach(), torch.full((4,), -0.15), atol=1e-4)
    assert torch.allclose(b.detach().float(), torch.full((4,), -0.15), atol=2e-3)


def test_differentiable_falls_back_to_torch():
    """differentiable=True runs torch's autograd-tracked step: the update is
    part of the graph (as with torch.optim, the param is a non-leaf)."""
    w0 = torch.ones(3, requires_grad=True)
    w = w0.clone()
    opt = fo.SGD([w], lr=0.5, differentiable=True)
    w.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((3,), 0.5))
    w.sum().backward()
    assert torch.equal(w0.grad, torch.ones(3))


def test_differentiable_switched_on_later_runs_torchs_step(monkeypatch):
    """A group switched to differentiable=True after the plans were built
    steps through torch's own step from then on (the switch is one of the
    plan flags), and through the fused plans again once switched off; the
    values follow torch.optim.SGD throughout."""
    from fasttricks.optim import _compat
    calls = []
    torch_step = _compat.torch_step
    monkeypatch.setattr(_compat, "torch_step", lambda opt, closure: calls.append(1) or torch_step(opt, closure))
    w, ref = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt, peer = fo.SGD([w], lr=0.5, momentum=0.9), torch.optim.SGD([ref], lr=0.5, momentum=0.9)
    for differentiable, torch_steps in ((False, 0), (True, 1), (False, 1)):
        opt.param_groups[0]["differentiable"] = differentiable
        w.grad, ref.grad = torch.ones(3), torch.ones(3)
        with torch.no_grad():  # torch's differentiable step writes the leaf in place
            opt.step()
        peer.step()
        assert len(calls) == torch_steps
        torch.testing.assert_close(w.detach(), ref.detach())


def test_backends_report():
    report = fasttricks.backends()
    assert set(report) == {"reference", "cpu", "triton", "cuda"}
    assert report["reference"]["available"] is True
    for name, info in report.items():
        assert isinstance(info["detail"], str) and (info["available"] or info["detail"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,tcls,cfg", PAIRS, ids=IDS)
def test_layouts_that_change_under_the_optimizer(backend, cls, tcls, cfg):
    """A grad laid out unlike its param, and a param re-laid out (channels-last)
    after its state was built, still give torch's step; a param reshaped under
    the optimizer is a clear error that changes nothing (NOTE [plan cache])."""
    shapes = [(4, 3, 2, 5), (7,)]
    base = make_params(shapes, torch.float32)
    ours_p, peer_p = clone_params(base), clone_params(base)
    ours, peer = cls(ours_p, backend=backend, **cfg), tcls(peer_p, foreach=False, **cfg)
    for k, grads in enumerate(make_grads(shapes, 4)):
        for ps in (ours_p, peer_p):
            if k == 2:
                ps[0].data = ps[0].data.contiguous(memory_format=torch.channels_last)
            g0 = grads[0].float()
            ps[0].grad = g0.contiguous(memory_format=torch.channels_last) if k % 2 else g0
            ps[1].grad = grads[1].float()
        ours.step()
        peer.step()
    assert ours_p[0].is_contiguous(memory_format=torch.channels_last)
    assert max_err(ours_p, base) > 1e-3
    assert max_err(ours_p, peer_p) < 1e-5

    ours_p[0].data = ours_p[0].data.reshape(12, 10)
    ours_p[0].grad = torch.ones(12, 10)
    ours_p[1].grad = torch.ones(7)
    before_p, before_s = snapshot(ours_p, ours)
    with pytest.raises(RuntimeError, match="shape"):
        ours.step()
    after_p, after_s = snapshot(ours_p, ours)
    assert all(torch.equal(a, b) for a, b in zip(before_p, after_p))
    assert all(torch.equal(before_s[k], after_s[k]) for k in before_s)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("cls,tcls,cfg", PAIRS, ids=IDS)
def test_cpu_work_split_across_many_tensors(cls, tcls, cfg):
    """The cpu backend splits a step by element count across threads, in blocks
    that start and end inside tensors: sizes that are not multiples of the
    vector unit, empty and 0-dim tensors among them."""
    shapes = [(i * 97 + 13,) for i in range(120)] + [(), (0,), (3, 70001)]
    steps = make_grads(shapes, 2)
    base = make_params(shapes, torch.float32)
    ours, _ = train(lambda ps: cls(ps, backend="cpu", **cfg), base, steps)
    peer, _ = train(lambda ps: tcls(ps, foreach=False, **cfg), base, steps)
    assert max_err(ours, base) > 1e-3
    assert max_err(ours, peer) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,tcls,cfg", PAIRS, ids=IDS)
def test_bad_grad_in_a_later_group_changes_nothing(backend, cls, tcls, cfg):
    """Every plan is checked before any steps: a bad grad in the second param
    group leaves the first group's params, the state and a fused EMA as they were."""
    from fasttricks.sampling import EMA

    params = make_params([(5,), (4, 3), (6,)], torch.float32)
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 1e-3}], backend=backend, **cfg)
    ema = EMA(opt, decay=0.5)
    run(opt, params, make_grads([(5,), (4, 3), (6,)], 2))
    before_p, before_s = snapshot(params, opt)
    before_avg = [a.clone() for a in ema.averages]
    counts = (ema.total_steps, ema.samples)
    params[0].grad, params[1].grad = torch.ones(5), torch.ones(4, 3)
    if cls is fo.SGD:  # SGD takes sparse grads: the bad one here is a param whose dtype changed under its state
        params[2].data = params[2].data.double()
        params[2].grad = torch.ones(6, dtype=torch.float64)
    else:
        params[2].grad = torch.ones(6).to_sparse()
    with pytest.raises((RuntimeError, TypeError), match="sparse|dtype changed"):
        opt.step()
    after_p, after_s = snapshot(params, opt)
    assert all(torch.equal(a, b) for a, b in zip(before_p, after_p))
    assert all(torch.equal(before_s[k], after_s[k]) for k in before_s)
    assert all(torch.equal(a, b) for a, b in zip(before_avg, ema.averages))
    assert (ema.total_steps, ema.samples) == counts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deferred", [False, True], ids=["host", "deferred"])
def test_sgd_checkpoint_after_a_skipped_first_step(backend, deferred, monkeypatch):
    """A found_inf skip of the first step leaves the momentum buffers unborn:
    the checkpoint omits them as torch would, and both ours and torch resume
    with torch's first momentum step (buf = g), which dampening makes visible.
    `deferred` plays a GPU, where found_inf is read after the step (NOTE
    [deferred found_inf])."""
    if deferred:
        monkeypatch.setattr(DeferredFlag, "ready", lambda self: False)
    cfg = dict(lr=0.1, momentum=0.9, dampening=0.5)
    shapes = [(5,), (4, 3)]
    base = make_params(shapes, torch.float32)
    params = clone_params(base)
    opt = fo.SGD(params, backend=backend, **cfg)
    opt.found_inf = torch.tensor(1.0)
    run(opt, params, make_grads(shapes, 1, seed=5))
    del opt.found_inf
    sd = copy.deepcopy(opt.state_dict())
    assert all("momentum_buffer" not in s for s in sd["state"].values())
    steps = make_grads(shapes, 3)
    peer, _ = train(lambda ps: torch.optim.SGD(ps, foreach=False, **cfg), base, steps)
    for make in (lambda ps: fo.SGD(ps, backend=backend, **cfg), lambda ps: torch.optim.SGD(ps, **cfg)):
        resumed = clone_params(base)
        ropt = make(resumed)
        ropt.load_state_dict(copy.deepcopy(sd))
        run(ropt, resumed, steps)
        assert max_err(resumed, peer) < 1e-6
    run(opt, params, steps)  # the original keeps going the same way
    assert max_err(params, peer) < 1e-6


@pytest.mark.skipif("triton" not in BACKENDS or "cpu" not in BACKENDS,
                    reason="needs the Triton backend and the C++ extension")
@pytest.mark.parametrize("cls,tcls,cfg", PAIRS, ids=IDS)
def test_device_tables_native_and_python_agree(cls, tcls, cfg, monkeypatch):
    """The device plans pack their pointer tables in C++ (fasttricks._C.DeviceTable)
    or, without the extension, in Python: bit-identical steps either way, through
    a fused EMA, a found_inf skip, params without grads and a grad laid out unlike
    its param."""
    from fasttricks.ops import _device
    from fasttricks.sampling import EMA

    shapes = [(4, 3, 2, 5), (7,), (), (4099,)]
    base = make_params(shapes, torch.float32)
    results = []
    for native in (True, False):
        monkeypatch.setattr(_device, "NATIVE", native)
        params = clone_params(base)
        opt = cls(params, backend="triton", **cfg)
        ema = EMA(opt, decay=0.5)
        for k, grads in enumerate(make_grads(shapes, 4)):
            for i, (p, g) in enumerate(zip(params, grads)):
                p.grad = None if (k == 1 and i == 1) else g.float()
            if k == 2:
                params[0].grad = params[0].grad.contiguous(memory_format=torch.channels_last)
            opt.found_inf = torch.tensor(float(k == 3))
            opt.step()
        plans = [plan for group in opt._ft_engine.cache.groups.values() for plan in group.buckets]
        assert plans and all((plan._native is not None) == native for plan in plans)
        results.append(([p.detach().clone() for p in params], [a.clone() for a in ema.averages],
                        snapshot(params, opt)[1]))
    (p1, a1, s1), (p2, a2, s2) = results
    assert max_err(p1, base) > 1e-3
    assert all(torch.equal(x, y) for x, y in zip(p1 + a1, p2 + a2))
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
