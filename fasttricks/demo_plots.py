"""The demo's plots: test accuracy per recipe and epoch, the paired differences against plain_sgd, the lr schedules.

Written by fasttricks/demo_report.py beside report.md; matplotlib is imported
only here, and only when plots are asked for.
"""
from __future__ import annotations

import statistics
from pathlib import Path

__all__ = ["write_plots"]

STYLES = ["-", "--", "-.", ":"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _accuracy_plot(path: Path, by_recipe: dict[str, list[list[float]]], title: str) -> None:
    """Two panels: the whole run, and the second half zoomed to the range
    where the recipes differ. Each recipe: the mean over seeds, a band of one
    standard deviation across seeds, its own colour and line style."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

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
    for ax in (full, zoom):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    full.set_ylabel("test accuracy (%): mean over seeds, band = 1 SD")
    zoom.legend(fontsize=8, loc="lower right", ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _differences_plot(path: Path, rows: list[dict]) -> None:
    """One row per recipe: the paired difference against plain_sgd with its
    95% interval; zero marked; better/worse in colour."""
    plt = _pyplot()
    rows = [r for r in rows if r.get("vs_plain") and r["vs_plain"]["n"] >= 2]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    colour = {"better": "tab:green", "worse": "tab:red"}
    for i, r in enumerate(reversed(rows)):
        p = r["vs_plain"]
        c = colour.get(p["verdict"], "tab:grey")
        ax.plot([p["low"], p["high"]], [i, i], color=c, linewidth=2.2)
        ax.plot(p["mean"], i, "o", color=c)
        ax.plot(p["diffs"], [i] * len(p["diffs"]), "|", color=c, alpha=0.45, markersize=9)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), [r["recipe"] for r in reversed(rows)])
    ax.set_xlabel("final test accuracy minus plain_sgd's, same seed (points)\n"
                  "dot: mean, bar: 95% CI, |: one seed")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("paired difference against plain_sgd (green: better, red: worse)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _line_plot(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, height: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, height))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(out: Path, runs: list[dict], rows: list[dict]) -> None:
    """accuracy.png, precision.png (when the bf16 recipes ran), differences.png and lr_schedule.png in `out`."""
    by_recipe: dict[str, list[list[float]]] = {}
    for r in runs:
        by_recipe.setdefault(r["recipe"], []).append(r["test_acc"])
    precision = ("plain_sgd", "bf16", "bf16_sr")
    _accuracy_plot(out / "accuracy.png", {k: v for k, v in by_recipe.items() if k not in precision[1:]},
                   "fasttricks demo: test accuracy per recipe")
    if "bf16" in by_recipe or "bf16_sr" in by_recipe:
        _accuracy_plot(out / "precision.png", {("fp32 (plain_sgd)" if k == "plain_sgd" else k): by_recipe[k]
                                                for k in precision if k in by_recipe},
                       "plain SGD in fp32, bf16 rounded to nearest, bf16 with stochastic rounding")
    _differences_plot(out / "differences.png", rows)
    lrs = {}
    for recipe in ("plain_sgd", "bag_of_tricks"):
        lr = next((r["lr"] for r in runs if r["recipe"] == recipe), None)
        if lr:
            lrs[recipe] = (list(range(len(lr))), lr)
    _line_plot(out / "lr_schedule.png", lrs, "step", "learning rate", 3.5)
