"""Shared timing helpers: side by side in one process, alternating order,
warm-ups, medians; the memory ceiling measured in the same run."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def compare(fns: dict, *, device="cpu", warmup=3, iters=10, block=1) -> dict[str, float]:
    """Median seconds per call of each fn, run in rotating order each round,
    `block` calls in a row per fn and round. With block=1 each call follows
    another fn's (cold caches for host-bound calls); a larger block gives the
    host overhead of a step in a loop, where a call finds its own objects in cache."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    times = {n: [] for n in names}
    for r in range(iters):
        order = names[r % len(names):] + names[: r % len(names)]
        if r % 2:
            order = order[::-1]
        for n in order:
            for _ in range(block):
                sync(device)
                t0 = time.perf_counter()
                fns[n]()
                sync(device)
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def ceiling_gbps(numel: int, device="cpu", iters=10) -> float:
    """In-place add_ (CPU) / copy (GPU) bandwidth on numel fp32 elements."""
    x = torch.randn(numel, device=device)
    y = torch.randn(numel, device=device)
    if torch.device(device).type == "cuda":
        t = compare({"copy": lambda: x.copy_(y)}, device=device, iters=iters)["copy"]
        return 2 * 4 * numel / t / 1e9
    t = compare({"add_": lambda: x.add_(y)}, device=device, iters=iters)["add_"]
    return 3 * 4 * numel / t / 1e9


def environment(device="cpu") -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = ""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name")) + \
                    f", {torch.get_num_threads()} threads"
        except (OSError, StopIteration):
            pass
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(), "git": sha}


def add_save_flag(parser) -> None:
    parser.add_argument("--save", action="store_true",
                        help="write the rows to bench/results/ (the committed results docs/performance.md cites)")


def write_rows(stem: str, rows: list[dict], device="cpu", save: bool = False) -> None:
    """Rows go to bench/results/<stem>_<cpu|cuda>.json only when asked (--save):
    a casual run must not overwrite the committed results."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    path = RESULTS / f"{stem}_{kind}.json"
    if not save:
        print(f"\n(not saved; --save writes {path})")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(device), "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {path}")


@contextlib.contextmanager
def quiet_stderr():
    """Silences file descriptor 2 (the torch profiler's C++ "USDT:" lines) for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def print_table(rows: list[dict], cols: list[str]) -> None:
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))
