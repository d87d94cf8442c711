"""Mixup blend and the soft-target loss against their eager peers.
Run: python bench/bench_mixup.py [--device cuda] [--quick]

Cases (docs/performance.md):
* blend: fasttricks' fused in-place flip blend vs timm's eager batch mixup
  (x.flip(0).mul_(1 - lam); x.mul_(lam).add_(flipped)) on an image batch;
* soft_ce: forward + backward of soft_target_cross_entropy on a factored
  MixedTarget vs timm's dense path (one-hot mixed target, then
  sum(-target * log_softmax)), with the memory the forward allocates
  (torch profiler; on a GPU the peak memory) to show that no B x C target is
  built, and two index cross-entropies blended by lam; 256 x 1000, and
  8192 x 32000 (a language model's vocabulary) on a GPU.
Rows go to bench/results/mixup_<device>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import add_save_flag, quiet_stderr, ceiling_gbps, compare, print_table, write_rows  # noqa: E402

from fasttricks.losses import soft_target_cross_entropy  # noqa: E402
from fasttricks.mixup import MixedTarget  # noqa: E402
from fasttricks.ops.mixup import mixup_blend  # noqa: E402


def blend_cases(x, lam):
    lam_rows = torch.full((x.shape[0],), lam, dtype=torch.float32, device=x.device)

    def ours():
        mixup_blend(x, lam_rows, inplace=True)

    def timm_eager():
        flipped = x.flip(0).mul_(1.0 - lam)
        x.mul_(lam).add_(flipped)

    return {"fasttricks_fused": ours, "timm_eager": timm_eager}


def dense_mixup_target(y, num_classes, lam, smoothing):
    """timm's mixup_target: smoothed one-hots of y and y.flip(0), blended."""
    off, on = smoothing / num_classes, 1.0 - smoothing + smoothing / num_classes
    y1 = torch.full((y.size(0), num_classes), off, device=y.device).scatter_(1, y.view(-1, 1), on)
    y2 = torch.full((y.size(0), num_classes), off, device=y.device).scatter_(1, y.flip(0).view(-1, 1), on)
    return y1 * lam + y2 * (1.0 - lam)


def soft_ce_cases(logits, y, lam, smoothing):
    C = logits.shape[1]
    factored = MixedTarget(y, y.flip(0), torch.full((y.shape[0],), lam, device=y.device), C, smoothing)

    def ours():
        logits.grad = None
        soft_target_cross_entropy(logits, factored).backward()

    def timm_dense():
        logits.grad = None
        target = dense_mixup_target(y, C, lam, smoothing)
        torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean().backward()

    def two_index_ce():
        """The usual factored alternative: two index cross-entropies, blended."""
        logits.grad = None
        (lam * F.cross_entropy(logits, y, label_smoothing=smoothing) +
         (1 - lam) * F.cross_entropy(logits, y.flip(0), label_smoothing=smoothing)).backward()

    return {"fasttricks_factored": ours, "timm_dense": timm_dense, "two_index_ce": two_index_ce}


def forward_alloc_bytes(fn) -> int:
    """Bytes the forward allocates on the CPU (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(0, e.self_cpu_memory_usage) for e in prof.key_averages())


def forward_peak_bytes(fn) -> int:
    """Peak CUDA memory the forward adds above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    add_save_flag(ap)
    args = ap.parse_args(argv)
    device, rows = args.device, []
    B, shape = (64, (3, 224, 224)) if not args.quick else (32, (3, 128, 128))
    x = torch.rand((B,) + shape, device=device)
    numel = x.numel()
    ceiling = ceiling_gbps(numel, device)
    times = compare(blend_cases(x, 0.3), device=device, iters=args.iters)
    for impl, t in times.items():
        rows.append({"case": "blend", "shape": f"{B}x{'x'.join(map(str, shape))}", "impl": impl,
                     "median_ms": t * 1e3, "speedup": times["timm_eager"] / t,
                     "GBps": 8 * numel / t / 1e9, "ceiling_GBps": ceiling})

    # The loss: a classifier's shape, and (on a GPU) a language model's vocabulary.
    shapes = [(256, 1000)] + ([(8192, 32000)] if torch.device(device).type == "cuda" and not args.quick else [])
    for B, C in shapes:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(B, C, generator=g).to(device).requires_grad_()
        y = torch.randint(C, (B,), generator=g).to(device)
        cases = soft_ce_cases(logits, y, 0.3, 0.1)
        times = compare(cases, device=device, iters=args.iters)
        factored = MixedTarget(y, y.flip(0), torch.full((B,), 0.3, device=device), C, 0.1)
        fwd = {"fasttricks_factored": lambda: soft_target_cross_entropy(logits.detach(), factored),
               "timm_dense": lambda: torch.sum(-dense_mixup_target(y, C, 0.3, 0.1) *
                                               F.log_softmax(logits.detach(), dim=-1), dim=-1).mean(),
               "two_index_ce": lambda: 0.3 * F.cross_entropy(logits.detach(), y, label_smoothing=0.1) +
               0.7 * F.cross_entropy(logits.detach(), y.flip(0), label_smoothing=0.1)}
        for impl, t in times.items():
            row = {"case": "soft_ce_fwd_bwd", "shape": f"{B}x{C}", "impl": impl, "median_ms": t * 1e3,
                   "speedup": times["timm_dense"] / t}
            if device == "cpu":
                row["fwd_alloc_BxC_units"] = forward_alloc_bytes(fwd[impl]) / (B * C * 4)
            else:
                row["fwd_peak_BxC_units"] = forward_peak_bytes(fwd[impl]) / (B * C * 4)
            rows.append(row)
    print_table(rows, ["case", "shape", "impl", "median_ms", "speedup", "GBps", "ceiling_GBps",
                       "fwd_alloc_BxC_units"])
    write_rows("mixup", rows, device, args.save)


if __name__ == "__main__":
    main()
