"""`fasttricks demo --quick` end to end: the report's structure, and numbers
that are computed from the runs (not constants)."""
import json
import shutil
import statistics
import subprocess
import sys

import pytest

from fasttricks.demo import RECIPES, stability, summarise


def fasttricks_command():
    exe = shutil.which("fasttricks")
    return [exe] if exe else [sys.executable, "-m", "fasttricks.cli"]


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = subprocess.run(fasttricks_command() + ["demo", "--quick", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    root = tmp_path / "out"
    report = json.loads((root / "report.json").read_text())
    runs, summary = report["runs"], report["summary"]
    assert report["config"]["quick"] and len(runs) == len(RECIPES) * report["config"]["seeds"]
    assert [r["recipe"] for r in summary] == list(RECIPES)
    epochs = report["config"]["epochs"]
    for run in runs:
        assert len(run["test_acc"]) == epochs and all(0 <= a <= 100 for a in run["test_acc"])
        assert len(run["lr"]) == epochs * run["steps_per_epoch"] and all(t > 0 for t in run["epoch_seconds"])
    for row in summary:  # the table is computed from the runs
        finals = [r["test_acc"][-1] for r in runs if r["recipe"] == row["recipe"]]
        assert row["final_acc_mean"] == pytest.approx(statistics.mean(finals))
        assert row["final_acc_mean"] > 50  # it learned: 10 classes, chance is 10%
    assert summarise(runs, epochs) == summary
    assert len({round(r["final_acc_mean"], 6) for r in summary} | {round(r["sd_last_epochs"], 6) for r in summary}) > 2
    assert any(len(set(r["test_acc"])) > 1 for r in runs)
    assert all(r["overhead"]["median_pct"] > 0 for r in summary if r["recipe"] in ("pswa", "pwalks", "pswm"))
    assert all(r["vs_plain"]["n"] == report["config"]["seeds"] for r in summary if r["recipe"] != "plain_sgd")
    assert {c["verdict"].split(" (")[0] for c in report["claims"]} <= {"reproduced", "not reproduced",
                                                                       "not testable here"}
    md = (root / "report.md").read_text()
    assert sum(line.startswith(f"| {r} |") for line in md.splitlines() for r in RECIPES) == len(RECIPES)
    assert "## The sources' claims" in md
    for png in ("accuracy.png", "differences.png", "lr_schedule.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report.md" in out.stdout


def test_stability_metrics_by_hand():
    m = stability([[50.0, 60.0, 59.9, 59.0, 61.0]], last=3)
    assert m["pct_improving"] == 50.0                # 60 > 50, 61 > 59
    assert m["pct_within_0.2_of_previous"] == 75.0   # all but 59.9 -> 59.0
    assert m["pct_within_0.2_of_best"] == 75.0       # 59.0 is 1.0 below the best 60
    assert m["sd_last_epochs"] == pytest.approx(statistics.pstdev([59.9, 59.0, 61.0]))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message given without a GPU")
def test_gpu_check_without_a_gpu_says_so(tmp_path):
    """`fasttricks check --device cuda` (bench/gpu_check.py) needs a CUDA device: without
    one it stops at once with one line and a non-zero exit, writing nothing."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    before = sorted((root / "bench" / "results").iterdir())
    out = subprocess.run(fasttricks_command() + ["check", "--device", "cuda", "--skip-benches"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == "gpu_check: no CUDA device visible"
    assert sorted((root / "bench" / "results").iterdir()) == before


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-3"], "argument --epochs: must be an integer >= 1, got -3"),
    (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
    (["--seeds", "0"], "argument --seeds: must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--recipes", "plain_sgd,nope"], "argument --recipes: unknown recipe(s) nope"),
    (["--jobs", "0"], "argument --jobs: must be an integer >= 1, got 0"),
    (["--data", "digits", "--train-size", "5000"], "train_size must be between the number of classes (10) and 1438, got 5000"),
])
def test_cli_rejects_bad_values_before_training(args, message):
    out = subprocess.run(fasttricks_command() + ["demo", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"fasttricks demo: error: {message}")


def test_cli_checks_the_output_folder_up_front(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = subprocess.run(fasttricks_command() + ["demo", "--out", str(blocker / "out")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "cannot write to --out" in out.stderr.strip().splitlines()[-1]


def test_cli_version():
    out = subprocess.run(fasttricks_command() + ["--version"], capture_output=True, text=True, timeout=120)
    import fasttricks

    assert out.returncode == 0 and out.stdout.strip() == f"fasttricks {fasttricks.__version__}"


@pytest.mark.parametrize("jobs", ["1", "2"])  # in this process, and in worker processes
def test_a_diverging_run_is_reported_and_fails_the_command(tmp_path, jobs):
    out = subprocess.run(fasttricks_command() + ["demo", "--epochs", "1", "--seeds", "2", "--recipes", "plain_sgd",
                                                 "--data", "digits", "--lr", "1e30", "--no-progress", "--jobs", jobs,
                                                 "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "the training loss became" in out.stderr and "try a smaller --lr" in out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "complete, 2 of 2 runs failed" and report["runs"] == []


def test_interrupt_writes_the_finished_runs_as_partial(tmp_path, monkeypatch):
    from fasttricks import cli, demo

    real, calls = demo.train_recipe, []

    def train_then_interrupt(recipe, seed, data, cfg):
        calls.append(recipe)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(recipe, seed, data, cfg)

    monkeypatch.setattr(demo, "train_recipe", train_then_interrupt)
    (tmp_path / "report.md").write_text("an older report")
    code = cli.main(["demo", "--epochs", "1", "--seeds", "1", "--recipes", "plain_sgd,ema", "--no-progress",
                     "--jobs", "1", "--out", str(tmp_path)])  # in this process, where the patch is
    assert code == 130
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "partial: interrupted after 1 of 2 runs"
    assert [r["recipe"] for r in report["runs"]] == ["plain_sgd"]
    assert "partial" in (tmp_path / "report.md").read_text()


def test_bf16_recipes_train_with_bf16_momentum():
    """--recipes bf16,bf16_sr: the plain recipe in bf16, rounded to nearest or
    stochastically (docs/precision.md); both learn MNIST-1D."""
    pytest.importorskip("mnist1d")
    from fasttricks.demo import PRECISION_RECIPES, DemoConfig, load_data, train_recipe

    cfg = DemoConfig.quick_config(epochs=2, seeds=1, progress=False)
    data = load_data(cfg)
    for recipe in PRECISION_RECIPES:
        run = train_recipe(recipe, 0, data, cfg)
        assert run["recipe"] == recipe and run["test_acc"][-1] > 0.5


def test_balanced_subset_takes_the_first_of_each_class_in_order():
    import torch

    from fasttricks.data import balanced_subset

    y = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1, 0])
    x = torch.arange(10).float()
    xs, ys = balanced_subset(x, y, 7)  # 3 classes: 3, 2, 2 (the first class takes the remainder)
    assert xs.tolist() == [0, 1, 2, 3, 4, 5, 6] and ys.tolist() == [0, 1, 0, 2, 1, 0, 2]
    xs, ys = balanced_subset(x, y, 6)
    assert sorted(ys.tolist()) == [0, 0, 1, 1, 2, 2] and xs.tolist() == [0, 1, 2, 3, 4, 6]
    with pytest.raises(ValueError, match="train_size"):
        balanced_subset(x, y, 2)


def test_mnist1d_is_generated_locally_and_leaves_the_global_generators_alone():
    pytest.importorskip("mnist1d")
    import random

    import numpy as np
    import torch

    from fasttricks.data import load_mnist1d

    np.random.seed(7)
    random.seed(7)
    x, y, xt, yt = load_mnist1d()
    assert x.shape == (4000, 1, 40) and xt.shape == (1000, 1, 40) and sorted(set(y.tolist())) == list(range(10))
    assert np.random.randint(1 << 30) == np.random.RandomState(7).randint(1 << 30)
    assert random.random() == random.Random(7).random()
    assert torch.equal(load_mnist1d()[0], x)  # the same data every time
