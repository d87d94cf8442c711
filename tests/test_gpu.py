"""The device paths on a CUDA GPU, for the triton and cuda backends: pointer
tables, device-side step counts, grad_scale and found_inf, compiled kernels.
The CPU tests check the same math on CPU tensors; without a CUDA device this
module is skipped as a whole (marker `gpu`)."""
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fasttricks import _backends
from fasttricks import optim as fo
from fasttricks.ops.mixup import mixup_blend, mixup_blend_reference
from fasttricks.sampling import EMA
from helpers import SHAPES, assert_close_rule, assert_param_is_rounded_master, clone_params, make_grads, make_params, max_err, rule_factor, run, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
# Past the GPU chunk (4096) and with many tensors, as on the CPU.
GPU_SHAPES = SHAPES + [(1000, 37)] + [(i % 7 + 1,) for i in range(150)]


def gpu_backends():
    if not torch.cuda.is_available():
        return []
    return [b for b in ("triton", "cuda") if _backends.available(b, CUDA) is None]


GPU_BACKENDS = gpu_backends()

CASES = [
    pytest.param(fo.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True), id="Adam-amsgrad"),
    pytest.param(fo.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), id="AdamW"),
    pytest.param(fo.AdamW, torch.optim.AdamW, dict(lr=1e-2, maximize=True), id="AdamW-maximize"),
    pytest.param(fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
                 id="SGD-nesterov"),
    pytest.param(fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3), id="SGD-dampening"),
]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cls,tcls,cfg", CASES)
def test_matches_torch_on_cuda(backend, dtype, cls, tcls, cfg):
    steps = make_grads(GPU_SHAPES, 4)
    base = make_params(GPU_SHAPES, dtype, device=CUDA)
    ours, _ = train(lambda ps: cls(ps, backend=backend, **cfg), base, steps)
    peer, _ = train(lambda ps: tcls(ps, foreach=False, **cfg), base, steps)
    truth, _ = train(lambda ps: tcls(ps, foreach=False, **cfg), base, steps, torch.float64)
    assert ours[0].device == base[0].device
    assert max_err(ours, base) > 1e-3
    assert_close_rule(ours, peer, truth, factor=rule_factor(backend, dtype))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_master_weights_on_cuda(backend):
    """bf16 params with fp32 master weights follow torch's fp32 AdamW on an fp32
    copy (fed the same bf16 grads), and each param is its master rounded."""
    steps = [[g.to(torch.bfloat16).double() for g in gs] for gs in make_grads(GPU_SHAPES, 3)]
    base = make_params(GPU_SHAPES, torch.bfloat16, device=CUDA)
    params, opt = train(lambda ps: fo.AdamW(ps, lr=1e-2, master_weights=True, backend=backend), base, steps)
    fp32, _ = train(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), base, steps, torch.float32)
    masters = [opt.state[p]["master_param"] for p in params]
    assert max_err(masters, fp32) < 1e-5
    assert_param_is_rounded_master(backend, params, masters, torch.bfloat16)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cls,tcls,cfg", CASES[1:4])
def test_found_inf_and_grad_scale_on_device(backend, cls, tcls, cfg):
    """found_inf and grad_scale stay on the device: a flagged step changes
    nothing (step counts included), an unflagged one unscales the grads."""
    steps = make_grads(GPU_SHAPES, 3)
    base = make_params(GPU_SHAPES, torch.float32, device=CUDA)
    params, opt = train(lambda ps: cls(ps, backend=backend, **cfg), base, steps[:2])
    before = [p.detach().clone() for p in params]
    def state():
        return [v.clone() for p in params for v in opt.state[p].values() if torch.is_tensor(v)]

    saved = state()
    opt.grad_scale = torch.tensor(1024.0, device=CUDA)
    opt.found_inf = torch.tensor(1.0, device=CUDA)
    run(opt, params, [[g * 1024 for g in steps[2]]])
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, params))
    assert all(torch.equal(a, b) for a, b in zip(saved, state()))
    opt.found_inf = torch.tensor(0.0, device=CUDA)
    run(opt, params, [[g * 1024 for g in steps[2]]])
    peer, _ = train(lambda ps: tcls(ps, foreach=False, **cfg), base, steps)
    assert max_err(params, peer) < 1e-5


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradscaler_amp_end_to_end(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(CUDA)
    ref = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(CUDA)
    ref.load_state_dict(model.state_dict())
    opt = fo.AdamW(model.parameters(), lr=1e-3, backend=backend)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**20), torch.amp.GradScaler("cuda", init_scale=2.0**20)]
    for i in range(8):
        x = torch.randn(16, 32, device=CUDA)
        for net, o, scaler in ((model, opt, scalers[0]), (ref, ref_opt, scalers[1])):
            o.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = net(x).float().square().mean()
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert max_err(list(model.parameters()), list(ref.parameters())) < 1e-4


