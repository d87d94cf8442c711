"""`fasttricks demo`: a small ResNet trained on real data with several recipes over several seeds, and an honest report.

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
and, asked for by name: cosine, label_smoothing, mixup (one Bag-of-Tricks
refinement each), half_lr (plain_sgd at half the lr), bf16 and bf16_sr (the
plain recipe in bf16, rounded to nearest or stochastically).

The report (fasttricks/demo_report.py) compares each recipe with plain_sgd
seed by seed, gives the stability measures of Tripathi & Shah's Tables 4-5
and each recipe's extra cost, and checks the sources' claims one by one.
Nothing is tuned per recipe.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fasttricks import models, sampling, schedules, tricks
from fasttricks.data import Batches, load_data_set
from fasttricks.demo_report import stability, summarise, write_report
from fasttricks.losses import soft_target_cross_entropy
from fasttricks.mixup import Mixup
from fasttricks.optim import SGD

__all__ = ["DemoConfig", "RECIPES", "ALL_RECIPES", "Diverged", "run_demo", "train_recipe", "stability", "summarise"]


class Diverged(RuntimeError):
    """A run's training loss became NaN or infinite."""

RECIPES = ("plain_sgd", "bag_of_tricks", "pswa", "pwalks", "pswm", "swa", "ema", "random_gradient")
SAMPLING_RECIPES = ("pswa", "pwalks", "pswm", "swa", "ema")
# Asked for by name (--recipes), beside plain_sgd: one Bag-of-Tricks refinement
# at a time, and plain_sgd at half the lr (random gradient's mean lr scale), so
# that the report can test the sources' claims about each (demo_report).
SINGLE_TRICK_RECIPES = ("cosine", "label_smoothing", "mixup", "half_lr")
# The plain recipe with the model, its grads and its momentum in bf16, rounded
# to nearest (as torch does) or stochastically (docs/precision.md).
PRECISION_RECIPES = ("bf16", "bf16_sr")
ALL_RECIPES = RECIPES + SINGLE_TRICK_RECIPES + PRECISION_RECIPES
# Recipes whose extra cost is in the optimizer step and the epoch-end work:
# their steps are timed beside a plain SGD step (demo_report.overhead).
COSTED_RECIPES = SAMPLING_RECIPES + ("random_gradient",)


