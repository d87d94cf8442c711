"""Drop-in details torch's own optimizer tests rely on: checkpoints that are
torch's in structure, meta params, and a failed step that writes nothing."""
import copy

import pytest
import torch

import fasttricks.optim as fo
from helpers import BACKENDS, max_err

PAIRS = [(fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
         (fo.SGDW, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
         (fo.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
         (fo.AdamW, torch.optim.AdamW, dict(lr=1e-2))]
IDS = ["SGD", "SGDW", "Adam", "AdamW"]


def stepped(make, seed=0, steps=2):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).requires_grad_() for s in [(4, 3), (5,)]]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


@pytest.mark.parametrize("cls,tcls,cfg", PAIRS, ids=IDS)
def test_checkpoints_have_torch_group_keys_both_ways(cls, tcls, cfg):
    _, ours = stepped(lambda ps: cls(ps, backend="reference", master_weights=False, **cfg))
    _, theirs = stepped(lambda ps: tcls(ps, **cfg))
    sd, tsd = ours.state_dict(), theirs.state_dict()
    assert [sorted(g) for g in sd["param_groups"]] == [sorted(g) for g in tsd["param_groups"]]
    theirs.load_state_dict(copy.deepcopy(sd))  # torch loads ours as one of its own
    assert [sorted(g) for g in theirs.param_groups] == [sorted(g) for g in tcls([torch.zeros(1)]).param_groups]
    ours.load_state_dict(copy.deepcopy(tsd))  # and ours keeps its own settings
    assert all(ours.group_options(g)["backend"] == "reference" and ours.group_options(g)["master_weights"] is False
               for g in ours.param_groups)
    assert [sorted(g) for g in ours.param_groups] == [sorted(g) for g in theirs.param_groups]  # torch's keys only


def test_sgdw_keeps_decoupled_decay_when_loading_a_torch_sgd_checkpoint():
    cfg = dict(lr=0.1, momentum=0.9, weight_decay=0.1)
    _, theirs = stepped(lambda ps: torch.optim.SGD(ps, **cfg))
    params, ours = stepped(lambda ps: fo.SGDW(ps, **cfg))
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert all(ours.group_options(g)["decoupled_weight_decay"] for g in ours.param_groups)
    before = [p.detach().clone() for p in params]
    bufs = [ours.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    ours.step()
    # SGDW: w * (1 - lr wd), then the momentum step on the raw gradient
    expected = [w * (1 - 0.1 * 0.1) - 0.1 * (0.9 * b + 1.0) for w, b in zip(before, bufs)]
    assert max_err(params, expected) < 1e-6


def test_checkpoint_settings_come_from_the_constructor():
    _, old = stepped(lambda ps: fo.AdamW(ps, backend="reference"))
    sd = copy.deepcopy(old.state_dict())
    for g in sd["param_groups"]:  # as an older fasttricks saved them
        g["backend"], g["master_weights"] = "reference", True
    params, opt = stepped(lambda ps: fo.AdamW(ps, backend="auto"), steps=0)
    opt.load_state_dict(sd)
    assert all(opt.group_options(g)["backend"] == "auto" and opt.group_options(g)["master_weights"] is False
               for g in opt.param_groups)
    assert not any("backend" in g or "master_weights" in g for g in opt.param_groups)


@pytest.mark.parametrize("cls,tcls,cfg", PAIRS, ids=IDS)
def test_meta_params_step_as_in_torch(cls, tcls, cfg):
    for make in (lambda ps: cls(ps, **cfg), lambda ps: tcls(ps, **cfg)):
        params = [torch.empty(4, 3, device="meta", requires_grad=True), torch.empty(5, device="meta",
                                                                                    requires_grad=True)]
        opt = make(params)
        for _ in range(2):
            for p in params:
                p.grad = torch.empty_like(p)
            opt.step()
        shapes = {k: tuple(v.shape) for k, v in opt.state[params[0]].items() if torch.is_tensor(v)}
        if cls in (fo.Adam, fo.AdamW):
            assert shapes["exp_avg"] == (4, 3) and shapes["exp_avg_sq"] == (4, 3)
        else:
            assert shapes["momentum_buffer"] == (4, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,tcls,cfg", PAIRS[2:], ids=IDS[2:])  # SGD takes sparse grads (test below)
@pytest.mark.parametrize("master", [False, True])
def test_a_failed_first_step_writes_no_state(backend, cls, tcls, cfg, master):
    params = [torch.randn(4, 3, dtype=torch.bfloat16).requires_grad_(),
              torch.randn(6, 2, dtype=torch.bfloat16).requires_grad_()]
    opt = cls(params, backend=backend, master_weights=master, **cfg)
    params[0].grad = torch.ones_like(params[0])
    params[1].grad = torch.ones(6, 2).to_sparse().to(torch.bfloat16)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    params[1].grad = torch.ones_like(params[1])  # and the next good step starts from scratch
    opt.step()
    assert len(opt.state) == (2 if master or cls not in (fo.SGD, fo.SGDW) or cfg["momentum"] else 0)


COMPLEX_CASES = [(fo.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
                 (fo.AdamW, torch.optim.AdamW, dict(lr=1e-2, maximize=True)),
                 (fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.1)),
                 (fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,tcls,cfg", COMPLEX_CASES, ids=["Adam-amsgrad", "AdamW-maximize", "SGD", "SGD-nesterov"])
def test_complex_params_step_as_in_torch(backend, cls, tcls, cfg):
    """NOTE [complex params]: stepped as their real views, state kept complex, as torch does."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, dtype=torch.complex64, generator=g) for s in [(4, 3), (), (4099,)]]
    base.append(torch.randn(5, generator=g))  # a real param in the same group
    grads = [[torch.randn(b.shape, dtype=b.dtype, generator=g) for b in base] for _ in range(3)]
    runs = []
    for make in (lambda ps: cls(ps, backend=backend, **cfg), lambda ps: tcls(ps, foreach=False, **cfg)):
        params = [b.clone().requires_grad_() for b in base]
        opt = make(params)
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
        runs.append((params, opt))
    (ours, opt), (theirs, topt) = runs
    assert max_err([torch.view_as_real(p.detach()) if p.is_complex() else p for p in ours],
                   [torch.view_as_real(p.detach()) if p.is_complex() else p for p in theirs]) < 1e-5
    for p, q in zip(ours, theirs):
        for k, v in topt.state[q].items():
            assert opt.state[p][k].dtype == v.dtype, k
    assert all(p.grad is not None for p in ours)  # the grads the user set are untouched


def test_complex_param_replaced_under_the_optimizer():
    p = torch.randn(6, dtype=torch.complex64).requires_grad_()
    opt = fo.SGD([p], lr=0.1)
    p.grad = torch.full_like(p, 1 + 1j)
    opt.step()
    fresh = torch.zeros(6, dtype=torch.complex64)
    p.data = fresh  # a new memory: the plan's real view follows it
    opt.step()
    assert torch.allclose(p.detach(), torch.full((6,), -0.1 - 0.1j))


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_params_fused_average_equals_the_hook(backend):
    from fasttricks.sampling import EMA

    base = torch.randn(4, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    averages = []
    for fused in (None, False):
        p = base.clone().requires_grad_()
        opt = fo.AdamW([p], lr=1e-2, backend=backend)
        ema = EMA(opt, decay=0.5, fused=fused)
        for k in range(3):
            p.grad = torch.full_like(p, complex(k, -k))
            opt.step()
        averages.append(ema.averages[0])
    assert averages[0].dtype == torch.complex64
    assert torch.allclose(torch.view_as_real(averages[0]), torch.view_as_real(averages[1]), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.1),
                                 dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)])
def test_sgd_sparse_gradients_as_in_torch(backend, cfg):
    """NOTE [sparse grads]: an nn.Embedding(sparse=True) beside dense params: the
    sparse one takes torch's formulas, the dense ones the fused step."""
    runs = []
    for make in (lambda ps: fo.SGD(ps, backend=backend, **cfg), lambda ps: torch.optim.SGD(ps, **cfg)):
        torch.manual_seed(0)
        emb, lin = torch.nn.Embedding(20, 4, sparse=True), torch.nn.Linear(4, 3)
        opt = make(list(emb.parameters()) + list(lin.parameters()))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            idx = torch.randint(20, (6,), generator=g)
            lin(emb(idx)).square().mean().backward()
            opt.step()
        runs.append([emb.weight, lin.weight, lin.bias])
    assert max_err(runs[0], runs[1]) < 1e-6


def test_sgd_sparse_gradients_with_weight_decay_fail_as_in_torch():
    for cls in (fo.SGD, torch.optim.SGD):
        emb = torch.nn.Embedding(5, 2, sparse=True)
        opt = cls(emb.parameters(), lr=0.1, weight_decay=0.1)
        emb(torch.tensor([1, 2])).sum().backward()
        before = emb.weight.detach().clone()
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()
        assert torch.equal(emb.weight, before)


def test_a_grad_turning_sparse_moves_its_param_out_of_the_fused_step():
    w = torch.randn(5, 3, requires_grad=True)
    opt = fo.SGD([w], lr=0.1, momentum=0.9)
    ref = w.detach().clone().requires_grad_()
    topt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    for grad in (torch.ones(5, 3), torch.ones(5, 3).to_sparse()):  # dense first, then sparse
        w.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        topt.step()
    assert max_err([w], [ref]) < 1e-6


def test_group_options_live_beside_param_groups():
    """NOTE [group options]: given per group in the group dicts, kept out of
    them (torch's keys only), changed with set_group_options, kept by
    deepcopy and by load_state_dict."""
    a, b = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    opt = fo.SGD([{"params": [a], "backend": "reference", "decoupled_weight_decay": True}, {"params": [b]}],
                 lr=0.1, momentum=0.9, weight_decay=0.1)
    torch_keys = sorted(torch.optim.SGD([a]).param_groups[0])
    assert all(sorted(g) == torch_keys for g in opt.param_groups)
    assert opt.group_options(opt.param_groups[0])["backend"] == "reference"
    assert opt.group_options(opt.param_groups[0])["decoupled_weight_decay"] is True
    assert opt.group_options(opt.param_groups[1])["backend"] == "auto"
    opt.add_param_group({"params": [torch.randn(4, requires_grad=True)], "master_weights": True})
    assert "master_weights" not in opt.param_groups[2] and opt.group_options(opt.param_groups[2])["master_weights"]
    with pytest.raises(TypeError, match="unknown option"):
        opt.set_group_options(1, lr=0.2)
    with pytest.raises(ValueError, match="backend"):
        opt.set_group_options(1, backend="gpu")
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    opt.set_group_options(1, backend="reference")  # the group's plans are rebuilt
    opt.step()
    assert type(opt._ft_engine.cache.groups[id(opt.param_groups[1])].buckets[0]).__name__.startswith("Reference")
    twin = copy.deepcopy(opt)
    assert [twin.group_options(g) for g in twin.param_groups] == [opt.group_options(g) for g in opt.param_groups]
    options = [dict(opt.group_options(g)) for g in opt.param_groups]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [opt.group_options(g) for g in opt.param_groups] == options
