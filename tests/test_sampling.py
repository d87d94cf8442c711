"""Weight sampling (docs/sampling.md): each method's average against its formula
over a recorded weight trajectory, against torch.optim.swa_utils where torch
has the method, fused vs post-hook on every backend, master weights, resume,
found_inf, evaluation swaps and checkpoints."""
import copy
import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import fasttricks
from fasttricks.ops.host_flag import DeferredFlag
from fasttricks.sampling import EMA, PSWA, PSWM, PWALKS, SWA, BachBatch, BachEpoch
from helpers import BACKENDS, make_params

SMALL = [(), (3, 5), (7,), (33,)]
B = 7  # steps per epoch: odd, so strides differ in length
PATHS = ["fused", "hook"]


def grad_stream(shapes, seed=3):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def make_run(backend, path, sampler_fn, dtype=torch.float32, master=False, shapes=SMALL, opt_cls=None):
    params = make_params(shapes, dtype)
    if opt_cls is None:
        opt = fasttricks.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3, backend=backend,
                                   master_weights=master)
    else:
        opt = opt_cls(params)
    sampler = sampler_fn(opt, path)
    assert sampler.fused == (path == "fused")
    return params, opt, sampler


def train_epochs(params, opt, sampler, epochs, steps=B, grads=None, weights=None):
    """Trains, recording per epoch: the weights after each step (fp64), the
    averages just before end_epoch, and the params just after it."""
    grads = grads or grad_stream([p.shape for p in params])
    weights = weights or (lambda: params)
    record = []
    for _ in range(epochs):
        traj = []
        for _ in range(steps):
            for p, g in zip(params, next(grads)):
                p.grad = g.to(p.dtype)
            opt.step()
            traj.append([w.detach().double().clone() for w in weights()])
        before = [a.double().clone() for a in sampler.averages]
        sampler.end_epoch()
        record.append((traj, before, [p.detach().clone() for p in params]))
    return record


def mean_of(traj, steps, weights=None):
    """Weighted mean of the recorded weights at 1-based `steps`."""
    weights = weights or [1.0] * len(steps)
    total = sum(weights)
    return [sum(w * traj[s - 1][k] for s, w in zip(steps, weights)) / total for k in range(len(traj[0]))]


def assert_avg(actual, expected, atol=2e-6):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, rtol=2e-6, atol=atol)


def sampler_factory(cls, **kw):
    return lambda opt, path: cls(opt, fused=None if path == "fused" else False, **kw)


# ---- each method against its formula --------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_pswa_is_the_mean_of_one_sample_per_stride(backend, path):
    params, opt, s = make_run(backend, path, sampler_factory(PSWA, steps_per_epoch=B, alpha=0.5, seed=4))
    schedules = []
    for epoch in range(2):
        schedules.append(sorted(s.schedule))
        (traj, before, after), = train_epochs(params, opt, s, 1)
        n = math.ceil(0.5 * B)
        assert len(schedules[-1]) == n
        for k, step in enumerate(schedules[-1]):  # exactly one inside each of n equal strides
            assert k * B // n < step <= (k + 1) * B // n
        assert_avg(before, mean_of(traj, schedules[-1]))
        assert_avg(after, before)  # reassigned at epoch end
    assert schedules[0] != schedules[1] or B == 1  # drawn anew each epoch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_pwalks_averages_the_last_ceil_kb_steps(backend, path):
    params, opt, s = make_run(backend, path, sampler_factory(PWALKS, steps_per_epoch=B, k=0.3))
    for traj, before, after in train_epochs(params, opt, s, 2):
        assert_avg(before, mean_of(traj, [5, 6, 7]))  # ceil(0.3 * 7) = 3
        assert_avg(after, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["pwalks_k0", "pswm_m1"])
