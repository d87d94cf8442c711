"""torch.distributed.checkpoint (DCP) round trips the whole optimizer: the
state, torch's keys only in param_groups (NOTE [group options]), and the
extras that ride in the per-param state (NOTE [state-resident extras]): the
samplers' averages and counters and the stochastic-rounding counters. A run
resumed through DCP, flattened (torchtitan's setting) or not, continues bit for
bit as the uninterrupted run; FSDP2's sharded checkpoint of 2 ranks loads
into 1."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ddp_worker
import fasttricks.optim as fo
from ddp_worker import dcp_model as model_of, dcp_train as train
from fasttricks.sampling import EMA, PSWA

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,  # noqa: E402
                                                     set_state_dict)

SETUPS = {
    "AdamW+EMA+SR": dict(make=lambda ps: fo.AdamW(ps, lr=1e-2, stochastic_rounding=True, rounding_seed=7),
                         dtype=torch.bfloat16, samplers=lambda o: [EMA(o, decay=0.9, model=None)]),
    "SGD+PSWA+EMA": dict(make=lambda ps: fo.SGD(ps, lr=0.1, momentum=0.9, backend="reference"),
                         dtype=torch.float32,
                         samplers=lambda o: [PSWA(o, steps_per_epoch=4, alpha=0.5), EMA(o, decay=0.5)]),
    "SGDW no momentum+EMA": dict(make=lambda ps: fo.SGDW(ps, lr=0.1, weight_decay=0.1), dtype=torch.float32,
                                 samplers=lambda o: [EMA(o, decay=0.8)]),
}


def snapshot(model, opt, samplers):
    out = {f"p{i}": p.detach().clone() for i, p in enumerate(model.parameters())}
    for s in samplers:
        out.update({f"{s.key}{i}": a.clone() for i, a in enumerate(s.averages)})
        out[f"{s.key}.counters"] = torch.tensor([getattr(s, k) for k in s._COUNTERS])
    out["rounding"] = torch.tensor([opt.rounding_seed, opt._ft_round_step])
    return out


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_resume_through_dcp_is_bit_identical(tmp_path, setup, flatten):
    cfg = SETUPS[setup]
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model = model_of(cfg["dtype"])
    opt = cfg["make"](list(model.parameters()))
    samplers = cfg["samplers"](opt)
    train(model, opt, 3, 0)
    msd, osd = get_state_dict(model, opt, options=options)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
    assert not any(k in g for g in opt.param_groups for k in ("backend", "master_weights", "state_dtype"))
    train(model, opt, 3, 3)
    want = snapshot(model, opt, samplers)

    model2 = model_of(cfg["dtype"])
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # a different start: everything must come from the checkpoint
    opt2 = cfg["make"](list(model2.parameters()))
    samplers2 = cfg["samplers"](opt2)
    msd2, osd2 = get_state_dict(model2, opt2, options=options)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    train(model2, opt2, 3, 3)
    got = snapshot(model2, opt2, samplers2)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_torch_optimizer_with_a_sampler_resumes_through_dcp(tmp_path):
    """The post-hook samplers of a torch optimizer ride in its state too."""
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model = model_of(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(opt, decay=0.7)
    train(model, opt, 3, 0)
    msd, osd = get_state_dict(model, opt, options=options)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
    train(model, opt, 2, 3)
    model2 = model_of(torch.float32)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    ema2 = EMA(opt2, decay=0.7)
    msd2, osd2 = get_state_dict(model2, opt2, options=options)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    train(model2, opt2, 2, 3)
    assert ema2.total_steps == ema.total_steps == 5
    assert all(torch.equal(a, b) for a, b in zip(ema.averages, ema2.averages))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_fsdp2_checkpoint_of_two_ranks_loads_into_one_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp").fully_shard
    ckpt = str(tmp_path / "ckpt")
    mp.spawn(ddp_worker.fsdp2_dcp_save, args=(2, str(tmp_path / "init"), ckpt), nprocs=2, join=True)
    full = torch.load(f"{ckpt}/full.pt")
    model = model_of(torch.float32)
    opt = fo.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(opt, decay=0.8)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), full["model"][name]), name
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], full["optim"]["state"][name][k]), (name, k)
    assert all(torch.equal(a, b) for a, b in zip(ema.averages, full["ema"]))
    assert ema.total_steps == 3


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("direction", ["torch->fasttricks", "fasttricks->torch"])
def test_dcp_checkpoints_cross_between_torch_and_fasttricks(tmp_path, direction, flatten):
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    makers = [lambda ps: torch.optim.AdamW(ps, lr=1e-2), lambda ps: fo.AdamW(ps, lr=1e-2)]
    save_make, load_make = makers if direction == "torch->fasttricks" else makers[::-1]
    model = model_of(torch.float32)
    opt = save_make(model.parameters())
    train(model, opt, 3, 0)
    msd, osd = get_state_dict(model, opt, options=options)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
    train(model, opt, 2, 3)
    model2 = model_of(torch.float32)
    opt2 = load_make(model2.parameters())
    msd2, osd2 = get_state_dict(model2, opt2, options=options)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    assert [sorted(g) for g in opt2.param_groups] == [sorted(g) for g in opt.param_groups]
    train(model2, opt2, 2, 3)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
