"""NOTE [plan cache]: whatever a user changes through torch's public surface,
the next step does what torch.optim does. Each case steps a fasttricks
optimizer and a torch one side by side, makes the same change to both, and
steps on; the params and the saved state must keep agreeing."""
import ast
import copy
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import fasttricks.optim as fo
from fasttricks import _backends
from fasttricks._table import ADAM_ROWS, CHUNK, SGD_ROWS
from fasttricks.ops.adam import AdamHyper, DeviceAdamPlan
from fasttricks.ops.sgd import SgdHyper
from helpers import BACKENDS, assert_agree, max_err, twins

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(3, 5), (7,), ()]
FAMILIES = [(fo.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
            (fo.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
            (fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, nesterov=False)),
            (fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True))]
FAMILY_IDS = ["Adam", "AdamW", "SGD-dampening", "SGD-nesterov"]


def step_both(ours, opt, theirs, topt, seed):
    g = torch.Generator().manual_seed(seed)
    for p, q in zip(ours, theirs):
        grad = torch.randn(p.shape, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()
    opt.step()
    topt.step()


CHANGES = {
    "state.clear()": lambda opt, ps: opt.state.clear(),
    "state = defaultdict(dict)": lambda opt, ps: setattr(opt, "state", defaultdict(dict)),
    "state[p] = {}": lambda opt, ps: opt.state.__setitem__(ps[0], {}),
    "del state[p]": lambda opt, ps: opt.state.__delitem__(ps[1]),
    "state[p][k] = new tensor": lambda opt, ps: [
        opt.state[ps[0]].__setitem__(k, torch.full_like(v, 0.5)) for k, v in list(opt.state[ps[0]].items())
        if torch.is_tensor(v) and v.shape == ps[0].shape],
    "params[j] = new param": None,  # below: needs the twin's param
    "p.data = new tensor": None,
}


def _apply(change, opt, params, fresh):
    if change == "params[j] = new param":
        opt.param_groups[0]["params"][0] = fresh
        opt.state.pop(params[0], None)  # else torch's own state_dict() fails on the orphan
        params[0] = fresh
    elif change == "p.data = new tensor":
        params[0].data = fresh.detach().clone()
    else:
        CHANGES[change](opt, params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("cls,tcls,cfg", FAMILIES, ids=FAMILY_IDS)
def test_changes_under_the_optimizer_act_as_in_torch(backend, change, cls, tcls, cfg):
    ours, opt, theirs, topt = twins(cls, tcls, cfg, backend, SHAPES)
    for seed in range(2):
        step_both(ours, opt, theirs, topt, seed)
    fresh = torch.randn(SHAPES[0], generator=torch.Generator().manual_seed(9))
    _apply(change, opt, ours, fresh.clone().requires_grad_())
    _apply(change, topt, theirs, fresh.clone().requires_grad_())
    for seed in range(2, 4):
        step_both(ours, opt, theirs, topt, seed)
        assert_agree(ours, opt, theirs, topt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["data", "set_", "resize_", "storage resize_"])
@pytest.mark.parametrize("cls,tcls,cfg", FAMILIES, ids=FAMILY_IDS)
def test_state_tensors_repointed_in_place_act_as_in_torch(backend, how, cls, tcls, cfg):
    """A state tensor keeps its object but gets other memory: `t.data = ...`
    (the usual way of moving optimizer state between devices), `t.set_(...)`,
    a resize that reallocates, or its storage freed and reallocated in place.
    No container of ours sees these; the plans must step the new memory, as
    torch does, and never write the old (it may be freed: the CPU plan once
    wrote a param to garbage here)."""
    ours, opt, theirs, topt = twins(cls, tcls, cfg, backend, SHAPES)
    step_both(ours, opt, theirs, topt, 0)
    for o, ps in ((opt, ours), (topt, theirs)):
        for p in ps:
            for k, t in o.state[p].items():
                if not torch.is_tensor(t) or k == "step":
                    continue
                if how == "data":
                    t.data = t.data.clone()
                elif how == "set_":
                    t.set_(t.clone())
                elif how == "resize_":
                    t.resize_(1 << 16)
                    t.resize_(p.shape)
                else:
                    saved = t.clone()
                    t.untyped_storage().resize_(0)
                    t.untyped_storage().resize_(saved.numel() * saved.element_size())
                    t.copy_(saved)
    for seed in (1, 2):
        step_both(ours, opt, theirs, topt, seed)
        assert_agree(ours, opt, theirs, topt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_and_load_state_dict_continue_as_torch(backend):
    ours, opt, theirs, topt = twins(fo.AdamW, torch.optim.AdamW, dict(lr=1e-2), backend, SHAPES)
    step_both(ours, opt, theirs, topt, 0)
    extra = torch.randn(4, 3)
    ours.append(extra.clone().requires_grad_())
    theirs.append(extra.clone().requires_grad_())
    opt.add_param_group({"params": [ours[-1]], "lr": 3e-2})
    topt.add_param_group({"params": [theirs[-1]], "lr": 3e-2})
    step_both(ours, opt, theirs, topt, 1)
    assert_agree(ours, opt, theirs, topt)
    opt.load_state_dict(copy.deepcopy(topt.state_dict()))
    step_both(ours, opt, theirs, topt, 2)
    assert_agree(ours, opt, theirs, topt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_buffer_set_to_none_restarts_and_old_checkpoints_load(backend):
    cfg = dict(lr=0.1, momentum=0.9, dampening=0.5)
    ours, opt, theirs, topt = twins(fo.SGD, torch.optim.SGD, cfg, backend, SHAPES)
    step_both(ours, opt, theirs, topt, 0)
    for o, ps in ((opt, ours), (topt, theirs)):
        o.state[ps[0]]["momentum_buffer"] = None  # torch's reset idiom
    step_both(ours, opt, theirs, topt, 1)
    assert_agree(ours, opt, theirs, topt)
    # torch <= 2.0 saved buffers of momentum-free steps as None
    sd = copy.deepcopy(topt.state_dict())
    sd["state"][1]["momentum_buffer"] = None
    topt.load_state_dict(copy.deepcopy(sd))
    opt.load_state_dict(sd)
    step_both(ours, opt, theirs, topt, 2)
    assert_agree(ours, opt, theirs, topt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_without_momentum_keeps_no_state(backend):
    ours, opt, theirs, topt = twins(fo.SGD, torch.optim.SGD, dict(lr=0.1), backend, SHAPES)
    step_both(ours, opt, theirs, topt, 0)
    assert opt.state_dict()["state"] == topt.state_dict()["state"] == {}
    assert len(opt.state) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_buffer_enters_the_state_on_its_first_committed_step(backend):
    ours, opt, *_ = twins(fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9), backend, SHAPES)
    for p in ours:
        p.grad = torch.ones_like(p)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all("momentum_buffer" not in opt.state.get(p, {}) for p in ours)
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert all(torch.equal(opt.state[p]["momentum_buffer"], p.grad) for p in ours)  # buf = g on the first step


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_step_from_torch_works(backend):
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g) for s in SHAPES]
    tparams = [b.clone().requires_grad_() for b in base]
    topt = torch.optim.Adam(tparams, lr=1e-2)
    for p in tparams:
        p.grad = torch.ones_like(p)
    topt.step()
    sd = copy.deepcopy(topt.state_dict())
    for s in sd["state"].values():
        s["step"] = s["step"].to(torch.float64)  # what torch writes under set_default_dtype(float64)
    params = [p.detach().clone().requires_grad_() for p in tparams]
    opt = fo.Adam(params, lr=1e-2, backend=backend)
    opt.load_state_dict(sd)
    for p, q in zip(params, tparams):
        p.grad, q.grad = torch.full_like(p, 0.5), torch.full_like(q, 0.5)
    opt.step()
    topt.step()
    assert max_err(params, tparams) < 1e-6
    assert all(float(opt.state[p]["step"]) == 2.0 for p in params)


def test_cache_is_reused_when_nothing_changes():
    ours, opt, theirs, topt = twins(fo.AdamW, torch.optim.AdamW, dict(lr=1e-2), "reference", SHAPES)
    step_both(ours, opt, theirs, topt, 0)
    plans = [plan for entry in opt._plans() for plan in entry.buckets]
    step_both(ours, opt, theirs, topt, 1)
    assert [plan for entry in opt._plans() for plan in entry.buckets] == plans
    opt.param_groups[0]["lr"] = 1e-3  # a hyper-parameter is read each step: no rebuild
    topt.param_groups[0]["lr"] = 1e-3
    step_both(ours, opt, theirs, topt, 2)
    assert [plan for entry in opt._plans() for plan in entry.buckets] == plans
    assert_agree(ours, opt, theirs, topt)


def test_checkpoints_hold_plain_containers():
    ours, opt, theirs, topt = twins(fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9), "reference", SHAPES)
    step_both(ours, opt, theirs, topt, 0)
    sd = opt.state_dict()
    assert all(type(v) is dict for v in sd["state"].values())
    assert all(type(g["params"]) is list for g in sd["param_groups"])
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)  # torch's default loader takes it