def test_degenerate_settings_are_plain_training_exactly(backend, method):
    make = {"pwalks_k0": sampler_factory(PWALKS, steps_per_epoch=B, k=0.0),
            "pswm_m1": sampler_factory(PSWM, steps_per_epoch=B, m=1.0, alpha=1.0)}[method]
    params, opt, s = make_run(backend, "fused", make)
    train_epochs(params, opt, s, 2)
    plain = make_params(SMALL, torch.float32)
    plain_opt = fasttricks.optim.SGD(plain, lr=0.05, momentum=0.9, weight_decay=1e-3, backend=backend)
    grads = grad_stream(SMALL)
    for _ in range(2 * B):
        for p, g in zip(plain, next(grads)):
            p.grad = g.float()
        plain_opt.step()
    for a, b in zip(params, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_pswm_is_an_exponential_running_weight_reset_each_epoch(backend, path):
    m = 0.3
    params, opt, s = make_run(backend, path, sampler_factory(PSWM, steps_per_epoch=B, m=m, alpha=0.6, seed=1))
    for _ in range(2):
        schedule = sorted(s.schedule)
        (traj, before, after), = train_epochs(params, opt, s, 1)
        expected = traj[schedule[0] - 1]
        for step in schedule[1:]:
            expected = [(1 - m) * e + m * w for e, w in zip(expected, traj[step - 1])]
        assert_avg(before, expected)
        assert_avg(after, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", ["BachEpoch", "BachBatch"])
def test_bach_baselines_weight_the_t_th_sample_by_t(backend, path, variant):
    cls = {"BachEpoch": BachEpoch, "BachBatch": BachBatch}[variant]
    params, opt, s = make_run(backend, path, sampler_factory(cls, steps_per_epoch=B))
    record = train_epochs(params, opt, s, 2)
    # Reassignment changes the params, so the samples are the recorded weights.
    samples = []
    for traj, before, after in record:
        samples += [traj[-1]] if variant == "BachEpoch" else traj
        expected = mean_of(samples, range(1, len(samples) + 1), weights=list(range(1, len(samples) + 1)))
        assert_avg(before, expected, atol=1e-5)
        assert_avg(after, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("every_step", [False, True])
def test_swa_equals_torch_averaged_model(backend, path, every_step):
    params, opt, s = make_run(backend, path, sampler_factory(SWA, steps_per_epoch=B, start_epoch=1,
                                                             every_step=every_step))
    module = torch.nn.ParameterList(params)
    swa = AveragedModel(module)
    grads = grad_stream(SMALL)
    for epoch in range(3):
        for _ in range(B):
            for p, g in zip(params, next(grads)):
                p.grad = g.float()
            opt.step()
            if every_step and epoch >= 1:
                swa.update_parameters(module)
        if not every_step and epoch >= 1:
            swa.update_parameters(module)
        assert not s.end_epoch()  # the params stay until assign()
    assert_avg(s.averages, [p.detach().double() for p in swa.module.parameters()])
    live = [p.detach().clone() for p in params]
    s.assign()
    for p, a in zip(params, s.averages):
        assert torch.equal(p, a)
    assert not any(torch.equal(p, q) for p, q in zip(params, live) if p.numel() > 1)


def test_swa_samples_a_short_epoch_at_end_epoch():
    params, opt, s = make_run("reference", "fused", sampler_factory(SWA, steps_per_epoch=B))
    (traj, before, _), = train_epochs(params, opt, s, 1, steps=B - 2)  # the epoch ended early
    assert s.total_samples == 1
    assert_avg([a.double() for a in s.averages], traj[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_ema_equals_torch_averaged_model_ema(backend, path):
    params, opt, s = make_run(backend, path, sampler_factory(EMA, decay=0.8))
    module = torch.nn.ParameterList(params)
    ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    grads = grad_stream(SMALL)
    for _ in range(10):
        for p, g in zip(params, next(grads)):
            p.grad = g.float()
        opt.step()
        ema.update_parameters(module)
    assert_avg(s.averages, [p.detach().double() for p in ema.module.parameters()])


@pytest.mark.parametrize("path", PATHS)
def test_ema_warmup_and_every(path):
    params, opt, s = make_run("reference", path, sampler_factory(EMA, decay=0.95, every=2, warmup=True))
    init = [p.detach().double().clone() for p in params]  # the average starts as the weights
    (traj, before, _), = train_epochs(params, opt, s, 1, steps=9)
    expected = init
    for t, step in enumerate([2, 4, 6, 8]):
        d = min(0.95, (1 + t) / (10 + t))
        expected = [e + (1 - d) * (w - e) for e, w in zip(expected, traj[step - 1])]
    assert_avg(before, expected)


# ---- fused vs hook, master weights, torch optimizers ------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [PSWA, EMA])
def test_fused_and_hook_paths_agree(backend, cls):
    kw = {"steps_per_epoch": B} if cls is PSWA else {"decay": 0.7}
    runs = []
    for path in PATHS:
        params, opt, s = make_run(backend, path, sampler_factory(cls, **kw))
        train_epochs(params, opt, s, 2)
        runs.append((params, s.averages))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_bf16_master_weights_average_the_fp32_master(backend, path):
    params, opt, s = make_run(backend, path, sampler_factory(PWALKS, steps_per_epoch=B, k=0.5),
                              dtype=torch.bfloat16, master=True)
    masters = lambda: [opt.state[p]["master_param"] for p in params]  # noqa: E731
    (traj, before, after), = train_epochs(params, opt, s, 1, weights=masters)
    assert all(a.dtype == torch.float32 for a in s.averages)
    assert_avg(before, mean_of(traj, [4, 5, 6, 7]))
    for p, a in zip(params, before):  # reassignment: fp32 master = average, param = it rounded
        assert torch.equal(opt.state[p]["master_param"], a.float())
        assert torch.equal(p, a.to(torch.bfloat16))


def test_any_torch_optimizer_via_post_hook():
    params, opt, s = make_run(None, "hook", sampler_factory(PWALKS, steps_per_epoch=B, k=0.3),
                              opt_cls=lambda ps: torch.optim.AdamW(ps, lr=0.01))
    for traj, before, after in train_epochs(params, opt, s, 2):
        assert_avg(before, mean_of(traj, [5, 6, 7]))
        assert_avg(after, before)
    with pytest.raises(RuntimeError, match="fused=True"):
        PSWA(opt, B, fused=True)


# ---- found_inf, resume, checkpoints ------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("deferred", [False, True], ids=["host", "deferred"])
def test_found_inf_step_samples_nothing(backend, path, deferred, monkeypatch):
    """`deferred` plays a GPU: found_inf's host copy is not ready when the step
    ends, so the step itself must not read it (NOTE [deferred found_inf])."""
    reads = []
    if deferred:
        monkeypatch.setattr(DeferredFlag, "ready", lambda self: False)
        is_set = DeferredFlag.is_set
        monkeypatch.setattr(DeferredFlag, "is_set", lambda self: reads.append(1) or is_set(self))
    params, opt, s = make_run(backend, path, sampler_factory(PSWA, steps_per_epoch=B, alpha=1.0))
    train_epochs(params, opt, s, 0)
    grads = grad_stream(SMALL)
    for _ in range(2):
        for p, g in zip(params, next(grads)):
            p.grad = g.float()
        opt.step()
    live = [p.detach().clone() for p in params]
    avgs = [a.clone() for a in s.averages]
    opt.found_inf = torch.ones(())
    opt.grad_scale = torch.ones(())
    opt.step()
    del opt.found_inf, opt.grad_scale
    assert not reads  # read when the count is next needed, not by the step
    assert (s.step_in_epoch, s.samples) == (3, 2)  # the batch is counted, the sample is not
    assert len(reads) == deferred
    for a, b in zip(params + s.averages, live + avgs):
        assert torch.equal(a, b)
    for p, g in zip(params, next(grads)):
        p.grad = g.float()
    opt.step()  # the running mean goes on as 1/3: the skipped step left no trace
    assert s.samples == 3


@pytest.mark.parametrize("path", PATHS)
def test_resume_mid_epoch_is_bit_identical(path):
    def build():
        params = make_params(SMALL, torch.float32)
        opt = fasttricks.optim.AdamW(params, lr=0.01, backend="cpu" if "cpu" in BACKENDS else "reference")
        samplers = [PSWA(opt, B, alpha=0.5, seed=9, fused=None if path == "fused" else False),
                    EMA(opt, decay=0.9)]
        return params, opt, samplers

    def steps(params, opt, samplers, grads, n, start):
        for k in range(start, start + n):
            for p, g in zip(params, next(grads)):
                p.grad = g.float()
            opt.step()
            if (k + 1) % B == 0:
                samplers[0].end_epoch()

    grads = grad_stream(SMALL)
    ref = build()
    steps(*ref, grads, 2 * B + 3, 0)
    grads = grad_stream(SMALL)
    first = build()
    steps(*first, grads, B + 4, 0)
    ckpt = copy.deepcopy({"params": [p.detach() for p in first[0]], "opt": first[1].state_dict()})
    resumed = build()
    with torch.no_grad():
        for p, q in zip(resumed[0], ckpt["params"]):
            p.copy_(q)
    resumed[1].load_state_dict(ckpt["opt"])
    assert resumed[2][0].step_in_epoch == 4 and resumed[2][0].epoch == 1
    steps(*resumed, grads, B - 1, B + 4)
    for a, b in zip(resumed[0] + resumed[2][0].averages + resumed[2][1].averages,
                    ref[0] + ref[2][0].averages + ref[2][1].averages):
        assert torch.equal(a, b)


def test_sampler_state_dict_round_trip_and_config_check():
    params, opt, s = make_run("reference", "fused", sampler_factory(PSWA, steps_per_epoch=B, alpha=0.5))
    train_epochs(params, opt, s, 1)
    state = copy.deepcopy(s.state_dict())
    s.detach()
    other = PSWA(opt, B, alpha=0.5)
    other.load_state_dict(state)
    assert other.epoch == 1 and other.schedule == s.schedule
    assert all(torch.equal(a, b) for a, b in zip(other.averages, s.averages))
    with pytest.raises(ValueError, match="alpha"):
        PSWA(opt, B, alpha=0.25, fused=False).load_state_dict(state)
    with pytest.raises(ValueError, match="EMA"):
        EMA(opt).load_state_dict(state)


def test_averaged_parameters_swaps_and_restores_exactly():
    params, opt, s = make_run("reference", "fused", sampler_factory(EMA, decay=0.5))
    train_epochs(params, opt, s, 1, steps=4)
    live = [p.detach().clone() for p in params]
    with s.averaged_parameters():
        for p, a in zip(params, s.averages):
            assert torch.equal(p, a)
    for p, q in zip(params, live):
        assert torch.equal(p, q)
    target = [torch.zeros_like(p) for p in params]
    s.copy_to(target)
    assert all(torch.equal(t, a) for t, a in zip(target, s.averages))
    with pytest.raises(ValueError, match="copy_to"):
        s.copy_to(target[:-1])


def test_detach_stops_sampling():
    params, opt, s = make_run("reference", "fused", sampler_factory(EMA, decay=0.5))
    s.detach()
    before = [a.clone() for a in s.averages]
    train_epochs(params, opt, s, 1, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(s.averages, before))
    assert EMA(opt).fused  # the fused slot is free again


@pytest.mark.parametrize("make, message", [
    (lambda opt: PSWA(opt, 0), "steps_per_epoch"),
    (lambda opt: PSWA(opt, 10, alpha=0.0), "alpha"),
    (lambda opt: PSWA(opt, 10, alpha=1.5), "alpha"),
    (lambda opt: PWALKS(opt, 10, k=-0.1), "k must"),
    (lambda opt: PSWM(opt, 10, m=0.0), "m must"),
    (lambda opt: SWA(opt, 10, start_epoch=-1), "start_epoch"),
    (lambda opt: EMA(opt, decay=1.0), "decay"),
    (lambda opt: EMA(opt, every=0), "every"),
])
def test_bad_hyper_parameters_raise(make, message):
    opt = fasttricks.optim.SGD(make_params(SMALL, torch.float32), lr=0.1)
    with pytest.raises(ValueError, match=message):
        make(opt)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        EMA(object())


# ---- BatchNorm recalibration ----------------------------------------------------------


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 6), torch.nn.BatchNorm1d(6))


def bn_loader(n=6):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(5, 3, 6, 6, generator=g), torch.zeros(5)) for _ in range(n)]


def bn_stats(model):
    return [t.clone() for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


@pytest.mark.parametrize("fraction, batches", [(1.0, 6), (0.5, 3), (0.1, 1)])
def test_recalibrate_bn_equals_a_reference_pass(fraction, batches):
    model, ref = bn_model(), bn_model()
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.3
    loader = bn_loader()
    used = fasttricks.sampling.recalibrate_bn(model, loader, fraction=fraction)
    torch.optim.swa_utils.update_bn(loader[:batches], ref)
    assert used == batches
    torch.testing.assert_close(bn_stats(model), bn_stats(ref), rtol=1e-6, atol=1e-6)
    assert not model.training and model[1].momentum == 0.3 and model[5].momentum == 0.1
    with pytest.raises(ValueError, match="fraction"):
        fasttricks.sampling.recalibrate_bn(model, loader, fraction=0.0)


def test_end_epoch_recalibrates_bn_after_reassignment():
    model = bn_model()
    opt = fasttricks.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, backend="reference")
    s = PWALKS(opt, steps_per_epoch=3, k=0.5)
    loader = bn_loader(3)
    for x, _ in loader:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert s.end_epoch(model=model, bn_loader=loader, bn_fraction=1.0)
    ref = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(loader, ref)
    torch.testing.assert_close(bn_stats(model), bn_stats(ref), rtol=1e-6, atol=1e-6)
