"""torch's own optimizer test database, run against fasttricks.

The cases come from `torch.testing._internal.common_optimizers.optim_db` in the
installed torch: for SGD, Adam and AdamW, every OptimizerInput (the
hyper-parameter sets torch tests: defaults, tensor lr, weight decay, maximize,
amsgrad, momentum, dampening, nesterov) and every ErrorOptimizerInput (the bad
inputs and the exception torch raises for each). The checks follow the tests
of torch's test/test_optim.py that apply to a CPU optimizer; wherever one
compares two implementations, torch's for-loop optimizer is the other side,
so that we are never compared with ourselves. They run on the auto,
reference and cpu backends, and a subset on triton under the interpreter.
"""
import copy
import io
import warnings

import pytest
import torch

import fasttricks.optim as fo
from helpers import BACKENDS

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers",
                                        reason="torch's optimizer test database needs expecttest")
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

OURS = {"SGD": fo.SGD, "Adam": fo.Adam, "AdamW": fo.AdamW}
TORCH = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
INFOS = {info.name: info for info in common_optimizers.optim_db if info.name in OURS}
BACKEND_AXIS = ["auto"] + [b for b in BACKENDS if b != "triton"]


def optim_inputs(name):
    return INFOS[name].optim_inputs_func(device="cpu")


def cases(names=tuple(OURS)):
    return [pytest.param(name, i, id=f"{name}-{inp.desc}") for name in names for i, inp in enumerate(optim_inputs(name))]


def kwargs_of(name, index):
    """The case's kwargs, tensors copied (a tensor lr is stepped in place by schedulers)."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in optim_inputs(name)[index].kwargs.items()}


def problem(seed=0, dtype=torch.float32, maximize=False):
    """torch's test problem; under maximize the closure returns the negated loss, as torch's test does."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(2, 3, generator=g).to(dtype))
    bias = torch.nn.Parameter(torch.randn(2, generator=g).to(dtype))
    x = torch.randn(3, generator=g).to(dtype)

    def closure_for(opt):
        def closure():
            opt.zero_grad()
            loss = (weight.mv(x) + bias).abs().pow(2).sum()
            if maximize:
                loss = -loss
            loss.backward()
            return loss
        return closure
    return [weight, bias], closure_for


def run_both(name, index, backend, steps=7, dtype=torch.float32):
    """(our params, our optimizer, torch's params, torch's optimizer, our losses)."""
    out = []
    for cls, extra in ((OURS[name], {"backend": backend}), (TORCH[name], {"foreach": False})):
        kwargs = kwargs_of(name, index)
        params, closure_for = problem(dtype=dtype, maximize=kwargs.get("maximize", False))
        opt = cls(params, **kwargs, **extra)
        losses = [opt.step(closure_for(opt)).detach().abs().item() for _ in range(steps)]
        out.append((params, opt, losses))
    return out


@pytest.mark.parametrize("backend", BACKEND_AXIS + (["triton"] if "triton" in BACKENDS else []))
@pytest.mark.parametrize("name,index", cases())
def test_goes_right_direction_and_matches_torch(name, index, backend):
    """test_forloop_goes_right_direction, and the step equals torch's for-loop one."""
    (ours, _, losses), (theirs, _, _) = run_both(name, index, backend)
    assert losses[-1] < losses[0]
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OURS))
def test_errors_as_torch_raises_them(name):
    """test_errors: every bad input of optim_db raises (or warns) what torch does."""
    for error_input in INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32):
        inp = error_input.optimizer_error_input
        params = inp.params if inp.params is not None else [torch.nn.Parameter(torch.randn(2, 3))]
        make = lambda: OURS[name](params, **inp.kwargs)  # noqa: E731
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            action = make
        else:
            opt = make()
            action = opt.step
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                action()
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                action()


