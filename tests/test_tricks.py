"""Random gradient, no bias decay, zero gamma, Fixup init, shake-shake, and
the torchvision-free ResNets (Bag of Tricks, section 4)."""
import pytest
import torch
from torch import nn

import fasttricks
from fasttricks import models, tricks
from helpers import BACKENDS


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["uniform", "cyclic"])
def test_random_gradient_loss_scaling_equals_fused_gradient_scaling(backend, mode):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 6, generator=g), torch.randint(3, (16,), generator=g)) for _ in range(6)]
    runs = []
    for fold in (False, True):
        model = tiny_net()
        opt = fasttricks.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
        rg = tricks.RandomGradient(0.2, 1.0, mode=mode, step_size=2, seed=7)
        if fold:
            rg.fold_into(opt)
        factors = []
        for x, y in data:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            (loss if fold else rg(loss)).backward()
            opt.step()
            factors.append(rg.last)
        runs.append((factors, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert len(set(runs[0][0])) > 2 and all(0.2 <= r <= 1.0 for r in runs[0][0])
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-6)


def test_random_gradient_cyclic_is_a_triangle_and_errors():
    rg = tricks.RandomGradient(0.0, 1.0, mode="cyclic", step_size=4)
    assert [rg.next_factor() for _ in range(9)] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="low <= high"):
        tricks.RandomGradient(1.0, 0.5)
    with pytest.raises(ValueError, match="mode"):
        tricks.RandomGradient(mode="normal")
    with pytest.raises(TypeError, match="fasttricks optimizer"):
        tricks.RandomGradient().fold_into(torch.optim.SGD(tiny_net().parameters(), lr=0.1))
    rg = tricks.RandomGradient(seed=1)
    state = rg.state_dict()
    first = [rg.next_factor() for _ in range(3)]
    rg.load_state_dict(state)
    assert [rg.next_factor() for _ in range(3)] == first


def test_param_groups_no_bias_decay():
    model = models.resnet18(num_classes=10, small_input=True)
    decay, no_decay = tricks.param_groups(model, weight_decay=5e-4)
    conv_linear = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {id(p) for p in decay["params"]} == conv_linear and decay["weight_decay"] == 5e-4
    norms_and_biases = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)}
    norms_and_biases.add(id(model.fc.bias))
    assert {id(p) for p in no_decay["params"]} == norms_and_biases and no_decay["weight_decay"] == 0.0
    assert len(tricks.param_groups(model, 5e-4, no_bias_decay=False)) == 1
    fasttricks.optim.SGDW(tricks.param_groups(model, 5e-4), lr=0.1)  # loads as torch param groups


@pytest.mark.parametrize("make", [lambda: models.resnet18(10, small_input=True, zero_gamma=True),
                                  lambda: models.resnet50(10, variant="D", small_input=True, zero_gamma=True)])
def test_zero_gamma_makes_residual_blocks_identity_at_init(make):
    model = make().eval()
    blocks = model.residual_blocks()
    assert all(torch.count_nonzero(b.last_norm.weight) == 0 for b in blocks)
    torch.manual_seed(0)
    for block in blocks:
        if block.downsample is None:  # identity shortcut: block(x) == relu(x) == x for x >= 0
            c = block.conv1.in_channels
            x = torch.rand(2, c, 5, 5)
            torch.testing.assert_close(block(x), x)
    assert tricks.zero_gamma_(models.resnet18(10)) == 8


def test_fixup_init_blocks_start_as_identity():
    model = models.resnet34(10, small_input=True)
    assert tricks.fixup_init_(model) == 16
    for block in model.residual_blocks():
        assert torch.count_nonzero(block.branch_convs[-1].weight) == 0
    assert torch.count_nonzero(model.fc.weight) == 0
    with pytest.raises(ValueError, match="no residual blocks"):
        tricks.fixup_init_(nn.Linear(2, 2))


def test_shake_shake_forward_and_backward_mix():
    torch.manual_seed(0)
    block = tricks.ShakeShakeBlock(4, 8, stride=2)
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    out = block(x)
    assert out.shape == (3, 8, 4, 4)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    a, b = torch.randn(4, 2), torch.randn(4, 2)
    a.requires_grad_(), b.requires_grad_()
    alpha, beta = torch.full((4, 1), 0.3), torch.full((4, 1), 0.8)
    y = tricks.ShakeShake.apply(a, b, alpha, beta)
    torch.testing.assert_close(y, 0.3 * a + 0.7 * b)
    y.sum().backward()
    torch.testing.assert_close(a.grad, torch.full((4, 2), 0.8))
    torch.testing.assert_close(b.grad, torch.full((4, 2), 0.2))
    block.eval()
    torch.testing.assert_close(block(x), block(x))  # deterministic in eval


@pytest.mark.parametrize("variant, count", [("A", 25_557_032), ("B", 25_557_032), ("C", 25_576_264),
                                            ("D", 25_576_264)])
def test_resnet50_parameter_counts(variant, count):
    assert sum(p.numel() for p in models.resnet50(variant=variant).parameters()) == count


def test_resnet_variant_shapes():
    r50 = {v: models.resnet50(variant=v) for v in "ABCD"}
    first = lambda m: m.layer2[0]  # noqa: E731  (a downsampling bottleneck)
    assert first(r50["A"]).conv1.stride == (2, 2) and first(r50["A"]).conv2.stride == (1, 1)
    assert first(r50["B"]).conv1.stride == (1, 1) and first(r50["B"]).conv2.stride == (2, 2)
    assert r50["B"].stem[0].kernel_size == (7, 7)
    assert [m.out_channels for m in r50["C"].stem if isinstance(m, nn.Conv2d)] == [32, 32, 64]
    assert r50["C"].stem[0].stride == (2, 2) and r50["C"].stem[3].stride == (1, 1)
    assert isinstance(first(r50["D"]).downsample[0], nn.AvgPool2d)
    assert first(r50["D"]).downsample[1].stride == (1, 1)
    assert first(r50["C"]).downsample[0].stride == (2, 2)
    x = torch.randn(2, 3, 64, 64)
    for v, m in r50.items():
        assert m.eval()(x).shape == (2, 1000), v
    small = models.resnet18(num_classes=10, small_input=True, variant="D").eval()
    assert small(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.modules())
    with pytest.raises(ValueError, match="variant"):
        models.resnet18(variant="E")


def test_resnet_in_one_dimension():
    """dims=1: the same network from Conv1d/BatchNorm1d/pools, for sequences
    such as MNIST-1D; zero gamma and the no-bias-decay groups find its layers."""
    r1 = models.ResNet(models.BasicBlock, [1, 1, 1, 1], 10, variant="D", small_input=True, in_channels=1,
                       base_width=16, dims=1, zero_gamma=True)
    r2 = models.ResNet(models.BasicBlock, [1, 1, 1, 1], 10, variant="D", small_input=True, in_channels=1,
                       base_width=16)
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in r1.modules())
    assert isinstance(r1.layer2[0].downsample[0], nn.AvgPool1d)
    assert [type(m).__name__.replace("1d", "") for m in r1.modules()] == \
        [type(m).__name__.replace("2d", "") for m in r2.modules()]  # the same network, layer for layer
    assert all(float(b.last_norm.weight.abs().sum()) == 0 for b in r1.residual_blocks())
    assert r1.eval()(torch.randn(2, 1, 40)).shape == (2, 10)
    decay, no_decay = tricks.param_groups(r1, 5e-4)
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    with pytest.raises(ValueError, match="dims"):
        models.ResNet(models.BasicBlock, [1, 1, 1, 1], dims=3)
