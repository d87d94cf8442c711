"""The learning-rate range test (Smith; Kolasiński's slides): train for a few batches
while the lr sweeps from `start_lr` to `end_lr`, record the smoothed loss,
stop when it diverges, and suggest the lr where the loss falls fastest.
Model, optimizer (and its samplers) and the RNG are restored afterwards."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from fasttricks._checks import check_int

__all__ = ["lr_find", "LRFinderResult"]


@dataclass
class LRFinderResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)       # smoothed (bias-corrected EMA)
    raw_losses: list[float] = field(default_factory=list)
    suggestion: float | None = None
    diverged: bool = False

    def plot(self, path, title: str = "LR range test"):
        """Save loss vs lr (log x axis) as a PNG, the suggestion marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.raw_losses, alpha=0.3, label="loss")
        ax.plot(self.lrs, self.losses, label="smoothed loss")
        if self.suggestion is not None:
            i = self.lrs.index(self.suggestion)
            ax.axvline(self.suggestion, color="r", linestyle="--", linewidth=1)
            ax.plot([self.suggestion], [self.losses[i]], "o", color="r", label=f"suggestion {self.suggestion:.2e}")
        finite = [v for v in self.losses if math.isfinite(v)]
        if finite:  # clip the divergence tail, which would flatten the part that matters
            low, high = min(finite), max(finite[: max(1, len(finite) // 10)])
            pad = 0.1 * (high - low) or 0.1 * abs(high) or 1.0
            ax.set_ylim(low - pad, high + 3 * pad)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.set_title(title + (" (stopped: the loss diverged)" if self.diverged else ""))
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _batches(loader):
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("lr_find: the loader is empty")


def _default_step(model, batch, loss_fn):
    x, y = batch[0], batch[1]
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        x, y = x.to(device), y.to(device)
    return loss_fn(model(x), y)


def suggest_lr(lrs, losses, skip_begin: int) -> float | None:
    """The suggestion rule (docs/tricks.md), on the smoothed losses:

    1. drop the first `skip_begin` points (the smoothing's warm-up: its first
       values average only a few noisy batches) and everything after the
       minimum of the rest (the divergence tail);
    2. in what is left (n points), take the slope of the loss against log(lr)
       over a window of w = max(1, n // 20) points on each side, which a
       single noisy batch cannot dominate;
    3. suggest the lr where that slope is steepest downhill: where the loss
       falls fastest, as far from the flat start as from the minimum.

    None when fewer than 3 points remain or the loss never falls."""
    if not losses:
        return None
    begin = min(skip_begin, len(losses) - 1)
    end = min(range(begin, len(losses)), key=losses.__getitem__)
    xs = losses[begin:end + 1]
    logs = [math.log(lr) for lr in lrs[begin:end + 1]]
    n = len(xs)
    if n < 3:
        return None
    w = max(1, n // 20)
    slopes = {}
    for i in range(1, n - 1):
        lo, hi = max(0, i - w), min(n - 1, i + w)
        if logs[hi] > logs[lo]:
            slopes[i] = (xs[hi] - xs[lo]) / (logs[hi] - logs[lo])
    if not slopes:
        return None
    i = min(slopes, key=slopes.__getitem__)
    return lrs[begin + i] if slopes[i] < 0 else None


def lr_find(model: torch.nn.Module, loader, loss_fn, optimizer: torch.optim.Optimizer, start_lr: float = 1e-7,
            end_lr: float = 10.0, num_steps: int = 100, mode: str = "exp", smooth: float = 0.05,
            diverge_threshold: float = 4.0, step_fn=None) -> LRFinderResult:
    """Run the range test and return an LRFinderResult (`.lrs`, `.losses`,
    `.suggestion`, `.plot(path)`).

    lr_i = start * (end/start) ** (i/(N-1)) ("exp") or a linear sweep
    ("linear"), the same for every param group. `smooth` is the EMA weight of
    the new loss; the test stops early once the smoothed loss exceeds
    `diverge_threshold` x its best, or is not finite. `step_fn(model, batch,
    loss_fn)` returns the loss of one batch (default: loss_fn(model(x), y)
    for (x, y) batches). The loader is cycled if it has fewer than
    `num_steps` batches.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"lr_find needs 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    check_int("num_steps", num_steps, 2)
    if mode not in ("exp", "linear"):
        raise ValueError(f"mode must be 'exp' or 'linear', got {mode!r}")
    if not 0 < smooth <= 1:
        raise ValueError(f"smooth must be in (0, 1], got {smooth}")
    step_fn = step_fn or _default_step
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_rng = torch.get_rng_state()
    was_training = model.training
    result = LRFinderResult()
    try:
        model.train()
        avg, best = 0.0, math.inf
        batches = _batches(loader)
        for i in range(num_steps):
            frac = i / (num_steps - 1)
            lr = start_lr * (end_lr / start_lr) ** frac if mode == "exp" else start_lr + (end_lr - start_lr) * frac
            for group in optimizer.param_groups:
                if torch.is_tensor(group["lr"]):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = step_fn(model, next(batches), loss_fn)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            avg = (1 - smooth) * avg + smooth * value
            smoothed = avg / (1 - (1 - smooth) ** (i + 1))
            result.lrs.append(lr)
            result.raw_losses.append(value)
            result.losses.append(smoothed)
            if not math.isfinite(smoothed) or (i > 0 and smoothed > diverge_threshold * best):
                result.diverged = True
                break
            best = min(best, smoothed)
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
        optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(saved_rng)
        model.train(was_training)
    finite = [(lr, l) for lr, l in zip(result.lrs, result.losses) if math.isfinite(l)]
    # The smoothing's warm-up: about 1/smooth batches, at most a tenth of the sweep.
    skip = min(math.ceil(0.5 / smooth), num_steps // 10)
    result.suggestion = suggest_lr([f[0] for f in finite], [f[1] for f in finite], skip)
    return result
