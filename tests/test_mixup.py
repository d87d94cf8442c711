"""Mixup blend on every backend against the formula; Mixup / CutMix targets."""
import pytest
import torch

from fasttricks.losses import soft_target_cross_entropy
from fasttricks.mixup import MixedTarget, Mixup, mixup
from fasttricks.ops.mixup import mixup_blend, mixup_blend_reference
from helpers import BACKENDS

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.float64]


def batch(B, dtype, shape=(3, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((B,) + shape, generator=g, dtype=torch.float64) * (255 if dtype == torch.uint8 else 4) - \
        (0 if dtype == torch.uint8 else 2)
    return x.to(dtype)


def formula(x, lam, partner):
    """fp64 truth: lam * x + (1 - lam) * x[partner]."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    lam = lam.double().view(shape)
    return lam * x.double() + (1 - lam) * x.double()[partner]


def tolerance(dtype, backend):
    """One rounding of the result (half up for uint8), per DESIGN's low-precision rule:
    the Triton interpreter truncates 16-bit stores, so allow one ulp there."""
    if dtype == torch.uint8:
        return 0.5 + 1e-9
    eps = torch.finfo(dtype).eps
    ulp = 2 if backend == "triton" and dtype in (torch.bfloat16, torch.float16) else 1
    return ulp * eps * 4 + (1e-6 if dtype == torch.float32 else 0)


def backend_dtypes():
    for backend in BACKENDS:
        for dtype in DTYPES:
            if backend == "triton" and dtype == torch.float64:
                continue
            yield backend, dtype


@pytest.mark.parametrize("backend, dtype", list(backend_dtypes()))
@pytest.mark.parametrize("B", [1, 2, 5, 8])
@pytest.mark.parametrize("pairing", ["flip", "perm"])
def test_blend_equals_formula(backend, dtype, B, pairing):
    x = batch(B, dtype)
    lam = torch.rand(B, generator=torch.Generator().manual_seed(B))
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(1)) if pairing == "perm" else None
    partner = perm if perm is not None else torch.arange(B - 1, -1, -1)
    expected = formula(x, lam, partner)
    if pairing == "flip" and B % 2:
        expected[B // 2] = x[B // 2].double()  # the middle row pairs with itself
    if pairing == "flip":
        out = x.clone()
        assert mixup_blend(out, lam, inplace=True, backend=backend) is out
    else:
        out = mixup_blend(x, lam, perm, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    err = (out.double() - expected).abs().max().item()
    assert err <= tolerance(dtype, backend) * max(1.0, expected.abs().max().item()), err
    if dtype == torch.uint8:  # half up: the same on every backend
        assert torch.equal(out, mixup_blend_reference(x, lam, perm))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_non_contiguous(backend):
    x = batch(6, torch.float32, (4, 6, 5)).contiguous(memory_format=torch.channels_last)
    lam = torch.rand(6)
    out = mixup_blend(x.clone(memory_format=torch.channels_last), lam, backend=backend)
    torch.testing.assert_close(out, mixup_blend_reference(x, lam, None))
    inplace = x.clone(memory_format=torch.channels_last)
    mixup_blend(inplace, lam, inplace=True, backend=backend)
    assert inplace.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(inplace, out)
    strided = batch(6, torch.float32, (8, 5))[:, ::2]  # not one dense block per sample
    torch.testing.assert_close(mixup_blend(strided, lam, backend=backend), mixup_blend_reference(strided, lam, None))
    mixup_blend(strided, lam, inplace=True, backend=backend)
    torch.testing.assert_close(strided, mixup_blend_reference(batch(6, torch.float32, (8, 5))[:, ::2], lam, None))


def test_blend_bad_input():
    x = batch(4, torch.float32)
    with pytest.raises(ValueError, match="lam must have shape"):
        mixup_blend(x, torch.rand(3))
    with pytest.raises(IndexError, match="perm has indices"):
        mixup_blend(x, torch.rand(4), torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="cannot run in place"):
        mixup_blend(x, torch.rand(4), torch.tensor([1, 0, 3, 2]), inplace=True)
    with pytest.raises(TypeError, match="unsupported dtype"):
        mixup_blend(x.to(torch.int32), torch.rand(4))
    with pytest.raises(ValueError, match="lam must lie"):
        mixup(x, 1.5)
    assert torch.equal(mixup(x, 1.0), x)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("B", [7, 8])
def test_mixup_targets_match_the_blend(mode, B):
    x, y = batch(B, torch.float32), torch.randint(10, (B,), generator=torch.Generator().manual_seed(2))
    mixer = Mixup(alpha=0.4, num_classes=10, label_smoothing=0.1, mode=mode, seed=3)
    original = x.clone()
    mixed, target = mixer.mix(x, y)
    assert mixed is x  # flip pairing runs in place
    partner = torch.arange(B - 1, -1, -1)
    torch.testing.assert_close(mixed.double(), formula(original, target.lam, partner), rtol=1e-6, atol=1e-6)
    assert torch.equal(target.y_a, y) and torch.equal(target.y_b, y.flip(0))
    if mode == "batch":
        assert len(set(target.lam.tolist()) - {1.0}) <= 1
    if mode == "pair":
        assert torch.equal(target.lam, target.lam.flip(0))
    if mode == "elem":
        assert len(set(target.lam.tolist())) > 2
    dense = target.dense()
    assert dense.shape == (B, 10) and torch.allclose(dense.sum(1), torch.ones(B))
    expected = 0.9 * (target.lam[:, None] * torch.nn.functional.one_hot(y, 10) +
                      (1 - target.lam[:, None]) * torch.nn.functional.one_hot(y.flip(0), 10)) + 0.01
    torch.testing.assert_close(dense, expected)


def test_random_pairing_is_out_of_place_and_uint8_works():
    x = batch(6, torch.uint8)
    y = torch.arange(6)
    original = x.clone()
    mixed, target = Mixup(alpha=1.0, num_classes=6, pairing="random", seed=0).mix(x, y)
    assert torch.equal(x, original) and mixed.dtype == torch.uint8
    partner = target.y_b  # labels are the row indices here
    expected = torch.floor(formula(original, target.lam, partner) + 0.5)
    assert torch.equal(mixed.double(), expected)


def test_cutmix_pastes_boxes_and_corrects_lam():
    B = 4
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 16, 16).clone()
    y = torch.arange(B)
    mixed, target = Mixup(alpha=0.0, cutmix_alpha=1.0, num_classes=B, seed=5).mix(x, y)
    for i in range(B):
        own = (mixed[i] == i).float().mean().item()
        assert own == pytest.approx(target.lam[i].item())  # lam = the area kept
        assert set(mixed[i].unique().tolist()) <= {float(i), float(B - 1 - i)}
    switched = Mixup(alpha=0.5, cutmix_alpha=1.0, switch_prob=0.5, num_classes=B, mode="elem", seed=1)
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 16, 16).clone()
    mixed, target = switched.mix(x, y)
    assert mixed.shape == x.shape and ((target.lam >= 0) & (target.lam <= 1)).all()


def test_determinism_under_a_seed():
    outs = []
    for _ in range(2):
        x, y = batch(8, torch.float32), torch.arange(8) % 3
        mixed, target = Mixup(alpha=0.3, cutmix_alpha=1.0, num_classes=3, mode="elem", seed=11).mix(x, y)
        outs.append((mixed, target.lam))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("kw, error, message", [
    ({"alpha": -1}, ValueError, "alpha"),
    ({"alpha": 0.0}, ValueError, "mixup_alpha > 0, cutmix_alpha > 0"),
    ({"mixup_alpha": 0.0}, ValueError, "mixup_alpha > 0, cutmix_alpha > 0"),
    ({"cutmix_minmax": (0.8, 0.2)}, ValueError, "cutmix_minmax"),
    ({"target": "onehot"}, ValueError, "target"),
    ({"label_smoothing": 1.0}, ValueError, "label_smoothing"),
    ({"mode": "row"}, ValueError, "mode"),
    ({"num_classes": 0}, ValueError, "num_classes"),
    ({"smoothing_mode": "x"}, ValueError, "smoothing mode"),
])
def test_mixup_bad_arguments(kw, error, message):
    with pytest.raises(error, match=message):
        Mixup(**{"num_classes": 10, **kw})


def test_mixup_bad_labels():
    mixer = Mixup(num_classes=5)
    with pytest.raises(IndexError, match=r"labels must be in \[0, 5\)"):
        mixer.mix(batch(4, torch.float32), torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="labels must have shape"):
        mixer.mix(batch(4, torch.float32), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="one lam per sample"):
        MixedTarget(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.ones(2), 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_pixels_are_identical_on_every_backend(backend):
    """NOTE [mixup blend math]: products rounded before the sum, never an FMA, so
    uint8 images come out pixel for pixel as the reference's (not only within
    the half-unit of rounding the other tests allow)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (64, 4096), generator=g, dtype=torch.uint8)
    lam = torch.rand(64, generator=g)
    perm = torch.randperm(64, generator=g)
    for p in (None, perm):
        assert torch.equal(mixup_blend(x.clone(), lam, p, backend=backend), mixup_blend_reference(x, lam, p))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend")