@pytest.mark.parametrize("backend", BACKEND_AXIS)
@pytest.mark.parametrize("name,index", cases())
def test_state_dict_deterministic_both_ways(name, index, backend):
    """test_state_dict_deterministic, across implementations: torch's checkpoint
    into ours and ours into torch continue exactly as the original would."""
    (ours, opt, _), (theirs, topt, _) = run_both(name, index, backend, steps=3)
    for src, dst_cls, extra in ((topt, OURS[name], {"backend": backend}), (opt, TORCH[name], {"foreach": False})):
        params, closure_for = problem()
        with torch.no_grad():
            for p, q in zip(params, theirs):
                p.copy_(q)
        dst = dst_cls(params, **kwargs_of(name, index), **extra)
        dst.load_state_dict(copy.deepcopy(src.state_dict()))
        assert [sorted(g) for g in dst.state_dict()["param_groups"]] == \
            [sorted(g) for g in src.state_dict()["param_groups"]]
        dst.step(closure_for(dst))
        ref_params, ref_closure = problem()
        with torch.no_grad():
            for p, q in zip(ref_params, theirs):
                p.copy_(q)
        ref = TORCH[name](ref_params, **kwargs_of(name, index), foreach=False)
        ref.load_state_dict(copy.deepcopy(topt.state_dict()))
        ref.step(ref_closure(ref))
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,index", cases())
def test_save_load_equality_with_weights_only(name, index):
    """test_save_load_equality_with_weights_only: our checkpoint survives
    torch.save / torch.load(weights_only=True) unchanged."""
    (_, opt, _), _ = run_both(name, index, "auto", steps=2)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    torch.testing.assert_close(loaded["state"], sd["state"])
    assert loaded["param_groups"] == [{k: v for k, v in g.items()} for g in sd["param_groups"]] or \
        str(loaded["param_groups"]) == str(sd["param_groups"])


@pytest.mark.parametrize("name,index", cases())
def test_load_nontensor_step(name, index):
    """test_load_nontensor_step: a checkpoint whose `step` is a plain number loads and steps."""
    (_, opt, _), (theirs, topt, _) = run_both(name, index, "auto", steps=2)
    sd = copy.deepcopy(topt.state_dict())
    for state in sd["state"].values():
        if "step" in state:
            state["step"] = float(state["step"])
    params, closure_for = problem()
    ours = OURS[name](params, **kwargs_of(name, index))
    ours.load_state_dict(sd)
    ours.step(closure_for(ours))


