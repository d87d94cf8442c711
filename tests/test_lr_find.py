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


def assert_suggests_in_the_steep_descent(result, low, high):
    """The suggestion lies in [low, high] (the range known to train well) and in
    the descending part: past the first tenth of the drop, before the minimum."""
    assert result.suggestion is not None
    i = result.lrs.index(result.suggestion)
    best = min(range(len(result.losses)), key=result.losses.__getitem__)
    start = result.losses[len(result.losses) // 10]
    assert i < best
    assert result.losses[i] < start - 0.1 * (start - result.losses[best])
    assert low <= result.suggestion <= high, result.suggestion


def test_suggestion_on_linear_regression():
    """The case that suggested 1.4e-5 (the second point of the sweep) before: the
    loss falls fastest around 1e-2."""
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    result = fasttricks.lr_find(model, regression(), nn.functional.mse_loss, opt, start_lr=1e-5, end_lr=10.0,
                                num_steps=80)
    assert_suggests_in_the_steep_descent(result, 1e-3, 1e-1)


def test_suggestion_on_a_small_cnn_on_digits():
    from fasttricks.data import Batches, load_digits

    x, y, _, _ = load_digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    opt = fasttricks.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = fasttricks.lr_find(model, Batches(x, y, 64, seed=0), nn.functional.cross_entropy, opt,
                                start_lr=1e-5, end_lr=10.0, num_steps=100)
    assert_suggests_in_the_steep_descent(result, 1e-3, 1.0)


def test_suggestion_when_the_loss_diverges_early():
    """Badly scaled inputs: the sweep diverges around lr 1e-3 already; the
    suggestion stays below that, in the descent."""
    data = [(x * 30, y * 30) for x, y in regression()]
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    result = fasttricks.lr_find(model, data, nn.functional.mse_loss, opt, start_lr=1e-7, end_lr=10.0,
                                num_steps=100)
    assert result.diverged and result.lrs[-1] < 1e-1
    assert_suggests_in_the_steep_descent(result, 1e-6, result.lrs[-1] / 10)


def test_suggest_lr_rule_by_hand():
    from fasttricks.lr_find import suggest_lr

    lrs = [10.0 ** (k / 2) for k in range(-12, 1)]
    # noisy start (skipped: its 1.0 is no minimum), the descent, the minimum, the divergence tail
    losses = [5.0, 1.0, 5.2, 5.0, 4.9, 4.6, 3.0, 2.0, 1.5, 1.2, 1.1, 3.0, 9.0]
    assert suggest_lr(lrs, losses, skip_begin=3) == lrs[6]  # 4.6 -> 3.0 -> 2.0: the steepest fall
    assert suggest_lr(lrs, [3.0, 4.0, 5.0], skip_begin=0) is None  # never decreases
