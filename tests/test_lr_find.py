"""The LR range test: restores everything, finds the descending part."""
import copy

import pytest
import torch
from torch import nn

import fasttricks


def regression(seed=0, n=256, d=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, 1, generator=g) + 0.01 * torch.randn(n, 1, generator=g)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def assert_identical(a, b):
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_identical(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert a == b


def test_lr_find_suggests_a_descending_lr_and_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 1))
    opt = fasttricks.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, backend="reference")
    sampler = fasttricks.sampling.EMA(opt, decay=0.9)
    loader = regression()
    x, y = loader[0]
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()  # momentum state, a sample, BN statistics: all must survive
    model.eval()
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), torch.get_rng_state())
    result = fasttricks.lr_find(model, loader, nn.functional.mse_loss, opt, start_lr=1e-5, end_lr=10.0,
                                num_steps=80)
    after = (model.state_dict(), opt.state_dict(), torch.get_rng_state())
    assert_identical(after, before)
    assert not model.training
    assert sampler.total_steps == 1 and opt.param_groups[0]["lr"] == 0.01
    # this problem diverges with momentum 0.9 well before lr = 10
    assert result.diverged and len(result.lrs) < 80
    assert result.lrs == sorted(result.lrs) and result.lrs[0] == pytest.approx(1e-5)
    assert result.suggestion is not None and 1e-4 < result.suggestion < result.lrs[-1]
    i = result.lrs.index(result.suggestion)
    best = min(range(len(result.losses)), key=result.losses.__getitem__)
    assert result.losses[i + 1] < result.losses[i - 1] and i < best  # in the descending part
    assert result.losses[best] < 0.8 * result.losses[0]
    path = result.plot(tmp_path / "lr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_find_bad_arguments():
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kw, msg in [({"start_lr": 1.0, "end_lr": 0.1}, "start_lr < end_lr"), ({"num_steps": 1}, "num_steps"),
                    ({"mode": "cos"}, "mode")]:
        with pytest.raises(ValueError, match=msg):
            fasttricks.lr_find(model, regression(), nn.functional.mse_loss, opt, **kw)
