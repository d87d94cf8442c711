"""What timm and torch users expect of an EMA/SWA: buffers averaged, the
average exported as a state dict, and misuse caught with the fix named."""
import copy
import warnings

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import fasttricks.optim as fo
from fasttricks import tricks
from fasttricks.sampling import EMA, PSWA, PWALKS
from helpers import BACKENDS


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))


def train_steps(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        yield


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [None, False])
def test_ema_with_model_equals_averaged_model_with_buffers(backend, fused):
    model = net()
    opt = fo.SGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend)
    ema = EMA(opt, decay=0.8, model=model, fused=fused)
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    for _ in train_steps(model, opt, 4):
        peer.update_parameters(model)
    ours = ema.averaged_state_dict()
    theirs = peer.module.state_dict()
    for name, value in theirs.items():
        if name.endswith("num_batches_tracked"):  # copied, as timm's ModelEmaV3 (AveragedModel averages the count)
            assert torch.equal(ours[name], model.state_dict()[name])
        else:
            assert torch.allclose(ours[name], value, atol=1e-6), name


def test_exported_state_dict_loads_and_reproduces_the_average():
    model = net()
    opt = fo.AdamW(tricks.param_groups(model, 0.05), lr=1e-2)  # groups in another order than model.parameters()
    ema = EMA(opt, decay=0.5, model=model)
    list(train_steps(model, opt, 3))
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    with ema.averaged_parameters():
        expected = model(x)
        inside = model.state_dict()  # aliases the live tensors: not safe past the block
    exported = ema.averaged_state_dict()
    assert not any(torch.equal(inside[k], exported[k]) for k in exported if k.endswith("weight"))
    fresh = net(seed=5).eval()
    fresh.load_state_dict(exported)
    assert torch.allclose(fresh(x), expected, atol=1e-6)
    target = net(seed=6).eval()
    ema.copy_to(target)  # by name, whatever the param groups
    assert torch.allclose(target(x), expected, atol=1e-6)


def ema_after_two_steps():
    """A net trained two SGD steps with an EMA of its params and buffers."""
    model = net()
    opt = fo.SGD(model.parameters(), lr=0.1)
    ema = EMA(opt, decay=0.5, model=model)
    list(train_steps(model, opt, 2))
    return model, opt, ema


def test_sampler_checkpoint_keeps_the_averaged_buffers():
    _, _, ema = ema_after_two_steps()
    sd = copy.deepcopy(ema.state_dict())
    other = net(seed=3)
    ema2 = EMA(fo.SGD(other.parameters(), lr=0.1), decay=0.5, model=other)
    ema2.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(ema2.buffer_averages, ema.buffer_averages))


def test_step_inside_averaged_parameters_raises_and_restores():
    model, opt, ema = ema_after_two_steps()
    live = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="step outside the block"):
        with ema.averaged_parameters():
            opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in live.items())
    opt.step()  # outside, it steps


def test_misuse_is_caught_with_the_fix_named():
    model = net()
    opt = fo.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"needs steps_per_epoch.*len\(train_loader\)"):
        PSWA(opt, steps_per_epoch=None)
    sampler = PWALKS(opt, steps_per_epoch=1000, k=0.05)  # len(dataset) passed instead of len(loader)
    list(train_steps(model, opt, 3))
    with pytest.warns(UserWarning, match="steps_per_epoch=len\\(train_loader\\)"):
        sampler.end_epoch(model=model)
    with pytest.raises(ValueError, match="not the model this optimizer trains"):
        sampler.end_epoch(model=net(seed=4))
    with pytest.raises(ValueError, match="not the model this optimizer trains"):
        EMA(opt, model=net(seed=4))


def test_reassignment_without_bn_recalibration_warns_once():
    model = net()
    opt = fo.SGD(model.parameters(), lr=0.1)
    sampler = PSWA(opt, steps_per_epoch=3, alpha=1.0)
    with pytest.warns(UserWarning, match="bn_loader"):
        list(train_steps(model, opt, 3))
        sampler.end_epoch(model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(train_steps(model, opt, 3))
        sampler.end_epoch(model=model)  # once only