@pytest.mark.parametrize("backend", BACKEND_AXIS)
@pytest.mark.parametrize("name,index", cases())
def test_complex_matches_real_views(name, index, backend):
    """test_complex / test_complex_2d: a complex param steps as torch steps its
    real view (both parts of every element as real params)."""
    if torch.is_tensor(optim_inputs(name)[index].kwargs.get("lr")):
        pytest.skip("torch skips tensor lr here")  # as test_complex does
    g = torch.Generator().manual_seed(0)
    complex_param = torch.randn(5, 5, dtype=torch.complex64, generator=g).requires_grad_()
    real_param = torch.view_as_real(complex_param).detach().clone().requires_grad_()
    opt_c = OURS[name]([complex_param], backend=backend, **kwargs_of(name, index))
    opt_r = TORCH[name]([real_param], foreach=False, **kwargs_of(name, index))
    target = torch.randn(5, 5, dtype=torch.complex64, generator=g)
    for _ in range(4):
        for opt, p, loss_of in ((opt_c, complex_param, lambda p: (p - target).abs().pow(2).sum()),
                                (opt_r, real_param,
                                 lambda p: (torch.view_as_complex(p) - target).abs().pow(2).sum())):
            opt.zero_grad()
            loss_of(p).backward()
            opt.step()
    torch.testing.assert_close(torch.view_as_real(complex_param), real_param, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,index", cases())
def test_step_is_noop_when_params_have_no_grad(name, index):
    params, _ = problem()
    before = [p.detach().clone() for p in params]
    opt = OURS[name](params, **kwargs_of(name, index))
    for _ in range(2):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("name,index", cases())
def test_param_groups_weight_decay_and_lr(name, index):
    """test_param_groups_weight_decay / _lr: two groups with their own settings, as torch."""
    runs = []
    for cls, extra in ((OURS[name], {}), (TORCH[name], {"foreach": False})):
        params, closure_for = problem()
        kwargs = kwargs_of(name, index)
        lr = kwargs.pop("lr", 1e-3)
        opt = cls([{"params": [params[0]], "weight_decay": 0.3},
                   {"params": [params[1]], "lr": (lr * 2 if not torch.is_tensor(lr) else lr * 2)}],
                  lr=lr, **kwargs, **extra)
        for _ in range(4):
            opt.step(closure_for(opt))
        runs.append(params)
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OURS))
def test_hooks_deepcopy_repr_and_default_dtype(name):
    """test_step_pre_hook / test_step_post_hook, test_deepcopy_copies_all_public_attrs,
    test_optimizer_can_be_printed, test_set_default_dtype_works_with_foreach."""
    params, closure_for = problem()
    opt = OURS[name](params, lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.step(closure_for(opt))
    assert calls == ["pre", "post"]
    clone = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public <= set(vars(clone))
    clone.step(closure_for(clone))  # the copy steps its own params
    assert name in repr(opt)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        params64, closure64 = problem(dtype=torch.float64)
        for cls, extra in ((OURS[name], {}), (TORCH[name], {"foreach": False})):
            ps = [p.detach().clone().requires_grad_() for p in params64]
            o = cls(ps, lr=1e-2, **extra)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                for _ in range(2):
                    o.zero_grad()
                    (ps[0].sum() ** 2 + ps[1].sum()).backward()
                    o.step()
            if cls is OURS[name]:
                ours64 = ps
        torch.testing.assert_close(ours64, ps)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("name", list(OURS))
def test_state_dict_hooks_that_store_non_param_entries(name):
    """test_state_dict_pre_hook / _post_hook / _pre_post_hook and
    test_load_state_dict_post_hook / _pre_post_hook: hooks that put plain
    values (not per-param dicts) into `optimizer.state`, as torch allows; the
    optimizer still steps like torch's afterwards."""
    def pre(opt):
        opt.state["test"] = 1

    def post(opt, state_dict):
        state_dict["ran_pre"] = state_dict["state"].pop("test", None) == 1
        return state_dict

    def load_post(opt):
        opt.state["ran_load_post"] = True

    runs = []
    for cls, extra in ((OURS[name], {}), (TORCH[name], {"foreach": False})):
        params, closure_for = problem()
        opt = cls(params, lr=1e-2, **extra)
        opt.step(closure_for(opt))
        opt.register_state_dict_pre_hook(pre)
        assert opt.state_dict()["state"]["test"] == 1
        opt.register_state_dict_post_hook(post)
        state_dict = opt.state_dict()
        assert state_dict["ran_pre"] and "test" not in state_dict["state"]
        opt.register_load_state_dict_post_hook(load_post)
        opt.load_state_dict(state_dict)
        assert opt.state["ran_load_post"] is True
        for _ in range(2):
            opt.step(closure_for(opt))
        runs.append(params)
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,index", cases())
def test_non_empty_state(name, index):
    """test_non_empty_state: after a step every state entry holds something
    (SGD without momentum keeps no entries at all, as torch)."""
    model, x = torch.nn.Linear(5, 5), torch.rand(2, 5)
    peer_model = copy.deepcopy(model)
    opt = OURS[name](model.parameters(), **kwargs_of(name, index))
    peer = TORCH[name](peer_model.parameters(), **kwargs_of(name, index), foreach=False)
    for m, o in ((model, opt), (peer_model, peer)):
        m(x).sum().backward()
        o.step()
    assert all(len(state) > 0 for state in opt.state.values())
    assert len(opt.state) == len(peer.state)


@pytest.mark.parametrize("name,index", cases())
def test_state_dict_equal_params_and_older_checkpoints(name, index):
    """_test_state_dict: two optimizers on equal (not identical) params, one loaded
    from the other's checkpoint, step alike and save equal state dicts; repeated
    param groups save alike; checkpoints without `maximize`/`foreach` (older
    torch) load and step."""
    (params, opt, _), _ = run_both(name, index, "auto", steps=5)
    clones, closure_for = problem()
    with torch.no_grad():
        for c, p in zip(clones, params):
            c.copy_(p)
    twin = OURS[name](clones, **kwargs_of(name, index))
    saved = copy.deepcopy(opt.state_dict())
    twin.load_state_dict(copy.deepcopy(saved))
    _, closure_a = problem()
    for _ in range(5):
        for o, ps in ((opt, params), (twin, clones)):
            o.zero_grad()
            (ps[0].sum() ** 2 + ps[1].square().sum()).backward()
            o.step()
        for p, c in zip(params, clones):
            torch.testing.assert_close(p, c)
    torch.testing.assert_close(opt.state_dict(), twin.state_dict())
    twin.param_groups.extend(twin.param_groups)
    assert opt.state_dict()["param_groups"][-1] == twin.state_dict()["param_groups"][-1]
    for key in ("maximize", "foreach"):
        older = opt.state_dict()
        for group in older["param_groups"]:
            group.pop(key, None)
        opt.load_state_dict(older)
        opt.step()


@pytest.mark.parametrize("name,index", cases())
def test_non_contiguous_params(name, index):
    """_test_basic_cases with non-contiguous params: ours equals torch's for-loop step."""
    runs = []
    for cls, extra in ((OURS[name], {}), (TORCH[name], {"foreach": False})):
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(10, 5, 2, generator=g)[..., 0].requires_grad_()
        bias = torch.randn(10, 2, generator=g)[..., 0].requires_grad_()
        x = torch.randn(5, generator=g)
        opt = cls([weight, bias], **kwargs_of(name, index), **extra)
        for _ in range(5):
            opt.zero_grad()
            (weight.mv(x) + bias).pow(2).sum().backward()
            opt.step()
        runs.append([weight, bias])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKEND_AXIS)
