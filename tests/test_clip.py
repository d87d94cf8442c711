"""opt.clip_grad_norm_: torch's clip_grad_norm_ folded into the next step
(NOTE [clip in the step] in fasttricks/optim/_clip.py), against torch's clip
followed by torch's step."""
import pytest
import torch

import fasttricks.optim as fo
from helpers import BACKENDS

TORCH = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}
KW = {"AdamW": dict(lr=1e-2, weight_decay=0.1), "Adam": dict(lr=1e-2), "SGD": dict(lr=0.1, momentum=0.9)}


def _pair(family, backend, sizes=(7, 33, 5), **extra):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return (ours, getattr(fo, family)(ours, backend=backend, **KW[family], **extra),
            theirs, TORCH[family](theirs, **KW[family]))


def _grads(ours, theirs, k, scale=1.0):
    g = torch.Generator().manual_seed(k)
    for p, q in zip(ours, theirs):
        grad = torch.randn(p.shape, generator=g) * scale
        p.grad, q.grad = grad.clone(), grad.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["AdamW", "Adam", "SGD"])
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.3, 100.0])  # clipping, and a norm below max_norm
def test_equal_to_torch_clip_then_torch_step(backend, family, norm_type, max_norm):
    ours, opt, theirs, ref = _pair(family, backend)
    for k in range(3):
        _grads(ours, theirs, k)
        unclipped = [p.grad.clone() for p in ours]
        norm = opt.clip_grad_norm_(max_norm, norm_type)
        expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
        assert norm.shape == () and torch.allclose(norm, expected, rtol=1e-6)
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, unclipped))  # the grads keep their values
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


def test_inplace_rewrites_the_grads_as_torch_does():
    ours, opt, theirs, ref = _pair("AdamW", "cpu" if "cpu" in BACKENDS else "reference")
    _grads(ours, theirs, 0)
    opt.clip_grad_norm_(0.3, inplace=True)
    torch.nn.utils.clip_grad_norm_(theirs, 0.3)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    opt.step()
    ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_norm_skips_the_step(backend, bad):
    ours, opt, theirs, _ = _pair("AdamW", backend)
    _grads(ours, theirs, 0)
    opt.step()  # state exists
    before = [p.detach().clone() for p in ours], {k: v.clone() for k, v in opt.state[ours[0]].items()}
    _grads(ours, theirs, 1)
    ours[1].grad[3] = bad
    norm = opt.clip_grad_norm_(1.0)
    assert not torch.isfinite(norm)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ours, before[0]))
    assert all(torch.equal(opt.state[ours[0]][k], v) for k, v in before[1].items())
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    # the next clean step steps, unclipped unless asked
    _grads(ours, theirs, 2)
    opt.step()
    assert not torch.equal(ours[0], before[0][0])


def test_zero_grad_drops_a_pending_clip_and_a_step_uses_it_once():
    ours, opt, theirs, ref = _pair("SGD", "reference")
    _grads(ours, theirs, 0, scale=100.0)
    opt.clip_grad_norm_(1e-3)
    opt.zero_grad()
    _grads(ours, theirs, 1)
    opt.step()
    ref.step()  # neither clipped
    _grads(ours, theirs, 2)
    opt.clip_grad_norm_(0.5)
    torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    opt.step()
    ref.step()
    _grads(ours, theirs, 3)  # the clip was used by the step before
    opt.step()
    ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_under_a_grad_scaler(fused):
    """fused=True (the fused unscale): no unscale_, the scaler's scale divides
    the norm out inside the step; fused=False: unscale_ first, as with torch."""
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    ours, opt, theirs, ref = _pair("AdamW", backend, fused=fused)
    s_ours, s_ref = torch.amp.GradScaler("cpu", init_scale=2.0**10), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for k in range(4):
        for params, scaler in ((ours, s_ours), (theirs, s_ref)):
            g = torch.Generator().manual_seed(k)
            loss = sum((p * torch.randn(p.shape, generator=g)).sum() for p in params)
            if k == 2:
                loss = loss * float("inf")  # an overflow: both skip
            for p in params:
                p.grad = None
            scaler.scale(loss).backward()
        if not fused:
            s_ours.unscale_(opt)
        opt.clip_grad_norm_(0.5)
        s_ref.unscale_(ref)
        torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        s_ours.step(opt)
        s_ref.step(ref)
        s_ours.update()
        s_ref.update()
        assert s_ours.get_scale() == s_ref.get_scale()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


def test_bad_max_norm_and_no_grads():
    ours, opt, _, _ = _pair("AdamW", "reference")
    with pytest.raises(ValueError, match="max_norm"):
        opt.clip_grad_norm_(float("nan"))
    assert float(opt.clip_grad_norm_(1.0)) == 0.0  # no grads: torch's answer


def test_under_torch_compile():
    """The clip pending from outside reaches the compiled step (NOTE [compiled step])."""
    ours, opt, theirs, ref = _pair("AdamW", "cpu" if "cpu" in BACKENDS else "reference")

    @torch.compile
    def step():
        opt.step()

    for k in range(3):
        _grads(ours, theirs, k)
        opt.clip_grad_norm_(0.3)
        step()
        torch.nn.utils.clip_grad_norm_(theirs, 0.3)
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
