"""The demo's report from its runs: paired differences against plain_sgd, stability, cost, the sources' claims, plots.

Every recipe of a seed shares that seed's initialisation and data order with
`plain_sgd`, so each recipe is compared with plain_sgd seed by seed: the
difference of final test accuracy per seed, its mean and a 95% Student-t
interval (docs/demo.md). A recipe whose interval excludes 0 is marked better
or worse; the others read "no difference detected".

The cost of a recipe is measured inside its own run (fasttricks/demo.py
times its optimizer step beside a plain SGD step on the same grads, in
alternating order, and its epoch-end work), as a share of the same epoch's
training time, so a load that comes and goes scales both sides alike.
"""
from __future__ import annotations

import json
import math
import platform
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

import fasttricks
from fasttricks.demo_plots import write_plots

__all__ = ["paired", "stability", "summarise", "overhead", "check_claims", "write_report", "t_quantile_975"]

BASELINE = "plain_sgd"
# Student's t, 97.5% quantile, by degrees of freedom (a two-sided 95% interval).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # beyond the table: the first terms of the Cornish-Fisher expansion
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired(values: dict[int, float], baseline: dict[int, float]) -> dict:
    """The per-seed difference values - baseline over the seeds both have:
    mean, SD, a 95% t interval and the verdict."""
    seeds = sorted(set(values) & set(baseline))
    diffs = [values[s] - baseline[s] for s in seeds]
    row = {"n": len(diffs), "diffs": diffs, "mean": statistics.mean(diffs) if diffs else float("nan")}
    if len(diffs) < 2:
        return {**row, "sd": float("nan"), "low": float("nan"), "high": float("nan"), "verdict": "too few seeds"}
    sd = statistics.stdev(diffs)
    half = t_quantile_975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    low, high = row["mean"] - half, row["mean"] + half
    verdict = "better" if low > 0 else "worse" if high < 0 else "no difference detected"
    return {**row, "sd": sd, "low": low, "high": high, "verdict": verdict}


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


def overhead(runs: list[dict]) -> dict | None:
    """A recipe's extra cost as a share of its own training time, epoch by
    epoch: (its step time beyond the plain step timed beside it, plus its
    epoch-end work) / (its epoch's training time less that extra). Median and
    quartiles over the epochs of all seeds; None for a recipe that was not timed so."""
    shares = []
    for r in runs:
        cost = r.get("cost")
        if not cost:
            continue
        for extra_step, end, train in zip(cost["extra_step_seconds"], cost["end_seconds"], cost["train_seconds"]):
            base = train - extra_step
            if base > 0:
                shares.append(100.0 * (extra_step + end) / base)
    if not shares:
        return None
    q = statistics.quantiles(shares, n=4) if len(shares) > 1 else shares * 3
    return {"median_pct": statistics.median(shares), "q1_pct": q[0], "q3_pct": q[2], "epochs": len(shares)}