def test_long_rows_stride_over_the_capped_grid(monkeypatch):
    """The second grid axis holds at most 65535 programs: rows of more chunks than
    that (samples past 2^29 elements) are covered by programs striding over them."""
    from fasttricks.kernels import mixup as kernels

    monkeypatch.setattr(kernels, "MAX_GRID_Y", 2)
    x = batch(3, torch.float32, shape=(5 * kernels.CHUNK + 7,))
    lam = torch.tensor([0.25, 0.5, 0.75])
    for perm in (None, torch.tensor([2, 0, 1])):
        assert torch.equal(mixup_blend(x.clone(), lam, perm, backend="triton"), mixup_blend_reference(x, lam, perm))


# ---- timm compatibility -------------------------------------------------------
# timm cannot be installed beside the CPU torch (it imports torchvision), so its
# documented behaviour is restated here: timm.data.mixup.mixup_target and
# SoftTargetCrossEntropy, and Mixup's signature and defaults.

def timm_mixup_target(y, num_classes, lam, smoothing):
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = torch.full((y.shape[0], num_classes), off).scatter_(1, y.view(-1, 1), on)
    y2 = torch.full((y.shape[0], num_classes), off).scatter_(1, y.flip(0).view(-1, 1), on)
    return y1 * lam + y2 * (1.0 - lam)


