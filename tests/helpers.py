"""Helpers shared by the tests (tests/ is on pytest's pythonpath)."""

import torch

from fasttricks import _backends

# Sizes: 0-dim, empty, odd, past the GPU chunk (4096) and the CPU chunk (65536).
# (3, 5) and (7,): a tail of one vector or less; (25,): a tail of two (csrc/cpu/adam.cpp)
SHAPES = [(), (0,), (3, 5), (7,), (25,), (4099,), (65541,)]


def cpu_backends():
    """Backends that run CPU tensors here. CI sets FASTTRICKS_REQUIRE=cpu,triton so
    that a broken build fails instead of skipping."""
    names = ["reference"]
    for name in ("cpu", "triton"):
        if _backends.available(name, torch.device("cpu")) is None:
            names.append(name)
    return names


BACKENDS = cpu_backends()


def make_params(shapes, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_() for s in shapes]


def make_grads(shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)]


def clone_params(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def train(make_opt, base, grads_seq, dtype=None):
    """Fresh copies of `base` (optionally cast), stepped by make_opt(params) over
    the gradient sequence; returns (params, optimizer)."""
    params = clone_params(base, dtype)
    opt = make_opt(params)
    run(opt, params, grads_seq)
    return params, opt


def run(opt, params, grads_seq):
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype).to(p.device)
        opt.step()
    return params


def max_err(xs, ref):
    errs = [((x.double() - r.double()).abs().max().item() if x.numel() else 0.0) for x, r in zip(xs, ref)]
    assert all(e == e for e in errs), "NaN in a compared tensor"
    return max(errs)


def assert_close_rule(ours, peer, truth, floor=1e-7, factor=2.0):
    """The low-precision rule of docs/architecture.md: our error against the fp64 truth is at most 2x the
    error of a plain torch computation in the same precision (plus a tiny floor
    for the cases where that peer happens to be exact)."""
    err, peer_err = max_err(ours, truth), max_err(peer, truth)
    scale = max(1.0, max((r.abs().max().item() if r.numel() else 0.0) for r in truth))
    assert err <= factor * peer_err + floor * scale, f"error {err:.3g} vs peer {peer_err:.3g}"


def assert_param_is_rounded_master(backend, params, masters, dtype):
    """The param is its fp32 master rounded to nearest. Triton's CPU interpreter
    truncates fp32 -> bf16/fp16 casts (even with fp_downcast_rounding="rtne");
    compiled Triton rounds to nearest, so there we allow one ulp of the truncation."""
    for p, m in zip(params, masters):
        if backend == "triton" and _backends.triton_interpreting():
            ulp = torch.finfo(dtype).eps * m.abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((p.detach().float() - m).abs() <= ulp).all()
        else:
            assert torch.equal(p.detach(), m.to(dtype))


def rule_factor(backend, dtype):
    """2x per docs/architecture.md; Triton's CPU interpreter truncates every 16-bit store
    instead of rounding to nearest (see above), which doubles its drift."""
    low = dtype in (torch.bfloat16, torch.float16)
    return 4.0 if low and backend == "triton" and _backends.triton_interpreting() else 2.0


def twins(cls, tcls, cfg, backend, shapes):
    """A fasttricks optimizer on `backend` and a torch one, each over its own copy
    of the same params of `shapes`."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g) for s in shapes]
    ours = [b.clone().requires_grad_() for b in base]
    theirs = [b.clone().requires_grad_() for b in base]
    return ours, cls(ours, backend=backend, **cfg), theirs, tcls(theirs, **cfg)


def assert_agree(ours, opt, theirs, topt):
    """The params and the saved state of the two twins agree."""
    assert max_err(ours, theirs) < 1e-5
    sd, tsd = opt.state_dict(), topt.state_dict()
    assert sd["state"].keys() == tsd["state"].keys()
    for k in tsd["state"]:
        assert sd["state"][k].keys() == tsd["state"][k].keys(), k
        for name, v in tsd["state"][k].items():
            if torch.is_tensor(v):
                assert max_err([sd["state"][k][name]], [v]) < 1e-5, (k, name)
            else:
                assert sd["state"][k][name] == v
