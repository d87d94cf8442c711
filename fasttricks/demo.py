"""`fasttricks demo`: a small ResNet trained on real data with several recipes
over several seeds, and an honest report (README, the demo).

Recipes share the model initialisation, the data order and the optimizer
(SGD, momentum 0.9, weight decay 5e-4) of each seed; they differ only in the
trick they add:

    plain_sgd        step decay of the lr at 50% and 75% of the run
    bag_of_tricks    Bag of Tricks: warmup + cosine, label smoothing 0.1, mixup 0.2,
                     no bias decay, zero gamma
    pswa, pwalks,    plain_sgd + the sampler (Tripathi & Shah), params reassigned and
    pswm             BN recalibrated on 20% of the data at every epoch end
    swa              plain_sgd + SWA from 75% of the run (evaluated with the
                     average and recalibrated BN)
    ema              plain_sgd + EMA (evaluated with the averaged weights)
    random_gradient  plain_sgd + random gradient (Wei), r ~ U(0, 1)
                     folded into the fused step

The report gives the final accuracy (mean +- sd over seeds), the standard
deviation of test accuracy over the last epochs and the share of epochs that
improve / stay within 0.2 points (Tripathi & Shah, Tables 4-5), time per epoch and
the sampling overhead against plain_sgd. Nothing is tuned per recipe.
"""
from __future__ import annotations

import copy
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import fasttricks
from fasttricks import models, sampling, schedules, tricks
from fasttricks.data import Batches, load_cifar10, load_digits
from fasttricks.losses import soft_target_cross_entropy
from fasttricks.mixup import Mixup
from fasttricks.optim import SGD

__all__ = ["DemoConfig", "RECIPES", "Diverged", "run_demo", "train_recipe"]


class Diverged(RuntimeError):
    """A run's training loss became NaN or infinite."""

RECIPES = ("plain_sgd", "bag_of_tricks", "pswa", "pwalks", "pswm", "swa", "ema", "random_gradient")
SAMPLING_RECIPES = ("pswa", "pwalks", "pswm", "swa", "ema")
# Asked for by name (--recipes), beside plain_sgd: the plain recipe with the
# model, its grads and its momentum in bf16, rounded to nearest (as torch
# does) or stochastically (docs/precision.md). Not in the default run: bf16
# convolutions are slow on most CPUs.
PRECISION_RECIPES = ("bf16", "bf16_sr")
ALL_RECIPES = RECIPES + PRECISION_RECIPES


