"""Stochastic rounding and bf16 optimizer state (NOTE [stochastic rounding],
docs/precision.md): the rounding is unbiased, the same bits on every backend,
keeps small updates that round-to-nearest loses, and survives checkpoints,
found_inf and the fused averaging."""
import copy

import pytest
import torch

from helpers import BACKENDS
from fasttricks import optim as fo
from fasttricks._backends import triton_interpreting
from fasttricks.ops import rounding as R
from fasttricks.sampling import EMA

LOW = [torch.bfloat16, torch.float16]


def _rounded_mean(x, dtype, n_keys):
    total = torch.zeros_like(x, dtype=torch.float64)
    for k in range(n_keys):
        key = R.tensor_key(R.step_key(123, k), 7)
        r16 = R.half_bits(R.random_bits(key, R.element_index(x), 0), R.LOW_BITS)
        total += R.stochastic_round(x, dtype, r16).double()
    return total / n_keys


@pytest.mark.parametrize("dtype", LOW)
def test_rounding_is_unbiased(dtype):
    torch.manual_seed(0)
    # normal values of both signs, and (fp16) values in its subnormal range
    x = torch.cat([torch.rand(512) + 1.0, -(torch.rand(512) * 3 + 0.5), torch.rand(256) * 6e-5])
    mantissa, smallest = (7, 2.0 ** -133) if dtype == torch.bfloat16 else (10, 2.0 ** -24)
    ulp = torch.ldexp(torch.ones_like(x, dtype=torch.float64), torch.frexp(x.double()).exponent - 1 - mantissa)
    ulp = ulp.clamp_min(smallest)
    mean = _rounded_mean(x, dtype, 1024)
    # each rounding errs by less than one ulp with mean 0: the mean of 1024 is within 6 / (2 sqrt(1024)) ulp
    assert ((mean - x.double()).abs() / ulp).max() < 0.1
    # and each rounding lands on one of the two neighbours of x
    assert ((mean - x.double()).abs() < ulp).all()


def test_rounding_special_values():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0, -2.0])
    r16 = torch.full((6,), 0xFFFF, dtype=torch.int64)
    for dtype in LOW:
        y = R.stochastic_round(x, dtype, r16).float()
        assert torch.isnan(y[0]) and y[1] == float("inf") and y[2] == -float("inf")
        assert y[3] == 0 and y[4] == 1 and y[5] == -2  # representable values stay put
    tiny = torch.full((4096,), 1e-42)  # positive in fp32, below the smallest bf16
    r16 = R.half_bits(R.random_bits(5, R.element_index(tiny), 1), R.LOW_BITS)
    assert (R.stochastic_round(tiny, torch.bfloat16, r16, positive_floor=True).float() > 0).all()
    assert (R.stochastic_round(tiny, torch.bfloat16, r16).float() == 0).any()


def _train(backend, cls, dtype, steps=3, seed=0, **kw):
    torch.manual_seed(1)
    params = [torch.randn(s, dtype=dtype).requires_grad_() for s in [(37,), (64, 65), (3,), (4099,)]]
    opt = cls(params, backend=backend, rounding_seed=seed, **kw)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype)
        opt.step()
    return params, opt