@pytest.mark.parametrize("index", range(len(optim_inputs("SGD"))))
def test_rosenbrock_sparse(backend, index):
    """_test_rosenbrock_sparse (SGD supports sparse grads): cyclic coordinate
    descent with uncoalesced sparse grads, ours against torch's SGD on the same
    sparse grads, and (without momentum) towards the minimum."""
    kwargs = kwargs_of("SGD", index)
    if kwargs.get("weight_decay"):
        pytest.skip("sparse grads with weight decay fail in torch too")
    if not torch.is_tensor(kwargs.get("lr")):
        kwargs["lr"] = min(kwargs.get("lr", 1e-3), 1e-3)  # as torch's test: larger steps leave the valley
    start = torch.tensor([1.5, 1.5])
    sparse_p, torch_p = start.clone().requires_grad_(), start.clone().requires_grad_()
    sparse_opt = fo.SGD([sparse_p], backend=backend, **kwargs)
    torch_opt = torch.optim.SGD([torch_p], **copy.deepcopy(kwargs))

    def grad_at(p, w):
        x, y = p.detach()
        full = torch.stack([-400 * x * (y - x ** 2) - 2 * (1 - x), 200 * (y - x ** 2)])
        i = torch.tensor([[0, 0]]) if w else torch.tensor([[1, 1]])
        v = full[0] * torch.tensor([0.25, 0.75]) if w else full[1] * torch.tensor([0.75, 0.25])
        return torch.sparse_coo_tensor(i, v, (2,))  # uncoalesced: one index twice

    for step in range(200):
        w = step % 2
        sparse_p.grad = grad_at(sparse_p, w)
        torch_p.grad = grad_at(torch_p, w)
        sparse_opt.step()
        torch_opt.step()
        torch.testing.assert_close(sparse_p, torch_p)
    if not kwargs.get("maximize") and not kwargs.get("momentum"):
        assert (sparse_p.detach() - 1).norm() <= (start - 1).norm()