class _Bf16(torch.nn.Module):
    """The model in bf16: inputs cast in, logits cast out to fp32 for the loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, x):
        return self.model(x.to(torch.bfloat16)).float()


@dataclass
class DemoConfig:
    data: str = "digits"
    data_dir: str | None = None
    epochs: int = 30
    seeds: int = 3
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    recipes: tuple[str, ...] = RECIPES
    out: str = "demo_out"
    quick: bool = False
    ddp: bool = False
    bn_fraction: float = 0.2
    progress: bool = True

    @classmethod
    def quick_config(cls, **kw) -> "DemoConfig":
        return cls(**{"epochs": 8, "seeds": 2, "quick": True, **kw})


def load_data(cfg: DemoConfig):
    if cfg.data == "digits":
        return load_digits()
    if cfg.data == "cifar10":
        if not cfg.data_dir:
            raise ValueError("--data cifar10 needs --data-dir (the folder with cifar-10-batches-py)")
        return load_cifar10(cfg.data_dir)
    raise ValueError(f"unknown data set {cfg.data!r} (digits or cifar10)")


def build_model(cfg: DemoConfig, in_channels: int, num_classes: int, zero_gamma: bool):
    if cfg.data == "digits":  # 8x8 images: one block per stage, narrow
        return models.ResNet(models.BasicBlock, [1, 1, 1, 1], num_classes, variant="D", zero_gamma=zero_gamma,
                             small_input=True, in_channels=in_channels, base_width=16)
    return models.resnet18(num_classes, variant="D", zero_gamma=zero_gamma, small_input=True,
                           in_channels=in_channels, base_width=32 if cfg.quick else 64)


@torch.no_grad()
def accuracy(model, x, y, batch_size: int = 512) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was)
    return 100.0 * correct / max(1, len(x))


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_recipe(recipe: str, seed: int, data, cfg: DemoConfig) -> dict:
    """Train one recipe for one seed; returns its curves and timings."""
    if recipe not in ALL_RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {ALL_RECIPES}")
    x_train, y_train, x_test, y_test = data
    num_classes = int(y_train.max()) + 1
    rank, world = _dist()
    torch.manual_seed(seed)
    bot = recipe == "bag_of_tricks"
    model = build_model(cfg, x_train.shape[1], num_classes, zero_gamma=bot)
    if recipe in PRECISION_RECIPES:
        model = _Bf16(model)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    params = tricks.param_groups(model, cfg.weight_decay) if bot else model.parameters()
    opt = SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=0.0 if bot else cfg.weight_decay,
              stochastic_rounding=recipe == "bf16_sr", rounding_seed=seed)
    train = Batches(x_train, y_train, cfg.batch_size * world, seed=seed, shard=(rank, world))
    bn_loader = Batches(x_train, y_train, cfg.batch_size, seed=seed + 1, shard=(rank, world))
    b, E = len(train), cfg.epochs
    if bot:
        sched = schedules.warmup_cosine(opt, warmup_steps=max(1, E // 10) * b, total_steps=E * b)
    else:
        sched = schedules.StepDecay(opt, milestones=[E * b // 2, E * b * 3 // 4], gamma=0.1)
    mixer = Mixup(alpha=0.2, num_classes=num_classes, label_smoothing=0.1, seed=seed) if bot else None
    sampler = {"pswa": lambda: sampling.PSWA(opt, b, alpha=0.5, seed=seed),
               "pwalks": lambda: sampling.PWALKS(opt, b, k=0.05),
               "pswm": lambda: sampling.PSWM(opt, b, m=0.5, alpha=1.0, seed=seed),
               "swa": lambda: sampling.SWA(opt, b, start_epoch=E * 3 // 4),
               "ema": lambda: sampling.EMA(opt, decay=0.99, warmup=True, model=model)}.get(recipe, lambda: None)()
    if recipe == "random_gradient":
        tricks.RandomGradient(0.0, 1.0, seed=seed).fold_into(opt)
    accs, train_losses, epoch_times, lrs = [], [], [], []
    for epoch in range(E):
        train.set_epoch(epoch)
        t0 = time.perf_counter()
        net.train()
        total, count = 0.0, 0
        for xb, yb in train:
            lrs.append(float(opt.param_groups[0]["lr"]))
            opt.zero_grad(set_to_none=True)
            if mixer is not None:
                xb, target = mixer.mix(xb.clone(), yb)
                loss = soft_target_cross_entropy(net(xb), target)
            else:
                loss = F.cross_entropy(net(xb), yb)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise Diverged(f"{recipe} seed {seed}: the training loss became {value} in epoch {epoch + 1} "
                               f"(lr {cfg.lr:g}); try a smaller --lr")
            loss.backward()
            opt.step()
            sched.step()
            total += value * len(yb)
            count += len(yb)
        if sampler is not None:  # BN is recalibrated only by the methods that reassign
            sampler.end_epoch(model=model, bn_loader=bn_loader, bn_fraction=cfg.bn_fraction)
        epoch_times.append(time.perf_counter() - t0)
        train_losses.append(total / max(1, count))
        if recipe == "ema":
            with sampler.averaged_parameters():
                accs.append(accuracy(model, x_test, y_test))
        elif recipe == "swa" and sampler.total_samples > 0:
            averaged = copy.deepcopy(model)
            sampler.copy_to(averaged)
            sampling.recalibrate_bn(averaged, bn_loader)
            accs.append(accuracy(averaged, x_test, y_test))
        else:
            accs.append(accuracy(model, x_test, y_test))
    return {"recipe": recipe, "seed": seed, "test_acc": accs, "train_loss": train_losses,
            "epoch_seconds": epoch_times, "lr": lrs, "steps_per_epoch": b}


def stability(curves: list[list[float]], last: int) -> dict:
    """Tripathi & Shah's Tables 4-5: SD of test accuracy over the last `last` epochs,
    and the share of epochs that improve on the previous epoch, stay within
    0.2 points of it, and stay within 0.2 points of the best so far."""
    sds, improve, within_prev, within_best, n = [], 0, 0, 0, 0
    for acc in curves:
        tail = acc[-last:]
        sds.append(statistics.pstdev(tail) if len(tail) > 1 else 0.0)
        best = acc[0]
        for prev, cur in zip(acc, acc[1:]):
            improve += cur > prev
            within_prev += cur >= prev - 0.2
            within_best += cur >= best - 0.2
            best = max(best, cur)
            n += 1
    return {"sd_last_epochs": statistics.mean(sds), "pct_improving": 100.0 * improve / max(1, n),
            "pct_within_0.2_of_previous": 100.0 * within_prev / max(1, n),
            "pct_within_0.2_of_best": 100.0 * within_best / max(1, n)}


def summarise(runs: list[dict], epochs: int) -> list[dict]:
    last = max(3, epochs // 4)
    by_recipe: dict[str, list[dict]] = {}
    for r in runs:
        by_recipe.setdefault(r["recipe"], []).append(r)
    # Medians: the process's first epochs pay one-off warm-up costs.
    plain_time = None
    if "plain_sgd" in by_recipe:
        plain_time = statistics.median(t for r in by_recipe["plain_sgd"] for t in r["epoch_seconds"])
    rows = []
    for recipe, rs in by_recipe.items():
        finals = [r["test_acc"][-1] for r in rs]
        sec = statistics.median(t for r in rs for t in r["epoch_seconds"])
        row = {"recipe": recipe, "seeds": len(rs), "final_acc_mean": statistics.mean(finals),
               "final_acc_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
               "best_acc_mean": statistics.mean(max(r["test_acc"]) for r in rs), "last_epochs": last,
               **stability([r["test_acc"] for r in rs], last), "seconds_per_epoch": sec}
        if plain_time and recipe in SAMPLING_RECIPES:
            row["overhead_pct_vs_plain"] = 100.0 * (sec / plain_time - 1.0)
        rows.append(row)
    return rows


def write_report(out: Path, cfg: DemoConfig, runs: list[dict], rows: list[dict], command: str, seconds: float,
                 status: str = "complete", failed: list[dict] = (), plots: bool = True):
    out.mkdir(parents=True, exist_ok=True)
    env = {"fasttricks": fasttricks.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "machine": platform.machine(),
           "backends": {k: v["available"] for k, v in fasttricks.backends().items()}}
    (out / "report.json").write_text(json.dumps({"config": asdict(cfg), "command": command, "status": status,
                                                  "environment": env, "wall_seconds": seconds, "summary": rows,
                                                  "runs": runs, "failed": list(failed)}, indent=1) + "\n")
    lines = [f"# fasttricks demo: {cfg.data}, {cfg.epochs} epochs, {cfg.seeds} seeds", "",
             f"Command: `{command}`  ", f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{seconds:.0f} s wall. Status: **{status}** ({len(runs)} runs finished).", ""]
    lines += [f"- failed: {f['error']}" for f in failed] + ([""] if failed else [])
    if not rows:
        (out / "report.md").write_text("\n".join(lines + ["No run has finished yet.", ""]))
        return
    lines += ["| recipe | final test acc (%) | best (%) | SD last {n} epochs | epochs improving | within 0.2 of "
              "previous | within 0.2 of best | s / epoch | overhead vs plain |".format(n=rows[0]["last_epochs"]),
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        over = f"{r['overhead_pct_vs_plain']:+.1f}%" if "overhead_pct_vs_plain" in r else ""
        lines.append(f"| {r['recipe']} | {r['final_acc_mean']:.2f} ± {r['final_acc_sd']:.2f} | "
                     f"{r['best_acc_mean']:.2f} | {r['sd_last_epochs']:.2f} | {r['pct_improving']:.0f}% | "
                     f"{r['pct_within_0.2_of_previous']:.0f}% | {r['pct_within_0.2_of_best']:.0f}% | "
                     f"{r['seconds_per_epoch']:.3f} | {over} |")
    lines += ["", "Accuracy is the mean over seeds; SD over the last epochs is averaged over seeds. "
              "Time per epoch is the median over epochs and seeds; overhead is that time (training plus epoch-end reassignment and BN recalibration) "
              "against plain_sgd. Plots: `accuracy.png`, `lr_schedule.png`.", ""]
    (out / "report.md").write_text("\n".join(lines))
    if plots:
        _plots(out, runs)


STYLES = ["-", "--", "-.", ":"]


def _accuracy_plot(path: Path, by_recipe: dict[str, list[list[float]]]) -> None:
    """Two panels: the whole run, and the second half zoomed to the range
    where the recipes differ. Each recipe: the mean over seeds, a band of one
    standard deviation across seeds, its own colour and line style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    colours = plt.get_cmap("tab10").colors
    lows, highs, epochs = [], [], 0
    for k, (recipe, accs) in enumerate(by_recipe.items()):
        mean = [statistics.mean(c) for c in zip(*accs)]
        sd = [statistics.pstdev(c) for c in zip(*accs)]
        xs = list(range(1, len(mean) + 1))
        epochs = max(epochs, len(mean))
        style = dict(color=colours[k % len(colours)], linestyle=STYLES[k % len(STYLES)], linewidth=1.6)
        for ax in (full, zoom):
            ax.plot(xs, mean, label=recipe, marker="o" if len(xs) <= 12 else None, markersize=3, **style)
            ax.fill_between(xs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=style["color"], alpha=0.12, linewidth=0)
        tail = slice(len(mean) // 2, None)
        lows.append(min(m - s for m, s in zip(mean[tail], sd[tail])))
        highs.append(max(m + s for m, s in zip(mean[tail], sd[tail])))
    if lows:
        low, high = min(lows), max(highs)
        pad = max(0.05, 0.08 * (high - low))
        zoom.set_xlim(max(1, epochs // 2 + 1) - 0.3, epochs + 0.3)
        zoom.set_ylim(low - pad, high + pad)
    full.set_title("whole run")
    zoom.set_title("second half, zoomed to where the recipes differ")
    from matplotlib.ticker import MaxNLocator

    for ax in (full, zoom):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    full.set_ylabel("test accuracy (%): mean over seeds, band = 1 SD")
    zoom.legend(fontsize=8, loc="lower right", ncol=2)
    fig.suptitle("fasttricks demo: test accuracy per recipe")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _line_plot(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, height: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, height))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plots(out: Path, runs: list[dict]) -> None:
    by_recipe: dict[str, list[list[float]]] = {}
    for r in runs:
        by_recipe.setdefault(r["recipe"], []).append(r["test_acc"])
    _accuracy_plot(out / "accuracy.png", by_recipe)
    lrs = {}
    for recipe in ("plain_sgd", "bag_of_tricks"):
        lr = next((r["lr"] for r in runs if r["recipe"] == recipe), None)
        if lr:
            lrs[recipe] = (list(range(len(lr))), lr)
    _line_plot(out / "lr_schedule.png", lrs, "step", "learning rate", 3.5)


def run_demo(cfg: DemoConfig, command: str | None = None) -> dict:
    """Train every recipe for every seed and write the report (rank 0). The
    report is rewritten after every finished run (marked partial until the
    last), so an interruption loses no finished run. A run whose loss
    diverges is recorded as failed and the others go on; `failed` lists them.
    Ctrl-C (KeyboardInterrupt) writes the partial report, then re-raises."""
    rank, world = _dist()
    data = load_data(cfg)
    runs, failed = [], []
    jobs = [(recipe, seed) for seed in range(cfg.seeds) for recipe in cfg.recipes]
    out, command = Path(cfg.out), command or "fasttricks demo"
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="demo", unit="run", file=sys.stderr)
    t0 = time.perf_counter()

    def report(status: str):
        if rank == 0:
            write_report(out, cfg, runs, summarise(runs, cfg.epochs) if runs else [], command,
                         time.perf_counter() - t0, status=status, failed=failed, plots=status != "running")

    report("running")  # no older report stays in place as if it were this run's
    try:
        for recipe, seed in jobs:
            if bar is not None:
                bar.set_postfix_str(f"{recipe} seed {seed}")
            try:
                runs.append(train_recipe(recipe, seed, data, cfg))
            except Diverged as exc:
                failed.append({"recipe": recipe, "seed": seed, "error": str(exc)})
            if bar is not None:
                bar.update(1)
            if len(runs) + len(failed) < len(jobs):
                report("running")
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        report(f"partial: interrupted after {len(runs) + len(failed)} of {len(jobs)} runs")
        raise
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    rows = summarise(runs, cfg.epochs) if runs else []
    report("complete" if not failed else f"complete, {len(failed)} of {len(jobs)} runs failed")
    return {"summary": rows, "runs": runs, "failed": failed, "wall_seconds": seconds}