@pytest.mark.parametrize("fused", [None, True], ids=["scaler unscales", "fused unscale"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradscaler_skips_an_overflow_on_cuda(backend, fused):
    """NOTE [found_inf contract] on the device: an fp16 overflow changes nothing,
    whether the scaler skips the call (default) or the kernel skips the step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 8).to(CUDA)
    opt = fo.AdamW(model.parameters(), lr=1e-3, backend=backend, fused=fused)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    x = torch.randn(16, 32, device=CUDA)
    scaler.scale(model(x).square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.weight].items() if torch.is_tensor(v)}
    opt.zero_grad()
    scaler.scale(model(x).square().mean() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(v, opt.state[model.weight][k]) for k, v in state.items())
    assert scaler.get_scale() == 2.0**7


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_training_step_never_syncs(backend):
    """Issue #23: mixup, forward, the factored soft-target CE, backward,
    GradScaler (the fused unscale: the scaler's own skip reads found_inf on
    the host) and the step run under set_sync_debug_mode("error"); so does a
    step with a tensor lr on the host, the fused EMA under the scaler (its
    sample count reads found_inf later: NOTE [deferred found_inf]) and a
    fused EMA on SGD without a scaler."""
    from fasttricks.losses import soft_target_cross_entropy
    from fasttricks.mixup import Mixup

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).to(CUDA)
    opt = fo.AdamW(model.parameters(), lr=torch.tensor(1e-3), backend=backend, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    EMA(opt, decay=0.99)
    mixer = Mixup(mixup_alpha=0.4, cutmix_alpha=1.0, num_classes=10, seed=0)
    ema_params = make_params(GPU_SHAPES, torch.float32, device=CUDA)
    ema_opt = fo.SGD(ema_params, lr=0.05, momentum=0.9, backend=backend)
    EMA(ema_opt, decay=0.9)

    def step():
        x = torch.randn(16, 3, 8, 8, device=CUDA)
        y = torch.randint(0, 10, (16,), device=CUDA)
        x, target = mixer(x, y)
        with torch.autocast("cuda", dtype=torch.float16):
            logits = model(x)
        loss = soft_target_cross_entropy(logits.float(), target)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        for p in ema_params:
            p.grad = torch.ones_like(p)
        ema_opt.step()

    for _ in range(3):  # plans, state, the scaler's scale and the kernels' first compiles
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_clip_in_the_step_on_cuda(backend):
    """NOTE [clip in the step]: opt.clip_grad_norm_ then the step equals torch's
    clip_grad_norm_ then torch's AdamW, and under the fused unscale a clipped
    AMP step (with one overflow) runs under set_sync_debug_mode("error")."""
    torch.manual_seed(0)
    ours = make_params(GPU_SHAPES, torch.float32, device=CUDA)
    theirs = clone_params(ours)
    opt = fo.AdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for k in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        norm = opt.clip_grad_norm_(0.5)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(theirs, 0.5))
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)

    model = torch.nn.Linear(64, 10).to(CUDA)
    opt = fo.AdamW(model.parameters(), lr=1e-3, backend=backend, fused=True)
    scaler = torch.amp.GradScaler("cuda")

    def step(overflow=False):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(torch.randn(16, 64, device=CUDA)).float().square().mean()
        opt.zero_grad()
        scaler.scale(loss * (float("inf") if overflow else 1.0)).backward()
        opt.clip_grad_norm_(1.0)
        scaler.step(opt)
        scaler.update()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    before = [p.detach().clone() for p in model.parameters()]
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(overflow=True)
        after_overflow = [p.detach().clone() for p in model.parameters()]
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(a, b) for a, b in zip(after_overflow, before))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_ema_equals_averaged_model_on_cuda(backend):
    params = make_params(GPU_SHAPES, torch.float32, device=CUDA)
    opt = fo.SGD(params, lr=0.05, momentum=0.9, backend=backend)
    sampler = EMA(opt, decay=0.8)
    module = torch.nn.ParameterList(params)
    ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    for grads in make_grads(GPU_SHAPES, 6):
        for p, g in zip(params, grads):
            p.grad = g.float().to(CUDA)
        opt.step()
        ema.update_parameters(module)
    assert max_err(sampler.averages, list(ema.module.parameters())) < 1e-5


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8],
                         ids=["fp32", "bf16", "fp16", "uint8"])
@pytest.mark.parametrize("B", [1, 5, 8])
def test_mixup_blend_on_cuda(backend, dtype, B):
    g = torch.Generator().manual_seed(B)
    x = (torch.rand((B, 3, 17, 19), generator=g, dtype=torch.float64) * (255 if dtype == torch.uint8 else 4)).to(dtype)
    lam = torch.rand(B, generator=g)
    perm = torch.randperm(B, generator=g)
    for p in (None, perm):
        expected = mixup_blend_reference(x, lam, p)
        if p is None:
            out = x.to(CUDA)
            mixup_blend(out, lam.to(CUDA), inplace=True, backend=backend)
        else:
            out = mixup_blend(x.to(CUDA), lam.to(CUDA), p.to(CUDA), backend=backend)
        out = out.cpu()
        if dtype == torch.uint8:  # half up, on every backend
            assert torch.equal(out, expected)
        else:
            tol = torch.finfo(dtype).eps * 4 * max(1.0, expected.double().abs().max().item())
            assert (out.double() - expected.double()).abs().max().item() <= tol


def test_plans_follow_new_grad_tensors_on_cuda():
    """zero_grad(set_to_none=True) gives new grad tensors each step: the device
    pointer table must follow them (it is cached by pointer)."""
    if not GPU_BACKENDS:
        pytest.skip("no GPU backend built")
    base = make_params(GPU_SHAPES, torch.float32, device=CUDA)
    for backend in GPU_BACKENDS:
        params = clone_params(base)
        opt = fo.AdamW(params, lr=1e-2, backend=backend)
        peer_params = clone_params(base)
        peer = torch.optim.AdamW(peer_params, lr=1e-2, foreach=False)
        for grads in make_grads(GPU_SHAPES, 3):
            for o, ps in ((opt, params), (peer, peer_params)):
                o.zero_grad(set_to_none=True)
                for p, g in zip(ps, grads):
                    p.grad = g.float().to(CUDA)
                o.step()
        assert max_err(params, peer_params) < 1e-5


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("state_dtype", [None, torch.float32], ids=["16-bit state", "fp32 state"])
def test_stochastic_rounding_same_bits_as_the_cpu(backend, dtype, state_dtype):
    """NOTE [stochastic rounding]: with hyper-parameters exact in fp32 the GPU
    step writes the bits the reference writes on the CPU (tests/test_rounding.py
    holds the CPU backends to the same)."""
    kw = dict(lr=2.0 ** -10, weight_decay=2.0 ** -4, betas=(0.5, 0.75), eps=2.0 ** -20, amsgrad=True,
              stochastic_rounding=True, state_dtype=state_dtype, rounding_seed=7)
    base = make_params(GPU_SHAPES, dtype)
    grads = make_grads(GPU_SHAPES, 3)
    runs = []
    for device, b in (("cpu", "reference"), (CUDA, backend)):
        params = [p.detach().to(device).requires_grad_() for p in base]
        opt = fo.AdamW(params, backend=b, **kw)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.to(device=device, dtype=dtype)
            opt.step()
        runs.append(([p.detach().cpu() for p in params],
                     [opt.state[p]["exp_avg_sq"].cpu() for p in params if opt.state.get(p)]))
    (p_ref, v_ref), (p_gpu, v_gpu) = runs
    assert all(torch.equal(a, b) for a, b in zip(p_gpu, p_ref))
    assert all(torch.equal(a, b) for a, b in zip(v_gpu, v_ref))


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="needs the triton backend")
def test_stochastic_rounding_compiles_once_over_steps():
    """round_key changes every step (a hash): it is not specialised, so the
    steps after the first compile nothing new (a key of 1 or a multiple of
    16 would have compiled a second variant at a random step)."""
    from fasttricks.kernels.adam import adam_kernel

    params = make_params(GPU_SHAPES, torch.bfloat16, device=CUDA)
    opt = fo.AdamW(params, lr=1e-3, stochastic_rounding=True, backend="triton")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    caches = getattr(adam_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this triton keeps no device_caches to count")
    before = sum(len(entry[0]) for entry in caches.values())
    for _ in range(40):
        opt.step()
    assert sum(len(entry[0]) for entry in caches.values()) == before


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_multi_tensor_norm_on_cuda(backend, dtype, norm_type):
    """fasttricks/ops/norm.py's kernels against torch's norm in fp64, without a
    host sync; a NaN anywhere makes the norm NaN."""
    from fasttricks.ops.norm import NormPlans
    params = make_params(GPU_SHAPES + [(300_001,)], dtype, device=CUDA)
    for p in params:
        p.grad = torch.randn_like(p) * 3
    grads = [p.grad for p in params]
    plans = NormPlans()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ours = plans.total_norm(params, grads, norm_type, backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    truth = torch.nn.utils.get_total_norm([g.double() for g in grads if g.numel()], norm_type)
    torch.testing.assert_close(ours.double(), truth, rtol=1e-12 if dtype == torch.float64 else 2e-6, atol=0)
    params[-1].grad[123_456] = float("nan")
    assert torch.isnan(plans.total_norm(params, [p.grad for p in params], norm_type, backend))
