"""Weight sampling: the fused average against torch's, and its overhead in a
real training step. Run: python bench/bench_sampling.py [--device cuda] [--quick]

Cases (docs/performance.md):
* adamw_ema: fasttricks AdamW with EMA fused into the step (one memory pass)
  vs torch AdamW(fused=True) + AveragedModel(multi_avg_fn=get_ema_multi_avg_fn)
  (and, for reference, + a bare torch._foreach_lerp_) on ResNet-50 shapes;
* train_step: forward + backward + step of a small CNN with plain SGD vs the
  same with PSWA (alpha=1: every step samples, the worst case) and PWALKS
  (k=0.05), fused; the overhead in % of the step. The epoch-end work
  (reassignment and BN recalibration on beta=10% of the data) is reported
  separately, amortised over a CIFAR-10 epoch of 390 steps.
Rows go to bench/results/sampling_<device>.json.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import add_save_flag, ceiling_gbps, compare, print_table, sync, write_rows  # noqa: E402
from bench_optim import SHAPE_SETS, make  # noqa: E402

import fasttricks.optim as fo  # noqa: E402
from fasttricks.sampling import EMA, PSWA, PWALKS  # noqa: E402

ADAM = dict(lr=1e-3, weight_decay=1e-2)
DECAY = 0.999


def adamw_ema_cases(device, shapes):
    def ours():
        opt = fo.AdamW(make(shapes, device), **ADAM)
        EMA(opt, decay=DECAY)
        return opt.step

    def torch_averaged_model():
        # ParameterList wraps tensors in new Parameter objects: give those the grads.
        module = torch.nn.ParameterList([p.detach() for p in make(shapes, device)])
        for p in module.parameters():
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(module.parameters(), fused=True, **ADAM)
        ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(DECAY))

        def step():
            opt.step()
            ema.update_parameters(module)
        return step

    def torch_foreach_lerp():
        params = make(shapes, device)
        opt = torch.optim.AdamW(params, fused=True, **ADAM)
        avgs = [p.detach().clone() for p in params]
        data = [p.detach() for p in params]

        def step():
            opt.step()
            torch._foreach_lerp_(avgs, data, 1 - DECAY)
        return step

    return {"fasttricks_fused_ema": ours(), "torch_fused+AveragedModel": torch_averaged_model(),
            "torch_fused+foreach_lerp": torch_foreach_lerp()}


def small_cnn(device):
    torch.manual_seed(0)
    layers, c = [], 3
    for out, stride in [(32, 1), (64, 2), (128, 2), (128, 1)]:
        layers += [torch.nn.Conv2d(c, out, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(out), torch.nn.ReLU()]
        c = out
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, 10)]
    return torch.nn.Sequential(*layers).to(device)


def train_step_cases(device, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(10, (batch,), generator=g).to(device)
    base = small_cnn(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    steps, samplers = {}, {}
    for name, make_sampler in [("plain_sgd", None),
                               ("pswa_alpha1", lambda opt: PSWA(opt, steps_per_epoch=390, alpha=1.0)),
                               ("pwalks_k0.05", lambda opt: PWALKS(opt, steps_per_epoch=390, k=0.05))]:
        model = copy.deepcopy(base)
        opt = fo.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if make_sampler is not None:
            samplers[name] = make_sampler(opt)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        steps[name] = (step, model)
    return steps, samplers, (x, y)


def epoch_end_cost(device, sampler, model, data, steps_per_epoch=390, bn_fraction=0.1) -> float:
    """Seconds of the epoch-end work for a 390-step epoch: reassignment plus BN
    recalibration on ceil(bn_fraction * 390) batches like `data`."""
    loader = [data] * steps_per_epoch
    sampler.samples = max(sampler.samples, 1)
    times = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        sampler.assign(model=model, bn_loader=loader, bn_fraction=bn_fraction)
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer timed rounds")
    ap.add_argument("--iters", type=int, default=20)
    add_save_flag(ap)
    args = ap.parse_args(argv)
    device = args.device
    rows = []

    shapes = SHAPE_SETS["resnet50"]
    numel = sum(torch.Size(s).numel() for s in shapes)
    ceiling = ceiling_gbps(numel, device)
    times = compare(adamw_ema_cases(device, shapes), device=device, iters=args.iters)
    peer = times["torch_fused+AveragedModel"]
    for impl, t in times.items():
        # AdamW + EMA touches p, g, m, v, w_hat: 5 reads, 4 writes of 4 bytes.
        rows.append({"case": "adamw_ema", "shapes": "resnet50", "impl": impl, "median_ms": t * 1e3,
                     "speedup": peer / t, "GBps": 36 * numel / t / 1e9, "ceiling_GBps": ceiling})

    batch = 64 if device == "cpu" else 256
    steps, samplers, data = train_step_cases(device, batch)
    iters = 15 if args.quick else 40
    times = compare({k: v[0] for k, v in steps.items()}, device=device, iters=iters, warmup=3)
    plain = times["plain_sgd"]
    for impl, t in times.items():
        row = {"case": "train_step", "shapes": f"small_cnn_b{batch}", "impl": impl, "median_ms": t * 1e3,
               "overhead_pct": (t / plain - 1) * 100}
        if impl in samplers:
            end = epoch_end_cost(device, samplers[impl], steps[impl][1], data)
            row["epoch_end_ms"] = end * 1e3
            row["epoch_end_pct_of_390_steps"] = end / (390 * plain) * 100
        rows.append(row)

    print_table(rows, ["case", "shapes", "impl", "median_ms", "speedup", "GBps", "ceiling_GBps", "overhead_pct",
                       "epoch_end_pct_of_390_steps"])
    write_rows("sampling", rows, device, args.save)
    return rows


if __name__ == "__main__":
    main()
