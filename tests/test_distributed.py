"""DDP on CPU with gloo and 2 processes: the fused optimizer and samplers keep
both ranks identical and equal to one process on the global batch; BN
recalibration averages across ranks; the demo runs under torchrun."""
import json
import os
import shutil
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ddp_worker
from helpers import BACKENDS

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_two_rank_ddp_matches_one_process(tmp_path, backend):
    mp.spawn(ddp_worker.train, args=(2, str(tmp_path / "init"), str(tmp_path), backend), nprocs=2, join=True)
    ddp_worker.train(0, 1, None, str(tmp_path), backend)
    r0, r1 = (torch.load(tmp_path / f"ddp_rank{r}_of2.pt") for r in (0, 1))
    single = torch.load(tmp_path / "ddp_rank0_of1.pt")
    for key in ("params", "pwalks", "ema", "bn"):
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b), key  # the ranks agree bit for bit
    for key in ("params", "pwalks", "ema"):  # and equal one process on the global batch
        torch.testing.assert_close(r0[key], single[key], rtol=1e-5, atol=1e-6)
    # BN: the mean over ranks of each rank's cumulative mean of its shard batches
    per_rank = [torch.stack(r["shard_means"]).mean(0) for r in (r0, r1)]
    torch.testing.assert_close(r0["bn"][0], (per_rank[0] + per_rank[1]) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fsdp2_fully_shard(tmp_path, backend):
    """FSDP2 params are DTensors: the fused plans step each rank's local shards
    (NOTE [DTensor shards]), the reference steps the DTensors with torch ops;
    samplers included, the ranks agree and match one process."""
    pytest.importorskip("torch.distributed.fsdp").fully_shard
    mp.spawn(ddp_worker.train, args=(2, str(tmp_path / "init"), str(tmp_path), backend, "fsdp2"), nprocs=2,
             join=True)
    ddp_worker.train(0, 1, None, str(tmp_path), "reference", "fsdp2")
    r0, r1 = (torch.load(tmp_path / f"fsdp2_rank{r}_of2.pt") for r in (0, 1))
    single = torch.load(tmp_path / "fsdp2_rank0_of1.pt")
    assert r0["plans"] == (["SgdPlan"] if backend == "auto" else ["ReferenceSgdPlan"])
    for key in ("params", "pwalks", "ema"):
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b), key
        torch.testing.assert_close(r0[key], single[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fsdp2_clip_grad_norm_with_one_all_reduce(tmp_path, backend):
    """opt.clip_grad_norm_ on FSDP2's sharded grads: each rank's norm of its
    shards, one all-reduce, the clip folded into the step; the norms and the
    training equal one process's (which clips whole grads)."""
    pytest.importorskip("torch.distributed.fsdp").fully_shard
    mp.spawn(ddp_worker.train, args=(2, str(tmp_path / "init"), str(tmp_path), backend, "fsdp2", True), nprocs=2,
             join=True)
    ddp_worker.train(0, 1, None, str(tmp_path), "reference", "fsdp2", True)
    r0, r1 = (torch.load(tmp_path / f"fsdp2_clip_rank{r}_of2.pt") for r in (0, 1))
    single = torch.load(tmp_path / "fsdp2_clip_rank0_of1.pt")
    assert len(single["norms"]) == 12 and max(float(n) for n in single["norms"]) > 0.05  # the clip bites
    assert r0["all_reduces"] == r1["all_reduces"] == [1] * 12 and single["all_reduces"] == [0] * 12
    for key in ("norms", "params", "ema"):
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b), key
        torch.testing.assert_close(r0[key], single[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_demo_runs_under_torchrun(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    out = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "fasttricks.cli", "demo", "--ddp",
                          "--epochs", "2", "--seeds", "1", "--recipes", "plain_sgd,pwalks", "--no-progress",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["recipe"] for r in report["summary"]] == ["plain_sgd", "pwalks"]
    assert all(0 < r["final_acc_mean"] <= 100 for r in report["summary"])
