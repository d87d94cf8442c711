"""Worker for tests/test_distributed.py (importable by spawned processes)."""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fasttricks
from fasttricks.data import Batches
from fasttricks.sampling import EMA, PWALKS, recalibrate_bn


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return x, (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()


def full(tensors):
    """Whole tensors (DTensor shards are gathered: a collective, every rank calls it)."""
    return [t.full_tensor() if hasattr(t, "full_tensor") else t.detach() for t in tensors]


def train(rank, world, init_file, out_dir, backend="cpu", wrap="ddp", clip=False):
    """`clip`: opt.clip_grad_norm_ before every step (its norms are saved)."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    net = model
    if world > 1 and wrap == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    elif world > 1 and wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    opt = fasttricks.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
    x, y = data()
    batches = Batches(x, y, 16, seed=0, shard=(rank, world))
    pwalks = PWALKS(opt, steps_per_epoch=len(batches), k=0.5)
    ema = EMA(opt, decay=0.8)
    norms, reduces = [], []
    for epoch in range(3):
        batches.set_epoch(epoch)
        for xb, yb in batches:
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            if clip:  # counting the all-reduces the norm takes
                real, calls = dist.all_reduce, []
                dist.all_reduce = lambda *a, **kw: calls.append(1) or real(*a, **kw)
                try:
                    norms.append(opt.clip_grad_norm_(0.05))
                finally:
                    dist.all_reduce = real
                reduces.append(len(calls))
            opt.step()
        pwalks.end_epoch()
    # BN statistics from each rank's shard, averaged across ranks.
    bn = torch.nn.BatchNorm1d(8)
    recalibrate_bn(torch.nn.Sequential(bn), [(xb, yb) for xb, yb in batches])
    plans = [type(plan).__name__ for entry in opt._ft_engine.cache.groups.values() for plan in entry.buckets]
    torch.save({"params": full(model.parameters()), "pwalks": full(pwalks.averages), "ema": full(ema.averages),
                "plans": plans, "norms": full(norms), "all_reduces": reduces,
                "bn": (bn.running_mean, bn.running_var), "shard_means": [xb.mean(0) for xb, _ in batches]},
               f"{out_dir}/{wrap}{'_clip' if clip else ''}_rank{rank}_of{world}.pt")
    if world > 1:
        # Both ranks past their last collective before either closes its
        # connections; then leave without the interpreter's teardown, where
        # gloo's threads once aborted a finished rank under load (SIGABRT,
        # "terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ---- tests/test_dcp.py ----

def dcp_model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(dtype)


def dcp_train(model, opt, steps, start):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(5, 6, generator=g).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


def fsdp2_dcp_save(rank, world, init_file, ckpt):
    """tests/test_dcp.py: FSDP2 on `world` ranks trains, saves a sharded DCP
    checkpoint, and rank 0 saves the full state beside it for comparison."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = dcp_model(torch.float32)
    fully_shard(model)
    opt = fasttricks.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(opt, decay=0.8)
    dcp_train(model, opt, 3, 0)
    msd, osd = get_state_dict(model, opt)  # sharded: each rank writes its shards
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    full = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    averages = [a.full_tensor() for a in ema.averages]
    if rank == 0:
        torch.save({"model": full[0], "optim": full[1], "ema": averages}, f"{ckpt}/full.pt")
    dist.barrier()  # as train(): past the last collective, then out without the interpreter's teardown
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