# Hyper-parameters exact in fp32: Triton receives lr, weight decay and
# dampening as fp32 where the C++ plans and the reference take doubles
# (docs/precision.md); with these every backend computes the same fp32 bits.
LR, WD = 2.0 ** -10, 2.0 ** -4
CONFIGS = [
    (fo.AdamW, dict(lr=LR, weight_decay=WD, stochastic_rounding=True)),
    (fo.Adam, dict(lr=LR, amsgrad=True, weight_decay=WD, stochastic_rounding=True, state_dtype=torch.bfloat16)),
    (fo.AdamW, dict(lr=LR, weight_decay=WD, betas=(0.5, 0.75), eps=2.0 ** -20, stochastic_rounding=True,
                    state_dtype=torch.float32)),
    (fo.SGD, dict(lr=LR, momentum=0.9, stochastic_rounding=True)),
    (fo.SGD, dict(lr=LR, momentum=0.5, nesterov=True, stochastic_rounding=True, state_dtype=torch.float32)),
    (fo.SGDW, dict(lr=LR, weight_decay=WD, stochastic_rounding=True)),
]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("cls,kw", CONFIGS, ids=lambda c: getattr(c, "__name__", None) or
                         ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", LOW)
def test_same_bits_on_every_backend(backend, cls, kw, dtype):
    ref, ref_opt = _train("reference", cls, dtype, **kw)
    ours, opt = _train(backend, cls, dtype, **kw)
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        for k, v in ref_opt.state[q].items():
            assert v.dtype == opt.state[p][k].dtype and torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_state_from_fp32_params(backend):
    """fp32 params with bf16 moments: the moments round stochastically, the params are exact fp32."""
    kw = dict(lr=LR, weight_decay=WD, betas=(0.5, 0.75), eps=2.0 ** -20, stochastic_rounding=True,
              state_dtype=torch.bfloat16)
    ref, ref_opt = _train("reference", fo.AdamW, torch.float32, **kw)
    ours, opt = _train(backend, fo.AdamW, torch.float32, **kw)
    for p, q in zip(ours, ref):
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_to_nearest_stalls_and_stochastic_rounding_tracks_fp32(backend):
    """Updates of lr * g = 1e-4 at w = 1 are below half a bf16 ulp (2^-8): to
    nearest the weights never move; stochastically they follow fp32 on average."""
    n, steps, lr = 4096, 100, 1e-4

    def final(dtype, **kw):
        w = torch.ones(n, dtype=dtype, requires_grad=True)
        opt = fo.SGD([w], lr=lr, backend=backend, **kw)
        for _ in range(steps):
            w.grad = torch.ones_like(w)
            opt.step()
        return w.detach().double()

    if not (backend == "triton" and triton_interpreting()):  # the interpreter truncates 16-bit stores
        assert torch.equal(final(torch.bfloat16), torch.ones(n, dtype=torch.float64))
    fp32 = final(torch.float32).mean().item()
    assert abs(fp32 - (1 - steps * lr)) < 1e-5
    # per element the rounding noise has std <= ulp/2 per step: the mean over n
    # elements is within 6 sigma of fp32, for every seed
    tol = 6 * (steps ** 0.5) * (2 ** -8) / n ** 0.5
    means = [final(torch.bfloat16, stochastic_rounding=True, rounding_seed=s).mean().item() for s in range(3)]
    assert all(abs(m - fp32) < tol for m in means), (means, fp32, tol)
    assert len(set(means)) == 3  # the seed matters


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_with_bf16_state_tracks_fp32(backend):
    torch.manual_seed(0)
    w0 = torch.randn(8192)
    grads = [torch.randn(8192) * 0.1 + 0.05 for _ in range(30)]

    def final(dtype, **kw):
        w = w0.to(dtype, copy=True).requires_grad_()
        opt = fo.AdamW([w], lr=1e-4, weight_decay=0.0, backend=backend, **kw)
        for g in grads:
            w.grad = g.to(dtype)
            opt.step()
        return w.detach().double() - w0.to(dtype).double()

    fp32 = final(torch.float32)
    sr = final(torch.bfloat16, stochastic_rounding=True, state_dtype=torch.bfloat16)
    assert abs(sr.mean() - fp32.mean()) < 0.05 * abs(fp32.mean())
    if not (backend == "triton" and triton_interpreting()):  # the interpreter truncates 16-bit stores
        # round-to-nearest loses most of the 30 updates of ~1e-4; rounding stochastically keeps them on average
        rtn = final(torch.bfloat16)
        assert abs(rtn.mean() - fp32.mean()) > 0.5 * abs(fp32.mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_changes_nothing(backend):
    params, opt = _train(backend, fo.AdamW, torch.bfloat16, lr=1e-3, stochastic_rounding=True,
                         state_dtype=torch.bfloat16)
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    for p in params:
        p.grad = torch.ones_like(p)
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state.items())


def test_seed_is_saved_and_a_resume_continues_bit_for_bit():
    params, opt = _train("reference", fo.AdamW, torch.bfloat16, steps=2, seed=42, lr=1e-3,
                         stochastic_rounding=True, state_dtype=torch.bfloat16)
    sd = copy.deepcopy(opt.state_dict())  # as a checkpoint file holds it (no tensor shared with opt)
    # NOTE [state-resident extras]: on the first param's state, where DCP and the frameworks carry them
    assert (sd["state"][0]["rounding/seed"], sd["state"][0]["rounding/step"]) == (42, 2)
    assert all("rounding/seed" not in s for i, s in sd["state"].items() if i != 0)
    clones = [p.detach().clone().requires_grad_() for p in params]
    resumed = fo.AdamW(clones, lr=1e-3, stochastic_rounding=True, state_dtype=torch.bfloat16)
    resumed.load_state_dict(sd)
    assert resumed.rounding_seed == 42
    assert resumed.state[clones[0]]["exp_avg"].dtype == torch.bfloat16  # kept as stored
    for ps, o in ((params, opt), (clones, resumed)):
        for p in ps:
            p.grad = torch.full_like(p, 1e-3)
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(params, clones))
    # a plain optimizer has no rounding entry: torch's layout
    plain = fo.AdamW([torch.zeros(2, requires_grad=True)])
    plain.param_groups[0]["params"][0].grad = torch.ones(2)
    plain.step()
    assert sorted(plain.state_dict()["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]


def test_rounding_counters_of_an_earlier_version_still_load():
    params, opt = _train("reference", fo.AdamW, torch.bfloat16, steps=2, seed=42, lr=1e-3,
                         stochastic_rounding=True, state_dtype=torch.bfloat16)
    sd = copy.deepcopy(opt.state_dict())
    for state in sd["state"].values():
        state.pop("rounding/seed", None), state.pop("rounding/step", None)
    sd["fasttricks_rounding"] = {"seed": 42, "step": 2}  # where earlier versions kept them
    resumed = fo.AdamW([p.detach().clone().requires_grad_() for p in params], lr=1e-3, stochastic_rounding=True,
                       state_dtype=torch.bfloat16)
    resumed.load_state_dict(sd)
    assert (resumed.rounding_seed, resumed._ft_round_step) == (42, 2)


def test_checkpoints_both_ways_with_torch():
    params, opt = _train("reference", fo.AdamW, torch.bfloat16, lr=1e-3, stochastic_rounding=True,
                         state_dtype=torch.bfloat16)
    peer = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], lr=1e-3)
    peer.load_state_dict(opt.state_dict())  # ours -> torch: bf16 moments, as torch keeps bf16 params' state
    assert peer.state[peer.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.bfloat16
    # torch (fp32 params, fp32 state) -> ours with bf16 state: converted once, on load
    fp32 = [torch.randn(5, requires_grad=True)]
    t = torch.optim.AdamW(fp32, lr=1e-3)
    fp32[0].grad = torch.randn(5)
    t.step()
    ours = fo.AdamW([fp32[0].detach().clone().requires_grad_()], lr=1e-3, stochastic_rounding=True,
                    state_dtype=torch.bfloat16)
    ours.load_state_dict(t.state_dict())
    p = ours.param_groups[0]["params"][0]
    p.grad = torch.randn(5)
    ours.step()
    assert ours.state[p]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_ema_keeps_fp32_averages(backend):
    params, opt = _train(backend, fo.AdamW, torch.bfloat16, steps=1, lr=1e-3, stochastic_rounding=True,
                         state_dtype=torch.bfloat16)
    ema = EMA(opt, decay=0.99)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        opt.step()
    assert all(a.dtype == torch.float32 for a in ema.averages)


def test_bad_precision_options():
    p = [torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)]
    with pytest.raises(ValueError, match="choose one"):
        fo.AdamW(p, master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="state_dtype"):
        fo.SGD(p, lr=0.1, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="master_weights"):
        fo.Adam(p, master_weights=True, state_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="rounding_seed"):
        fo.AdamW(p, stochastic_rounding=True, rounding_seed=1.5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_tiny_second_moments_stay_positive_and_agree(backend):
    """exp_avg_sq of ~1e-42 (an fp32 subnormal, below the smallest bf16): never
    rounded to 0, and the same bits on every backend."""
    kw = dict(lr=LR, betas=(0.5, 0.75), eps=2.0 ** -20, stochastic_rounding=True, state_dtype=torch.bfloat16)
    runs = []
    for b in ("reference", backend):
        w = torch.ones(4099, dtype=torch.bfloat16, requires_grad=True)
        opt = fo.Adam([w], backend=b, **kw)
        u = torch.rand(4099, generator=torch.Generator().manual_seed(0)) + 0.5
        w.grad = (u * 4e-21).to(w.dtype)  # (1 - 0.75) g^2: 1e-42 to 1e-41, positive in fp32
        opt.step()
        runs.append((w.detach().clone(), opt.state[w]["exp_avg_sq"].clone()))
    (w_ref, v_ref), (w_ours, v_ours) = runs
    assert (v_ref.float() > 0).all() and torch.equal(v_ours, v_ref) and torch.equal(w_ours, w_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_divides_before_rounding(backend):
    """GradScaler's grad_scale: a step on scaled grads equals the step on the
    unscaled ones, bits included (the scale is a power of two)."""
    runs = []
    for scale in (None, 2.0 ** 12):
        w = torch.linspace(-2, 2, 4099, dtype=torch.bfloat16).requires_grad_()
        opt = fo.AdamW([w], lr=LR, weight_decay=WD, backend=backend, stochastic_rounding=True,
                       state_dtype=torch.bfloat16)
        g = torch.linspace(1, -1, 4099) * 1e-3
        w.grad = (g * (scale or 1.0)).to(torch.bfloat16)
        if scale:
            opt.grad_scale = torch.tensor(scale)
        opt.step()
        runs.append(w.detach().clone())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pswa_reassignment_with_rounded_bf16_params(backend):
    """PSWA samples fp32 averages of bf16 params stepped with stochastic
    rounding, and its epoch-end reassignment writes them into the params."""
    from fasttricks.sampling import PSWA

    model = torch.nn.Linear(4099, 1, bias=False).to(torch.bfloat16)
    w = model.weight
    opt = fo.SGD(model.parameters(), lr=LR, momentum=0.5, backend=backend, stochastic_rounding=True)
    pswa = PSWA(opt, 4, alpha=1.0, seed=0)
    for _ in range(4):
        w.grad = torch.full_like(w, 1e-3)
        opt.step()
    assert pswa.averages[0].dtype == torch.float32
    avg = pswa.averages[0].clone()
    assert pswa.end_epoch(model=model)  # no BatchNorm: nothing to recalibrate
    assert torch.equal(w.detach(), avg.to(torch.bfloat16))