def _last(epochs: int) -> int:
    return max(3, epochs // 4)


def summarise(runs: list[dict], epochs: int) -> list[dict]:
    last = _last(epochs)
    by_recipe: dict[str, list[dict]] = {}
    for r in runs:
        by_recipe.setdefault(r["recipe"], []).append(r)
    base = {r["seed"]: r for r in by_recipe.get(BASELINE, [])}
    rows = []
    for recipe, rs in by_recipe.items():
        finals = [r["test_acc"][-1] for r in rs]
        row = {"recipe": recipe, "seeds": len(rs), "final_acc_mean": statistics.mean(finals),
               "final_acc_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
               "best_acc_mean": statistics.mean(max(r["test_acc"]) for r in rs), "last_epochs": last,
               **stability([r["test_acc"] for r in rs], last),
               # Medians: the process's first epochs pay one-off warm-up costs.
               "seconds_per_epoch": statistics.median(t for r in rs for t in r["epoch_seconds"])}
        if recipe != BASELINE and base:
            row["vs_plain"] = paired({r["seed"]: r["test_acc"][-1] for r in rs},
                                     {s: r["test_acc"][-1] for s, r in base.items()})
        cost = overhead(rs)
        if cost is not None:
            row["overhead"] = cost
        rows.append(row)
    return rows


# ---- the sources' claims -------------------------------------------------------------

def _per_seed(runs, recipe, measure) -> dict[int, float]:
    return {r["seed"]: measure(r) for r in runs if r["recipe"] == recipe}


def _final(r):
    return r["test_acc"][-1]


def _fmt(p: dict, unit: str = " points") -> str:
    if p["n"] < 2:
        return f"{p['mean']:+.2f}{unit} ({p['n']} seed)"
    return f"{p['mean']:+.2f}{unit} [{p['low']:+.2f}, {p['high']:+.2f}], {p['n']} seeds"


def _claim_better(runs, recipe, than, measure=_final, lower_is_better=False, unit=" points"):
    """The claim "recipe beats `than`" tested on the paired per-seed differences."""
    p = paired(_per_seed(runs, recipe, measure), _per_seed(runs, than, measure))
    if p["n"] < 2:
        return f"{recipe} - {than}: {_fmt(p, unit)}", "not testable here"
    good = p["high"] < 0 if lower_is_better else p["low"] > 0
    bad = p["low"] > 0 if lower_is_better else p["high"] < 0
    verdict = "reproduced" if good else "not reproduced" + ("" if bad else " (no difference detected)")
    return f"{recipe} - {than}: {_fmt(p, unit)}", verdict


# "As good as or better": the interval must lie above -NON_INFERIORITY_MARGIN
# points (the demo's target interval width, docs/demo.md).
NON_INFERIORITY_MARGIN = 0.5


def _claim_not_worse(runs, recipe, than):
    """The claim "recipe is as good as `than` or better": reproduced when the
    whole interval lies above -NON_INFERIORITY_MARGIN; refuted when it lies
    below 0; otherwise the interval is too wide to tell."""
    p = paired(_per_seed(runs, recipe, _final), _per_seed(runs, than, _final))
    if p["n"] < 2:
        return f"{recipe} - {than}: {_fmt(p)}", "not testable here"
    if p["low"] > -NON_INFERIORITY_MARGIN:
        verdict = "reproduced"
    elif p["high"] < 0:
        verdict = "not reproduced"
    else:
        verdict = f"not reproduced (the interval reaches below -{NON_INFERIORITY_MARGIN:g})"
    return f"{recipe} - {than}: {_fmt(p)}", verdict


def _claim_same(runs, recipe, than):
    """The claim "recipe trains like `than`": no difference detected in final
    accuracy nor in the last epoch's training loss."""
    acc = paired(_per_seed(runs, recipe, _final), _per_seed(runs, than, _final))
    loss = paired(_per_seed(runs, recipe, lambda r: r["train_loss"][-1]),
                  _per_seed(runs, than, lambda r: r["train_loss"][-1]))
    if acc["n"] < 2:
        return f"{recipe} - {than}: {_fmt(acc)}", "not testable here"
    same = all(p["low"] <= 0 <= p["high"] for p in (acc, loss))
    return (f"{recipe} - {than}: accuracy {_fmt(acc)}; final train loss {_fmt(loss, '')}",
            "reproduced" if same else "not reproduced")


def _sd_last(epochs):
    last = _last(epochs)
    return lambda r: statistics.pstdev(r["test_acc"][-last:])


# Each claim: (source, what it says in our words, the recipes it needs, the test).
# The recipes are fasttricks/demo.py's; a claim whose recipes did not run reads
# "not testable here" with the command that would test it.
def _claims(epochs: int):
    sd = _sd_last(epochs)
    early = max(1, epochs // 4)
    claims = []
    for s in ("pswa", "pwalks", "pswm"):
        claims += [
            ("Tripathi & Shah, section 4 and Table 3", f"{s.upper()} converges faster early in training (test "
             f"accuracy a quarter into the run, epoch {early})", (s, BASELINE),
             lambda runs, s=s: _claim_better(runs, s, BASELINE, lambda r: r["test_acc"][early - 1])),
            ("Tripathi & Shah, Table 4", f"{s.upper()} ends training with a lower SD of test accuracy over the last "
             "epochs than SGD", (s, BASELINE),
             lambda runs, s=s: _claim_better(runs, s, BASELINE, sd, lower_is_better=True, unit=" SD points")),
            ("Tripathi & Shah, Table 5", f"{s.upper()} stays within 0.2 points of the previous epoch more often than "
             "SGD", (s, BASELINE),
             lambda runs, s=s: _claim_better(runs, s, BASELINE, lambda r: stability([r["test_acc"]], 3)[
                 "pct_within_0.2_of_previous"], unit=" % of epochs")),
            ("Tripathi & Shah, sections 3-4", f"{s.upper()} converges as well as SGD or better (final accuracy)",
             (s, BASELINE), lambda runs, s=s: _claim_not_worse(runs, s, BASELINE)),
            ("Tripathi & Shah, section 2", f"{s.upper()} generalises as well as SWA or better", (s, "swa"),
             lambda runs, s=s: _claim_not_worse(runs, s, "swa")),
        ]
    claims += [
        ("SWA (Izmailov et al.)", "averaging the weights of the last part of training generalises better than SGD",
         ("swa", BASELINE), lambda runs: _claim_better(runs, "swa", BASELINE)),
        ("Bag of Tricks, Table 6", "the refinements stacked (warm-up and cosine decay, label smoothing, mixup, no bias "
         "decay, zero gamma) raise accuracy", ("bag_of_tricks", BASELINE),
         lambda runs: _claim_better(runs, "bag_of_tricks", BASELINE)),
        ("Bag of Tricks, section 5.1", "cosine decay (with warm-up) beats step decay", ("cosine", BASELINE),
         lambda runs: _claim_better(runs, "cosine", BASELINE)),
        ("Bag of Tricks, section 5.2", "label smoothing raises accuracy", ("label_smoothing", BASELINE),
         lambda runs: _claim_better(runs, "label_smoothing", BASELINE)),
        ("Bag of Tricks, section 5.4", "mixup raises accuracy", ("mixup", BASELINE),
         lambda runs: _claim_better(runs, "mixup", BASELINE)),
        ("Random Gradient (Wei)", "multiplying the loss by r ~ U(0, 1) each step improves the result",
         ("random_gradient", BASELINE), lambda runs: _claim_better(runs, "random_gradient", BASELINE)),
        ("Random Gradient (Wei), section 3", "random gradient acts like a smaller lr: it trains like SGD at the mean "
         "scale E[r] = 0.5 of the lr", ("random_gradient", "half_lr"),
         lambda runs: _claim_same(runs, "random_gradient", "half_lr")),
        ("EMA (common practice; not in the five sources)", "an exponential moving average smooths the end of "
         "training (lower SD over the last epochs)", ("ema", BASELINE),
         lambda runs: _claim_better(runs, "ema", BASELINE, sd, lower_is_better=True, unit=" SD points")),
        ("docs/precision.md (stochastic rounding)", "bf16 with stochastic rounding keeps fp32's accuracy",
         ("bf16_sr", BASELINE), lambda runs: _claim_not_worse(runs, "bf16_sr", BASELINE)),
        ("docs/precision.md (stochastic rounding)", "bf16 with stochastic rounding beats bf16 rounded to nearest",
         ("bf16_sr", "bf16"), lambda runs: _claim_better(runs, "bf16_sr", "bf16")),
    ]
    return claims


def check_claims(runs: list[dict], epochs: int) -> list[dict]:
    """One line per claim: source, claim, what was measured, verdict."""
    ran = {r["recipe"] for r in runs}
    out = []
    for source, claim, needs, test in _claims(epochs):
        missing = [n for n in needs if n not in ran]
        if missing:
            measured = f"needs the recipes {', '.join(needs)} (--recipes {','.join(needs)})"
            verdict = "not testable here"
        else:
            measured, verdict = test(runs)
        out.append({"source": source, "claim": claim, "measured": measured, "verdict": verdict})
    return out


# ---- the report ----------------------------------------------------------------------

def _interval(p: dict | None) -> str:
    if not p:
        return ""
    if p["n"] < 2:
        return f"{p['mean']:+.2f} (1 seed)"
    return f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]"


def _cost(c: dict | None) -> str:
    if not c:
        return ""
    return f"{c['median_pct']:+.1f}% ({c['q1_pct']:+.1f} to {c['q3_pct']:+.1f})"


def write_report(out: Path, cfg, runs: list[dict], rows: list[dict], command: str, seconds: float,
                 status: str = "complete", failed: list[dict] = (), plots: bool = True):
    out.mkdir(parents=True, exist_ok=True)
    env = {"fasttricks": fasttricks.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "machine": platform.machine(), "cpu": _cpu_model(),
           "backends": {k: v["available"] for k, v in fasttricks.backends().items()}}
    claims = check_claims(runs, cfg.epochs) if runs else []
    (out / "report.json").write_text(json.dumps({"config": asdict(cfg), "command": command, "status": status,
                                                  "environment": env, "wall_seconds": seconds, "summary": rows,
                                                  "claims": claims, "runs": runs, "failed": list(failed)},
                                                 indent=1) + "\n")
    lines = [f"# fasttricks demo: {cfg.data}, {cfg.epochs} epochs, {cfg.seeds} seeds", "",
             f"Command: `{command}`  ", f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{env['cpu']}, {seconds:.0f} s wall. Status: **{status}** ({len(runs)} runs finished).", ""]
    lines += [f"- failed: {f['error']}" for f in failed] + ([""] if failed else [])
    if not rows:
        (out / "report.md").write_text("\n".join(lines + ["No run has finished yet.", ""]))
        return
    lines += ["| recipe | final test acc (%) | vs plain_sgd, paired (points, 95% CI) | verdict | SD last {n} epochs | "
              "epochs improving | within 0.2 of previous | within 0.2 of best | s / epoch | extra cost (IQR) |"
              .format(n=rows[0]["last_epochs"]), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("vs_plain")
        lines.append(f"| {r['recipe']} | {r['final_acc_mean']:.2f} ± {r['final_acc_sd']:.2f} | {_interval(p)} | "
                     f"{p['verdict'] if p else ''} | {r['sd_last_epochs']:.2f} | {r['pct_improving']:.0f}% | "
                     f"{r['pct_within_0.2_of_previous']:.0f}% | {r['pct_within_0.2_of_best']:.0f}% | "
                     f"{r['seconds_per_epoch']:.3f} | {_cost(r.get('overhead'))} |")
    lines += ["", "Final accuracy: mean ± SD over seeds. Paired: the recipe's final accuracy minus plain_sgd's of the "
              "same seed (same initialisation and data order), mean and 95% Student-t interval; an interval that "
              "excludes 0 reads better or worse. SD over the last epochs is averaged over seeds. Time per epoch: "
              "median over epochs and seeds. Extra cost: the recipe's optimizer-step time beyond a plain SGD step "
              "timed beside it on the same grads, plus its epoch-end work (reassignment, BN recalibration), as a "
              "share of its own epoch; median and quartiles over epochs. Plots: `differences.png`, `accuracy.png`, "
              "`lr_schedule.png`" + (", `precision.png`" if any(r["recipe"] == "bf16" for r in runs) else "") + ".",
              "", "## The sources' claims", "",
              "| source | claim | measured (paired, mean [95% CI]) | verdict |", "|---|---|---|---|"]
    lines += [f"| {c['source']} | {c['claim']} | {c['measured']} | {c['verdict']} |" for c in claims]
    lines += ["", "Sources: docs/sources.md. A claim that a recipe is better is reproduced when its paired interval "
              "excludes 0 on the right side; \"no difference detected\": the interval includes 0 at this budget and "
              f"number of seeds. \"As well as or better\" is reproduced when the interval lies above "
              f"-{NON_INFERIORITY_MARGIN:g} points.", ""]
    (out / "report.md").write_text("\n".join(lines))
    if plots:
        write_plots(out, runs, rows)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