def timm_soft_target_cross_entropy(x, target):
    return torch.sum(-target * torch.nn.functional.log_softmax(x, dim=-1), dim=-1).mean()


def test_timm_keywords_and_defaults():
    import inspect

    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=0.9, switch_prob=0.4, mode="elem",
                  correct_lam=False, label_smoothing=0.2, num_classes=7)
    assert (mixer.mixup_alpha, mixer.cutmix_alpha, mixer.mix_prob, mixer.switch_prob) == (0.8, 1.0, 0.9, 0.4)
    assert (mixer.mode, mixer.correct_lam, mixer.label_smoothing, mixer.num_classes) == ("elem", False, 0.2, 7)
    assert mixer.mixup_enabled is True
    defaults = {k: v.default for k, v in inspect.signature(Mixup).parameters.items()}
    assert defaults["mixup_alpha"] == 1.0 and defaults["cutmix_alpha"] == 0.0 and defaults["cutmix_minmax"] is None
    assert defaults["prob"] == 1.0 and defaults["switch_prob"] == 0.5 and defaults["mode"] == "batch"
    assert defaults["correct_lam"] is True and defaults["label_smoothing"] == 0.1 and defaults["num_classes"] == 1000
    # timm's positional order
    assert list(inspect.signature(Mixup).parameters)[:9] == [
        "mixup_alpha", "cutmix_alpha", "cutmix_minmax", "prob", "switch_prob", "mode", "correct_lam",
        "label_smoothing", "num_classes"]


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_timm_targets_and_loss(mode):
    """The dense target is timm's mixup_target for the lam drawn; the factored
    one goes through timm's SoftTargetCrossEntropy (-target * log_softmax) and
    gives the same loss and gradient as our factored kernel."""
    B, C = 8, 5
    x = batch(B, torch.float32)
    y = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(1))
    _, factored = Mixup(mixup_alpha=0.4, label_smoothing=0.1, num_classes=C, mode=mode, seed=2)(x.clone(), y)
    _, dense = Mixup(mixup_alpha=0.4, label_smoothing=0.1, num_classes=C, mode=mode, target="dense",
                     seed=2)(x.clone(), y)
    assert isinstance(dense, torch.Tensor) and dense.shape == (B, C) and dense.dtype == torch.float32
    lam = factored.lam.view(-1, 1)
    assert torch.allclose(dense, timm_mixup_target(y, C, lam, 0.1), atol=1e-6)
    if mode == "batch":
        assert torch.equal(factored.lam, factored.lam[:1].expand(B))
    logits = torch.randn(B, C, requires_grad=True)
    theirs = timm_soft_target_cross_entropy(logits, factored)  # the MixedTarget acts as the B x C tensor
    g_theirs, = torch.autograd.grad(theirs, logits)
    ours = soft_target_cross_entropy(logits, factored)
    g_ours, = torch.autograd.grad(ours, logits)
    assert torch.allclose(theirs, ours, atol=1e-6) and torch.allclose(g_theirs, g_ours, atol=1e-6)
    assert torch.allclose(timm_soft_target_cross_entropy(logits, dense), ours, atol=1e-6)
    # other tensor uses of a timm loop see the dense matrix
    assert torch.equal(factored.argmax(dim=1), dense.argmax(dim=1)) and factored.shape == dense.shape
    assert torch.allclose(factored.to(torch.float64), dense.double())


def test_timm_mixup_disabled_keeps_smoothed_targets():
    mixer = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4, target="dense", seed=0)
    mixer.mixup_enabled = False  # what timm's train loop sets for the last epochs
    x = batch(6, torch.float32)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    mixed, target = mixer(x.clone(), y)
    assert torch.equal(mixed, x)
    assert torch.allclose(target, timm_mixup_target(y, 4, 1.0, 0.1))


def test_cutmix_minmax_boxes_as_timm():
    """cutmix_minmax: box sides drawn in [min, max) of the image's, inside it,
    and lam from the box area (always corrected), CutMix switched on."""
    mixer = Mixup(mixup_alpha=0.0, cutmix_minmax=(0.2, 0.6), num_classes=3, mode="elem", label_smoothing=0.0,
                  seed=4)
    assert mixer.cutmix_alpha == 1.0
    B, H, W = 6, 10, 20
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 2, H, W).contiguous()
    y = torch.arange(B) % 3
    mixed, target = mixer(x.clone(), y)
    for i in range(B):
        pasted = (mixed[i, 0] != i)
        area = int(pasted.sum())
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        if B - 1 - i != i and area:
            h, w = len(rows), len(cols)
            assert int(H * 0.2) <= h < int(H * 0.6) and int(W * 0.2) <= w < int(W * 0.6) and area == h * w
        assert target.lam[i].item() == pytest.approx(1.0 - area / (H * W))