# ---- the device plans' host side, with the launch mocked (the cuda backend's, on CPU tensors) ----

def test_device_plan_hands_the_launch_its_record_and_table():
    calls = []
    params = [torch.randn(s).requires_grad_() for s in [(5000,), (3,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    plan = DeviceAdamPlan(params, steps, zeros(), zeros(), None, None, False, True,
                          lambda tables, hyper, **kw: calls.append((tables, hyper, kw)))
    hyper = AdamHyper(1e-3, 0.9, 0.999, 1e-8, 0.01)
    assert plan.step(hyper, None, None, 0.0) == 2
    tables, got, kw = calls[0]
    assert got is hyper
    assert kw["decoupled"] and not kw["amsgrad"] and not kw["average"]
    ptrs, numels, chunk_tensor, chunk_start, n, n_chunks = tables
    assert n == 2 and numels.tolist() == [5000, 3]
    assert chunk_tensor.tolist() == [0, 0, 1] and chunk_start.tolist() == [0, CHUNK, 0]
    rows = ptrs.view(len(ADAM_ROWS), n)
    assert rows[ADAM_ROWS.index("param")].tolist() == [p.data_ptr() for p in params]
    assert rows[ADAM_ROWS.index("step")].tolist() == [s.data_ptr() for s in steps]
    assert all(float(s) == 1.0 for s in steps)


def test_a_failed_launch_gives_the_step_counts_back():
    """Issue #23: the counts pack() bumps before the launch go back when the launch raises."""
    params = [torch.randn(s).requires_grad_() for s in [(5000,), (3,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    steps = [torch.full((), 4.0) for _ in params]
    zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731

    def failing_launch(tables, hyper, **kw):
        raise RuntimeError("launch failed")

    plan = DeviceAdamPlan(params, steps, zeros(), zeros(), None, None, False, True, failing_launch)
    with pytest.raises(RuntimeError, match="launch failed"):
        plan.step(AdamHyper(1e-3, 0.9, 0.999, 1e-8, 0.01), None, None, 0.0)
    assert all(float(s) == 4.0 for s in steps)


def _binding_keywords(source: str, function: str) -> set[str]:
    """The keyword names a function of csrc/cuda/bindings.cpp reads (k.get / k.scalar)."""
    body = re.search(rf"\n[\w:]+ {function}\(.*?\n}}\n", source, re.S).group(0)
    return set(re.findall(r'k\.(?:get<[^>]+>|scalar)\("(\w+)"\)', body))


@pytest.mark.skipif(not (ROOT / "csrc").is_dir(), reason="needs the source checkout")
@pytest.mark.parametrize("family", ["adam", "sgd"])
def test_cuda_launch_passes_the_keywords_the_binding_reads(family, monkeypatch):
    """The CUDA binding takes everything after the table by keyword and raises
    on a missing or unread one; without a GPU, the names the Python launch
    passes are held equal here to those bindings.cpp reads."""
    from fasttricks.ops import adam as ops_adam, sgd as ops_sgd
    source = (ROOT / "csrc" / "cuda" / "bindings.cpp").read_text()
    expected = _binding_keywords(source, "step_args") | _binding_keywords(source, f"{family}_args")
    calls = []

    class FakeCudaExt:
        def __getattr__(self, name):
            return lambda *table, **kw: calls.append((name, table, kw))

    monkeypatch.setattr(_backends, "cuda_ext", lambda: FakeCudaExt())
    params = [torch.randn(5).requires_grad_()]
    params[0].grad = torch.randn(5)
    zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    if family == "adam":
        plan = DeviceAdamPlan(params, [torch.zeros(())], zeros(), zeros(), None, None, amsgrad=False,
                              decoupled=True, launch=ops_adam.CUDA_LAUNCH)
        hyper = AdamHyper(torch.tensor(1e-3), 0.9, 0.999, 1e-8, 0.01)
    else:
        plan = ops_sgd.DeviceSgdPlan(params, zeros(), None, [True], nesterov=True, decoupled=False,
                                     launch=ops_sgd.CUDA_LAUNCH)
        hyper = SgdHyper(0.1, 0.01, 0.9, 0.0)
    plan.step(hyper, torch.ones(()), torch.zeros(()), 0.5)
    (name, table, kw), = calls
    assert name == f"{family}_step" and len(table) == 5 and table[4] == 1
    assert set(kw) == expected
    assert torch.is_tensor(kw["lr_tensor"]) == (family == "adam") and kw["avg_coef"] == 0.5


@pytest.mark.skipif(_backends.cpu_ext() is None, reason="CPU extension not built")
def test_device_table_packs_and_refuses_as_the_python_packer(monkeypatch):
    """The device plans' one gather and validate: _C.DeviceTable (C++) and the
    Python packer it replaces (kept for installs without the extension) pack
    the same tables from the same tensors, bump the same counters, and refuse
    the same bad grads with the same exception type."""
    from fasttricks.ops import _device
    shapes = [(5000,), (3, 4), (), (0,), (4099,), (7,)]
    params = [torch.randn(s) for s in shapes]
    steps = [torch.full((), 2.0) for _ in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]

    def plan(native):
        monkeypatch.setattr(_device, "NATIVE", native)
        made = DeviceAdamPlan(params, steps, *state, None, None, amsgrad=False, decoupled=True,
                              launch=None, rounding=list(range(10, 10 + len(params))))
        assert (made._table() is not None) == native
        return made

    native, python = plan(True), plan(False)
    for i, p in enumerate(params):
        p.grad = None if i == 1 else torch.randn_like(p)
    packed = [native.pack(), python.pack()]
    (n1, t1, w1, _), (n2, t2, w2, _) = packed
    assert n1 == n2 == len(params) - 1 and w1 == w2 == []
    assert all(torch.equal(a, b) for a, b in zip(t1[:4], t2[:4])) and t1[4:] == t2[4:]
    assert [float(s) for s in steps] == [4.0 if i != 1 else 2.0 for i in range(len(params))]
    for bad in (torch.randn(4, 3), torch.randn(3, 4, dtype=torch.float64)):
        params[1].grad = torch.zeros(3, 4)
        params[1].grad.data = bad  # past torch's own check, as .data assignments go
        errors = []
        for p_ in (native, python):
            with pytest.raises((RuntimeError, TypeError, ValueError)) as info:
                p_.pack()
            errors.append(info.type)
        assert errors[0] is errors[1], errors
    assert [float(s) for s in steps] == [4.0 if i != 1 else 2.0 for i in range(len(params))]


def test_device_table_refuses_float64_steps():
    if _backends.cpu_ext() is None:
        pytest.skip("CPU extension not built")
    p = torch.zeros(3)
    with pytest.raises(TypeError, match="float32"):
        _backends.cpu_ext().DeviceTable("Adam", [p], [[torch.zeros(3)], [torch.zeros((), dtype=torch.float64)]],
                                        1, 1, 0, [torch.float32], CHUNK)


# ---- one definition of the table rows and the records ---------------------------------------------

def test_table_rows_agree_in_python_cpp_and_cuda():
    header = (ROOT / "csrc" / "include" / "fasttricks" / "table.h").read_text()
    assert int(re.search(r"kChunk = (\d+)", header).group(1)) == CHUNK
    for family, rows in (("adam", ADAM_ROWS), ("sgd", SGD_ROWS)):
        block = re.search(rf"struct {family} {{(.*?)}};", header, re.S).group(1)
        consts = dict((k, int(v)) for k, v in re.findall(r"k(\w+) = (\d+)", block))
        names = ["".join(w.capitalize() for w in r.split("_")) for r in rows]
        assert [consts[n] for n in names] == list(range(len(rows))) and consts["Rows"] == len(rows)
    ext = _backends.cpu_ext()
    if ext is not None:
        assert ext.TABLE["chunk"] == CHUNK
        assert list(ext.TABLE["adam"]) == list(range(len(ADAM_ROWS) + 1))
        assert list(ext.TABLE["sgd"]) == list(range(len(SGD_ROWS) + 1))
        assert tuple(ext.ADAM_HYPER_FIELDS) == AdamHyper._fields
        assert tuple(ext.SGD_HYPER_FIELDS) == SgdHyper._fields


@pytest.mark.skipif(_backends.cpu_ext() is None, reason="CPU extension not built")
@pytest.mark.parametrize("cls,kw", [(fo.AdamW, {"lr": 0.1}), (fo.SGD, {"lr": 0.1, "momentum": 0.9})])
def test_cpu_plans_read_hyper_records_by_position_or_by_name(cls, kw):
    """The C++ plans read an AdamHyper/SgdHyper by position; any other record
    by field name (the same step), and one that lacks a field raises instead
    of shifting values."""
    from types import SimpleNamespace
    params = [torch.tensor([1.0, -2.0, 3.0], requires_grad=True) for _ in range(2)]
    plans = []
    for p in params:
        p.grad = torch.tensor([0.5, 0.25, -1.0])
        opt = cls([p], backend="cpu", **kw)
        opt.step()
        plans.append((opt._plans()[0].buckets[0], opt._family.hyper(opt.param_groups[0], opt.grad_multiplier, 0)))
    (by_position, record), (by_name, _) = plans
    assert by_position.step(record, None, None, 0.0) == 1
    assert by_name.step(SimpleNamespace(**record._asdict()), None, None, 0.0) == 1
    assert torch.equal(params[0].detach(), params[1].detach())
    with pytest.raises(AttributeError):
        by_name.step(SimpleNamespace(**{k: v for k, v in record._asdict().items() if k != "lr"}), None, None, 0.0)
    with pytest.raises(AttributeError):  # a tuple of another length is not read by position
        by_name.step(tuple(record)[:-1], None, None, 0.0)


def test_kernels_are_leaves():
    """fasttricks/kernels/*.py import nothing from fasttricks.ops (the plans receive their launch functions)."""
    for path in (ROOT / "fasttricks" / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module] + \
                   [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.startswith(("fasttricks.ops", "fasttricks.optim"))], path.name
