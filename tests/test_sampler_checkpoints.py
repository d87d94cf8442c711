"""NOTE [sampler checkpoints]: sampler state saved through the optimizer comes
back whether the sampler is attached before or after optimizer.load_state_dict,
in any order, keyed by name or class; nothing is half-loaded."""
import copy

import pytest
import torch

import fasttricks.optim as fo
from fasttricks.sampling import EMA, PSWA


def train(opt, params, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def fresh(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).requires_grad_() for s in [(4, 3), (5,)]]
    return params, fo.SGD(params, lr=0.1, momentum=0.9)


def saved_run():
    params, opt = fresh()
    ema = EMA(opt, decay=0.5)
    pswa = PSWA(opt, steps_per_epoch=4, alpha=0.5)
    train(opt, params, 3)
    return copy.deepcopy(opt.state_dict()), [a.clone() for a in ema.averages], [a.clone() for a in pswa.averages]


def test_sampler_attached_after_load_claims_its_state():
    sd, ema_avg, pswa_avg = saved_run()
    params, opt = fresh(seed=1)
    opt.load_state_dict(sd)  # timm's order: the EMA is created after the optimizer is restored
    ema = EMA(opt, decay=0.5)
    pswa = PSWA(opt, steps_per_epoch=4, alpha=0.5)
    assert all(torch.equal(a, b) for a, b in zip(ema.averages, ema_avg))
    assert all(torch.equal(a, b) for a, b in zip(pswa.averages, pswa_avg))
    assert ema.total_steps == 3 and pswa.step_in_epoch == 3
    train(opt, params, 1)


def test_samplers_attached_in_another_order_before_load():
    sd, ema_avg, pswa_avg = saved_run()
    params, opt = fresh(seed=1)
    pswa = PSWA(opt, steps_per_epoch=4, alpha=0.5)
    ema = EMA(opt, decay=0.5)
    opt.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(ema.averages, ema_avg))
    assert all(torch.equal(a, b) for a, b in zip(pswa.averages, pswa_avg))


def test_named_samplers_of_one_class():
    params, opt = fresh()
    fast, slow = EMA(opt, decay=0.5, name="fast"), EMA(opt, decay=0.9, name="slow")
    train(opt, params, 3)
    sd = copy.deepcopy(opt.state_dict())
    # NOTE [state-resident extras]: each sampler's average in each param's state, its counters on the first
    assert "fasttricks_samplers" not in sd
    assert all({"fast/average", "slow/average"} <= set(s) for s in sd["state"].values())
    assert sd["state"][0]["fast/total_steps"] == 3 and sd["state"][0]["slow/config/decay"] == 0.9
    params2, opt2 = fresh(seed=1)
    slow2 = EMA(opt2, decay=0.9, name="slow")
    opt2.load_state_dict(sd)
    fast2 = EMA(opt2, decay=0.5, name="fast")
    assert all(torch.equal(a, b) for a, b in zip(slow2.averages, slow.averages))
    assert all(torch.equal(a, b) for a, b in zip(fast2.averages, fast.averages))
    with pytest.raises(ValueError, match="already has a sampler named"):
        EMA(opt2, name="fast")


def test_unclaimed_sampler_state_is_an_error_at_the_next_step():
    sd, *_ = saved_run()
    params, opt = fresh(seed=1)
    opt.load_state_dict(sd)
    EMA(opt, decay=0.5)  # the PSWA entry stays unclaimed
    with pytest.raises(RuntimeError, match=r"\['PSWA'\].*discard_sampler_state"):
        train(opt, params, 1)
    assert opt.discard_sampler_state() == ["PSWA"]
    train(opt, params, 1)


def test_a_mismatched_sampler_state_loads_nothing():
    sd, ema_avg, _ = saved_run()
    params, opt = fresh(seed=1)
    pswa = PSWA(opt, steps_per_epoch=4, alpha=0.25)  # saved with alpha=0.5
    before = [a.clone() for a in pswa.averages]
    opt_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="alpha"):
        opt.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(pswa.averages, before))
    assert (pswa.total_steps, pswa.step_in_epoch, pswa.samples) == (0, 0, 0)
    assert opt.state_dict()["state"] == opt_before["state"] == {}


def legacy_checkpoint(keys):
    """A checkpoint as earlier versions wrote it: the samplers' states beside the optimizer's."""
    params, opt = fresh()
    ema = EMA(opt, decay=0.5)
    pswa = PSWA(opt, steps_per_epoch=4, alpha=0.5)
    train(opt, params, 3)
    sd = copy.deepcopy(opt.state_dict())
    for state in sd["state"].values():
        for k in [k for k in state if "/" in k]:
            del state[k]
    sd["fasttricks_samplers"] = copy.deepcopy(dict(zip(keys, (ema.state_dict(), pswa.state_dict()))))
    return sd


@pytest.mark.parametrize("keys", [("EMA", "PSWA"), ("0:EMA", "1:PSWA")], ids=["by key", "by attach order"])
def test_checkpoints_of_earlier_versions_still_load(keys):
    sd = legacy_checkpoint(keys)
    _, ema_avg, _ = saved_run()
    params, opt = fresh(seed=1)
    ema = EMA(opt, decay=0.5)
    pswa = PSWA(opt, steps_per_epoch=4, alpha=0.5)
    opt.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(ema.averages, ema_avg))
    assert pswa.total_steps == 3


def test_a_checkpoint_of_an_earlier_version_claimed_after_load_resaves_in_the_state():
    sd = legacy_checkpoint(("EMA", "PSWA"))
    _, ema_avg, pswa_avg = saved_run()
    params, opt = fresh(seed=1)
    opt.load_state_dict(sd)
    ema, pswa = EMA(opt, decay=0.5), PSWA(opt, steps_per_epoch=4, alpha=0.5)
    assert all(torch.equal(a, b) for a, b in zip(ema.averages, ema_avg))
    assert all(torch.equal(a, b) for a, b in zip(pswa.averages, pswa_avg))
    new = opt.state_dict()
    assert "fasttricks_samplers" not in new and new["state"][0]["PSWA/step_in_epoch"] == 3


def test_a_torch_adam_whose_first_param_has_no_grad_yet_keeps_its_own_init():
    """A torch optimizer takes an empty state for 'not initialised' (Adam:
    len(state) == 0): no entry of ours goes into the state of a param it has
    not stepped, counters included; that param still initialises later."""
    a, b = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=0.1)
    ema = EMA(opt, decay=0.5)
    b.grad = torch.ones(2)
    opt.step()
    sd = opt.state_dict()
    assert a not in opt.state or not opt.state[a]
    assert sd["state"][1]["EMA/total_steps"] == 1 and "EMA/average" in sd["state"][1]
    a.grad = torch.ones(3)
    opt.step()  # torch initialises a's state now
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(opt.state[a]) and ema.total_steps == 2
    params, opt2 = [a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()], None
    opt2 = torch.optim.Adam(params, lr=0.1)
    ema2 = EMA(opt2, decay=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert ema2.total_steps == 2 and all(torch.equal(x, y) for x, y in zip(ema.averages, ema2.averages))