class _Bf16(torch.nn.Module):
    """The model in bf16: inputs cast in, logits cast out to fp32 for the loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, x):
        return self.model(x.to(torch.bfloat16)).float()


MNIST1D_WIDTH = 16


@dataclass
class DemoConfig:
    data: str = "mnist1d"
    data_dir: str | None = None
    epochs: int = 30
    seeds: int = 8  # paired 95% intervals of +-0.2 to +-1 points on the default data (docs/demo.md)
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    recipes: tuple[str, ...] = RECIPES
    out: str = "demo_out"
    quick: bool = False
    ddp: bool = False
    bn_fraction: float = 0.2
    progress: bool = True
    jobs: int | None = None  # runs at a time; None: default_jobs()
    train_size: int | None = None  # training examples, equal per class; None: data.DEFAULT_TRAIN_SIZE or all

    @classmethod
    def quick_config(cls, **kw) -> "DemoConfig":
        return cls(**{"epochs": 8, "seeds": 2, "quick": True, **kw})


def load_data(cfg: DemoConfig):
    """(x_train, y_train, x_test, y_test) of the config's data set, its training
    part cut to `train_size` (fasttricks/data.py:load_data_set)."""
    return load_data_set(cfg.data, cfg.data_dir, cfg.train_size)


def build_model(cfg: DemoConfig, in_channels: int, num_classes: int, zero_gamma: bool):
    if cfg.data == "mnist1d":  # sequences of 40: the same blocks in 1-D, one per stage
        return models.ResNet(models.BasicBlock, [1, 1, 1, 1], num_classes, variant="D", zero_gamma=zero_gamma,
                             small_input=True, in_channels=in_channels, base_width=MNIST1D_WIDTH, dims=1)
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
    cosine = bot or recipe == "cosine"
    smoothing = 0.1 if recipe in ("bag_of_tricks", "label_smoothing") else 0.0
    model = build_model(cfg, x_train.shape[1], num_classes, zero_gamma=bot)
    if recipe in PRECISION_RECIPES:
        model = _Bf16(model)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    params = tricks.param_groups(model, cfg.weight_decay) if bot else model.parameters()
    lr = cfg.lr * (0.5 if recipe == "half_lr" else 1.0)
    opt = SGD(params, lr=lr, momentum=0.9, weight_decay=0.0 if bot else cfg.weight_decay,
              stochastic_rounding=recipe == "bf16_sr", rounding_seed=seed)
    train = Batches(x_train, y_train, cfg.batch_size * world, seed=seed, shard=(rank, world))
    bn_loader = Batches(x_train, y_train, cfg.batch_size, seed=seed + 1, shard=(rank, world))
    b, E = len(train), cfg.epochs
    if cosine:
        sched = schedules.warmup_cosine(opt, warmup_steps=max(1, E // 10) * b, total_steps=E * b)
    else:
        sched = schedules.StepDecay(opt, milestones=[E * b // 2, E * b * 3 // 4], gamma=0.1)
    mixer = None
    if bot or recipe == "mixup":
        mixer = Mixup(alpha=0.2, num_classes=num_classes, label_smoothing=smoothing, seed=seed)
    sampler = {"pswa": lambda: sampling.PSWA(opt, b, alpha=0.5, seed=seed),
               "pwalks": lambda: sampling.PWALKS(opt, b, k=0.05),
               "pswm": lambda: sampling.PSWM(opt, b, m=0.5, alpha=1.0, seed=seed),
               "swa": lambda: sampling.SWA(opt, b, start_epoch=E * 3 // 4),
               "ema": lambda: sampling.EMA(opt, decay=0.99, warmup=True, model=model)}.get(recipe, lambda: None)()
    if recipe == "random_gradient":
        tricks.RandomGradient(0.0, 1.0, seed=seed).fold_into(opt)
    timer = _StepTimer(model, cfg) if recipe in COSTED_RECIPES else None
    accs, train_losses, epoch_times, lrs = [], [], [], []
    for epoch in range(E):
        train.set_epoch(epoch)
        t0 = _clock()
        net.train()
        total, count = 0.0, 0
        for xb, yb in train:
            lrs.append(float(opt.param_groups[0]["lr"]))
            opt.zero_grad(set_to_none=True)
            if mixer is not None:
                xb, target = mixer.mix(xb.clone(), yb)
                loss = soft_target_cross_entropy(net(xb), target)
            else:
                loss = F.cross_entropy(net(xb), yb, label_smoothing=smoothing)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise Diverged(f"{recipe} seed {seed}: the training loss became {value} in epoch {epoch + 1} "
                               f"(lr {lr:g}); try a smaller --lr")
            loss.backward()
            if timer is not None:
                timer.step(opt)
            else:
                opt.step()
            sched.step()
            total += value * len(yb)
            count += len(yb)
        t1 = _clock()
        if sampler is not None:  # BN is recalibrated only by the methods that reassign
            sampler.end_epoch(model=model, bn_loader=bn_loader, bn_fraction=cfg.bn_fraction)
        t2 = _clock()
        if timer is not None:
            timer.end_epoch(train_seconds=t1 - t0, end_seconds=t2 - t1)
            epoch_times.append(t2 - t0 - timer.plain_seconds[-1])  # without the plain steps timed beside it
        else:
            epoch_times.append(t2 - t0)
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
    run = {"recipe": recipe, "seed": seed, "test_acc": accs, "train_loss": train_losses,
           "epoch_seconds": epoch_times, "lr": lrs, "steps_per_epoch": b}
    if timer is not None:
        run["cost"] = timer.record()
    return run


_clock = time.perf_counter  # a test replaces it with a clock whose speed changes (a second process's load)


class _StepTimer:
    """A recipe's cost, measured inside its own run: each step times the
    recipe's optimizer step and a plain SGD step (the plain_sgd recipe's
    optimizer) on a shadow copy of the params holding the same grads, in
    alternating order, so a load that comes and goes hits both alike
    (demo_report.overhead). The shadow never touches the model."""

    def __init__(self, model, cfg: DemoConfig):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.plain = SGD(self.shadow, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        self.k = 0
        self.extra = self.plain_total = 0.0
        self.extra_step_seconds, self.end_seconds, self.train_seconds, self.plain_seconds = [], [], [], []

    def step(self, opt) -> None:
        for s, p in zip(self.shadow, self.params):
            s.grad = p.grad
        self.k += 1
        if self.k % 2:
            t0 = _clock(); opt.step(); t1 = _clock(); self.plain.step(); t2 = _clock()  # noqa: E702
            mine, plain = t1 - t0, t2 - t1
        else:
            t0 = _clock(); self.plain.step(); t1 = _clock(); opt.step(); t2 = _clock()  # noqa: E702
            plain, mine = t1 - t0, t2 - t1
        self.extra += mine - plain
        self.plain_total += plain

    def end_epoch(self, train_seconds: float, end_seconds: float) -> None:
        self.extra_step_seconds.append(self.extra)
        self.end_seconds.append(end_seconds)
        self.train_seconds.append(train_seconds - self.plain_total)
        self.plain_seconds.append(self.plain_total)
        self.extra = self.plain_total = 0.0

    def record(self) -> dict:
        return {"extra_step_seconds": self.extra_step_seconds, "end_seconds": self.end_seconds,
                "train_seconds": self.train_seconds}


_WORKER_DATA = None  # a worker process's copy of the data (run_demo with jobs > 1)


def _worker_init(data, threads: int, parent: int) -> None:
    global _WORKER_DATA
    torch.set_num_threads(threads)
    _WORKER_DATA = data
    import threading

    def exit_with_parent():  # a parent killed outright (SIGKILL, SIGTERM) leaves no orphans training
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _worker_train(recipe: str, seed: int, cfg: DemoConfig) -> dict:
    return train_recipe(recipe, seed, _WORKER_DATA, cfg)


def default_jobs(cfg: DemoConfig) -> int:
    """Runs at a time: one per usable core for the small data sets (a tiny
    model steps faster on one thread per run than on all threads in turn),
    one for CIFAR-10 (its ResNet-18 uses the cores itself) and under DDP."""
    if cfg.ddp or cfg.data == "cifar10":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, cfg.seeds * len(cfg.recipes)))


def run_demo(cfg: DemoConfig, command: str | None = None, data=None) -> dict:
    """Train every recipe for every seed and write the report (rank 0). The
    report is rewritten after every finished run (marked partial until the
    last), so an interruption loses no finished run. A run whose loss
    diverges is recorded as failed and the others go on; `failed` lists them.
    Ctrl-C (KeyboardInterrupt) writes the partial report, then re-raises.
    With cfg.jobs > 1 the runs go to that many worker processes, which share
    the threads (one each by default); each run's cost is measured inside the run, so the runs
    beside it do not bias it (fasttricks/demo_report.py)."""
    rank, world = _dist()
    data = load_data(cfg) if data is None else data
    runs, failed = [], []
    jobs = [(recipe, seed) for seed in range(cfg.seeds) for recipe in cfg.recipes]
    order = {job: i for i, job in enumerate(jobs)}
    workers = 1 if world > 1 else (cfg.jobs or default_jobs(cfg))
    out, command = Path(cfg.out), command or "fasttricks demo"
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="demo", unit="run", file=sys.stderr)
    t0 = time.perf_counter()

    def report(status: str):
        if rank == 0:
            runs.sort(key=lambda r: order[(r["recipe"], r["seed"])])  # the same report whatever finished first
            write_report(out, cfg, runs, summarise(runs, cfg.epochs) if runs else [], command,
                         time.perf_counter() - t0, status=status, failed=failed, plots=status != "running")

    def finished(recipe, seed, result):
        if isinstance(result, Diverged):
            failed.append({"recipe": recipe, "seed": seed, "error": str(result)})
        else:
            runs.append(result)
        if bar is not None:
            bar.set_postfix_str(f"{recipe} seed {seed}")
            bar.update(1)
        if len(runs) + len(failed) < len(jobs):
            report("running")

    report("running")  # no older report stays in place as if it were this run's
    pool = None
    try:
        if workers == 1:
            for recipe, seed in jobs:
                try:
                    result = train_recipe(recipe, seed, data, cfg)
                except Diverged as exc:
                    result = exc
                finished(recipe, seed, result)
        else:
            import concurrent.futures as cf
            import multiprocessing

            # spawn: a forked child of a process whose torch already runs threads can hang.
            pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_worker_init,
                                          initargs=(data, max(1, torch.get_num_threads() // workers), os.getpid()))
            pending = {pool.submit(_worker_train, recipe, seed, cfg): (recipe, seed) for recipe, seed in jobs}
            for future in cf.as_completed(pending):
                try:
                    result = future.result()
                except Diverged as exc:
                    result = exc
                finished(*pending[future], result)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        report(f"partial: interrupted after {len(runs) + len(failed)} of {len(jobs)} runs")
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    report("complete" if not failed else f"complete, {len(failed)} of {len(jobs)} runs failed")
    rows = summarise(runs, cfg.epochs) if runs else []
    return {"summary": rows, "runs": runs, "failed": failed, "wall_seconds": seconds}
