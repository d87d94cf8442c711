"""Soft-target CE on factored mixup targets and distillation, against torch."""
import pytest
import torch
import torch.nn.functional as F

from fasttricks.losses import distillation_loss, soft_target_cross_entropy
from fasttricks.mixup import MixedTarget
from helpers import BACKENDS


def target(B=7, C=11, smoothing=0.0, mode="torch", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return MixedTarget(torch.randint(C, (B,), generator=g), torch.randint(C, (B,), generator=g),
                       torch.rand(B, generator=g), C, smoothing, mode)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_unmixed_target_equals_torch_label_smoothing(smoothing):
    logits = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(5, (9,))
    t = MixedTarget(y, y, torch.ones(9), 5, smoothing)
    ours = soft_target_cross_entropy(logits, t)
    ref = F.cross_entropy(logits, y, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref)
    g1, = torch.autograd.grad(ours, logits)
    g2, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("smoothing, mode", [(0.0, "torch"), (0.2, "torch"), (0.2, "bag_of_tricks"), (0.2, "001")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_factored_equals_dense_soft_target(smoothing, mode, reduction):
    t = target(smoothing=smoothing, mode=mode)
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    ours = soft_target_cross_entropy(logits, t, reduction=reduction)
    dense = t.dense(torch.float64)
    ref = -(dense * torch.log_softmax(logits, 1)).sum(1)
    ref = {"mean": ref.mean(), "sum": ref.sum(), "none": ref}[reduction]
    torch.testing.assert_close(ours, ref)
    w = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad((ours * w).sum(), logits)[0],
                               torch.autograd.grad((ref * w).sum(), logits)[0])
    torch.testing.assert_close(F.cross_entropy(logits, dense, reduction=reduction), ref)  # torch agrees


def test_bag_of_tricks_smoothing_convention():
    t = MixedTarget(torch.tensor([2]), torch.tensor([2]), torch.ones(1), 5, 0.1, "bag_of_tricks")
    torch.testing.assert_close(t.dense(), torch.tensor([[0.025, 0.025, 0.9, 0.025, 0.025]]))


def test_gradcheck_fp64():
    t = target(B=4, C=6, smoothing=0.1)
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: soft_target_cross_entropy(z, t, reduction="none"), (logits,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    t = target()
    logits = torch.randn(7, 11)
    truth = soft_target_cross_entropy(logits.double(), t)
    ours = soft_target_cross_entropy(logits.to(dtype), t)
    torch_err = abs(float(-(t.dense(dtype) * torch.log_softmax(logits.to(dtype), 1)).sum(1).mean()) - float(truth))
    assert abs(float(ours) - float(truth)) <= 2 * max(torch_err, torch.finfo(dtype).eps * float(truth))


def test_distillation_equals_its_formula():
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(4, (6,))
    T = 3.0
    ours = distillation_loss(z, r, y, T)
    p_teacher = torch.softmax(r / T, 1)
    ref = F.cross_entropy(z, y) + T * T * (-(p_teacher * torch.log_softmax(z / T, 1)).sum(1).mean())
    torch.testing.assert_close(ours, ref)
    ours.backward()
    assert r.grad is None  # the teacher gets no gradient
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(z, r, y, 0.0)


def test_bad_input():
    logits = torch.randn(7, 11)
    with pytest.raises(ValueError, match="classes"):
        soft_target_cross_entropy(torch.randn(7, 10), target())
    with pytest.raises(ValueError, match="dense target shape"):
        soft_target_cross_entropy(logits, torch.rand(7, 10))
    with pytest.raises(ValueError, match="reduction"):
        soft_target_cross_entropy(logits, target(), reduction="max")
    with pytest.raises(ValueError, match="label smoothing"):
        target(smoothing=1.0)


@pytest.mark.parametrize("C", [11, 37, 1000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cpu_kernel_fp32_equals_dense(C, smoothing):
    """The C++ kernel (fp32 CPU logits): loss and gradient equal the dense
    soft-target CE; rows whose two classes coincide included."""
    t = target(B=9, C=C, smoothing=smoothing)
    t.y_b[:3] = t.y_a[:3]
    logits = (torch.randn(9, C) * 3).requires_grad_()
    ours = soft_target_cross_entropy(logits, t, reduction="none")
    ref = -(t.dense(torch.float32) * torch.log_softmax(logits, 1)).sum(1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(9)
    torch.testing.assert_close(torch.autograd.grad((ours * w).sum(), logits)[0],
                               torch.autograd.grad((ref * w).sum(), logits)[0], rtol=1e-5, atol=1e-6)


KERNELS = [b for b in BACKENDS if b != "reference"]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [2, 300, 1100, 4099])  # one block, past 1024 and past 4096 classes (Triton's blocks)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_kernels_equal_the_torch_ops_path(backend, dtype, C, smoothing):
    """The C++ and Triton kernels and the torch-ops reference give the same loss
    and gradient, to a rounding of the dtype; rows whose classes coincide included."""
    t = target(B=6, C=C, smoothing=smoothing)
    t.y_b[:2] = t.y_a[:2]
    logits = (torch.randn(6, C, generator=torch.Generator().manual_seed(C)) * 3).to(dtype)
    w = torch.randn(6)
    results = []
    for name in (backend, "reference"):
        z = logits.clone().requires_grad_()
        loss = soft_target_cross_entropy(z, t, reduction="none", backend=name)
        results.append((loss.detach(), torch.autograd.grad((loss.float() * w).sum(), z)[0]))
    (l1, g1), (l2, g2) = results
    assert g1.dtype == dtype and l1.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(l1.float(), l2.float(), rtol=eps * 4, atol=eps * 4)
    # a rounding of the dtype, on the scale of the row's gradient (the two lse differ in the last bit)
    torch.testing.assert_close(g1.float(), g2.float(), rtol=eps * 4, atol=eps * 4 * float(g2.abs().max()))


def test_backend_choice_and_errors():
    from fasttricks.losses import resolve_backend

    logits = torch.randn(3, 5)
    assert resolve_backend("auto", logits) == ("cpu" if "cpu" in KERNELS else "reference")
    assert resolve_backend("auto", logits.double()) == "reference"  # no kernel serves fp64
    with pytest.raises(ValueError, match="Invalid backend"):
        soft_target_cross_entropy(logits, target(B=3, C=5), backend="fast")
    with pytest.raises(RuntimeError, match="no CUDA C\\+\\+ kernel"):
        soft_target_cross_entropy(logits, target(B=3, C=5), backend="cuda")
    if "triton" in KERNELS:
        with pytest.raises(TypeError, match="serves float32"):
            soft_target_cross_entropy(logits.double(), target(B=3, C=5), backend="triton")


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_reject_out_of_range_classes(backend):
    t = MixedTarget(torch.tensor([0, 11]), torch.tensor([1, 2]), torch.rand(2), 11)
    with pytest.raises(IndexError):
        soft_target_cross_entropy(torch.randn(2, 11), t, backend=backend)


def test_cpu_kernel_rejects_out_of_range_classes():
    t = MixedTarget(torch.tensor([0, 11]), torch.tensor([1, 2]), torch.rand(2), 11)
    with pytest.raises(IndexError, match="out of range"):
        soft_target_cross_entropy(torch.randn(2, 11), t)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("C", [7, 300, 1100])  # one block; a whole masked first block (256) and more
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_classes_with_minus_inf_logits_equal_torch(backend, C, smoothing):
    """Masked classes (-inf logits), whole masked blocks included: the loss and
    gradient are torch's cross_entropy (label-smoothed, mixed by lam; with
    smoothing a masked class has target mass, so the loss is +inf as torch's)."""
    B = 5
    g = torch.Generator().manual_seed(C)
    logits = torch.randn(B, C, generator=g) * 3
    logits[:, : min(C - 3, 600)] = float("-inf")   # the first blocks masked, the labels not
    logits[1, C - 3] = float("-inf")
    y_a = torch.full((B,), C - 1, dtype=torch.long)
    y_b = torch.full((B,), C - 2, dtype=torch.long)
    lam = torch.rand(B, generator=g)
    t = MixedTarget(y_a, y_b, lam, C, smoothing)
    z = logits.clone().requires_grad_()
    ours = soft_target_cross_entropy(z, t, reduction="none", backend=backend)
    w = torch.rand(B, generator=g)
    grad, = torch.autograd.grad(ours, z, grad_outputs=w)
    zt = logits.clone().requires_grad_()
    ce = lambda y: torch.nn.functional.cross_entropy(zt, y, reduction="none", label_smoothing=smoothing)  # noqa: E731
    theirs = lam * ce(y_a) + (1 - lam) * ce(y_b)
    tgrad, = torch.autograd.grad(theirs, zt, grad_outputs=w)
    assert torch.equal(ours.isinf(), theirs.isinf()) and not ours.isnan().any()
    finite = ~theirs.isinf()
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, tgrad, rtol=1e-5, atol=1e-6)
