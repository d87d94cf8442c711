"""Optimizer step: fasttricks vs torch.optim (fused, foreach, for-loop), side
by side on the same shapes. Run: python bench/bench_optim.py [--device cuda] [--quick]

Cases (docs/performance.md): AdamW and SGD momentum/nesterov on ResNet-50 shapes
(25.6M params, 161 tensors) and on 100M params; bf16 params with fp32 master
weights against torch's upcast + fused + downcast; AdamW in each precision
(fp32, bf16 + fp32 master, bf16 + stochastic rounding with fp32 or bf16
moments, and bf16 rounded to nearest, the same bytes without the rounding's
arithmetic; speedup against our bf16 + master step, with the bytes moved and
held per param); AdamW with gradient clipping, torch's clip_grad_norm_ then
its fused step against our clip folded into the step, plain, under a
GradScaler and bf16 with master weights; the gradient norm alone (ours
against torch's get_total_norm(foreach=True)); the host overhead of a step on 161 and on 10,000
one-element tensors (torch fused and foreach beside it). Rows go to
bench/results/optim_<device>.json.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import add_save_flag, ceiling_gbps, compare, print_table, write_rows  # noqa: E402

import fasttricks.optim as fo  # noqa: E402


def resnet50_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inp = 64
    for blocks, mid, out in [(3, 64, 256), (4, 128, 512), (6, 256, 1024), (3, 512, 2048)]:
        for i in range(blocks):
            shapes += [(mid, inp, 1, 1), (mid,), (mid,), (mid, mid, 3, 3), (mid,), (mid,), (out, mid, 1, 1), (out,), (out,)]
            if i == 0:
                shapes += [(out, inp, 1, 1), (out,), (out,)]
            inp = out
    return shapes + [(1000, 2048), (1000,)]


SHAPE_SETS = {
    "resnet50": resnet50_shapes(),            # 161 tensors, 25.56M params
    "100M": [(4096, 4096)] * 5 + [(4096,)] * 100 + [(1000, 4019)],
    "161_tiny": [(1,)] * 161,                # host overhead: a step's fixed cost per param
    "10k_tiny": [(1,)] * 10000,
}
# Host-overhead sets: (timed calls interleaved, calls in a row per round).
TINY = {"161_tiny": (100, 50), "10k_tiny": (10, 5)}


def make(shapes, device, dtype=torch.float32):
    params = [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def bytes_per_elem(case, impl=None):
    """Bytes each step reads and writes per param."""
    if case == "adamw_precision":
        return PRECISION_BYTES[impl][0]
    if case == "adamw_amp":  # the scaler's own unscale reads and writes every grad once more
        return 28 if impl == "fasttricks_fused_unscale" else 36
    # Clipping: the norm reads the grads (4 B); torch's clip also reads and writes
    # them (8 B), and under AMP the scaler's unscale_ once more (8 B).
    if case == "grad_norm":  # the norm alone: one read of the fp32 grads
        return 4
    if case == "adamw_clip":
        return 32 if impl == "fasttricks" else 40
    if case == "adamw_clip_amp":
        return 32 if impl == "fasttricks_fused_unscale" else 48
    if case == "adamw_bf16_master_clip":  # bf16 grad read by the norm (2 B) and the step; torch: its fp32 copy
        return 30 if impl == "fasttricks" else 28 + 6 + 4 + 8 + 6
    return {"adamw": 28, "sgd_momentum": 20, "sgd_nesterov": 20, "adamw_bf16_master": 28}[case]


# The precisions of one AdamW step (docs/precision.md): bytes moved per param
# and step (param, grad, master, exp_avg, exp_avg_sq; read + write), and bytes
# held per param (param + state, grads aside).
PRECISION_BYTES = {
    "fp32": (28, 12),
    "bf16_master": (28, 14),                # bf16 param written, fp32 master + moments
    "bf16_sr": (22, 10),                    # bf16 param, fp32 moments, stochastic rounding
    "bf16_sr_bf16_state": (14, 6),          # bf16 param and moments, stochastic rounding
    "bf16_nearest": (14, 6),                # the same bytes rounded to nearest: what rounding costs
    "torch_fused_fp32": (28, 12),
    "torch_fused_bf16": (14, 6),            # torch keeps bf16 params' state in bf16, rounded to nearest
}


# What a case's speedup is against: the first of these it has (grad_norm: torch's
# foreach norm; adamw_precision: our own bf16 + fp32 master step).
PEERS = ("torch_fused", "torch_upcast_fused", "bf16_master", "torch_foreach")

# The host-overhead cases of the tiny sets; the two-group ones run there only.
TINY_CASES = ("adamw", "sgd_momentum", "adamw_two_groups", "sgd_two_groups")
TINY_ONLY = ("adamw_two_groups", "sgd_two_groups")


def opt_cases(device):
    """case -> {impl: factory(shapes) -> step fn}."""
    def ours(cls, **kw):
        return lambda shapes: cls(make(shapes, device), **kw).step

    def torch_impl(cls, **kw):
        return lambda shapes: cls(make(shapes, device), **kw).step

    adam = dict(lr=1e-3, weight_decay=1e-2)
    sgd_m = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    sgd_n = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    cases = {
        "adamw": {"fasttricks": ours(fo.AdamW, **adam), "torch_fused": torch_impl(torch.optim.AdamW, fused=True, **adam),
                  "torch_foreach": torch_impl(torch.optim.AdamW, foreach=True, **adam)},
        "sgd_momentum": {"fasttricks": ours(fo.SGD, **sgd_m), "torch_fused": torch_impl(torch.optim.SGD, fused=True, **sgd_m),
                         "torch_foreach": torch_impl(torch.optim.SGD, foreach=True, **sgd_m)},
        "sgd_nesterov": {"fasttricks": ours(fo.SGD, **sgd_n), "torch_fused": torch_impl(torch.optim.SGD, fused=True, **sgd_n),
                         "torch_foreach": torch_impl(torch.optim.SGD, foreach=True, **sgd_n)},
    }

    def ours_master(shapes):
        return fo.AdamW(make(shapes, device, torch.bfloat16), master_weights=True, **adam).step

    def torch_upcast(shapes, clip=None):
        """torch's recipe: fp32 copies, upcast grads, (clip_grad_norm_ on the
        copies,) fused step, downcast params."""
        low = make(shapes, device, torch.bfloat16)
        master = [p.detach().float().requires_grad_() for p in low]
        for m in master:
            m.grad = torch.empty_like(m)
        opt = torch.optim.AdamW(master, fused=True, **adam)
        low_grads, master_grads = [p.grad for p in low], [m.grad for m in master]
        low_data = [p.detach() for p in low]

        def step():
            torch._foreach_copy_(master_grads, low_grads)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(master, clip, foreach=True)
            opt.step()
            torch._foreach_copy_(low_data, master)
        return step

    cases["adamw_bf16_master"] = {"fasttricks": ours_master, "torch_upcast_fused": torch_upcast}

    def two_groups(cls, **kw):
        """The params in two groups (the no-bias-decay setup): the host overhead per
        param should stay that of one group (issue #23: within 1.5x)."""
        def factory(shapes):
            params = make(shapes, device)
            half = len(params) // 2
            return cls([{"params": params[:half]}, {"params": params[half:], "weight_decay": 0.0}], **kw).step
        return factory

    cases["adamw_two_groups"] = {"fasttricks": two_groups(fo.AdamW, **adam),
                                 "torch_fused": two_groups(torch.optim.AdamW, fused=True, **adam)}
    cases["sgd_two_groups"] = {"fasttricks": two_groups(fo.SGD, **sgd_m),
                               "torch_fused": two_groups(torch.optim.SGD, fused=True, **sgd_m)}

    def under_scaler(make_opt, before_step=None):
        """scaler.step + update, as a GradScaler training loop runs them, after
        before_step(params, opt, scaler) if given. Scale 1 (never grown), so that
        the unscale rewrites the grads with their own values."""
        def factory(shapes):
            params = make(shapes, device)
            opt = make_opt(params)
            scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=1.0, growth_interval=2**30)
            scaler.scale(torch.ones((), device=device))  # the scaler makes its scale on first use

            def step():
                if before_step is not None:
                    before_step(params, opt, scaler)
                scaler.step(opt)
                scaler.update()
            return step
        return factory

    # NOTE [found_inf contract]: the default (the scaler unscales, as for torch's
    # non-fused optimizers) against the fused unscale (fused=True).
    cases["adamw_amp"] = {
        "fasttricks_scaler_unscale": under_scaler(lambda ps: fo.AdamW(ps, **adam)),
        "fasttricks_fused_unscale": under_scaler(lambda ps: fo.AdamW(ps, fused=True, **adam)),
        "torch_fused": under_scaler(lambda ps: torch.optim.AdamW(ps, fused=True, **adam)),
    }

    # Gradient clipping (NOTE [clip in the step]): torch's clip_grad_norm_(foreach)
    # then its fused step, against our norm with the clip folded into the step.
    clip = 1.0

    def torch_clip(params, opt, scaler=None):
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)

    def ours_clip(params, opt, scaler=None):
        opt.clip_grad_norm_(clip)  # under a scaler, no unscale_: the fused unscale divides the scale out in the step

    def clipped(make_opt, clip_fn, dtype=torch.float32):
        def factory(shapes):
            params = make(shapes, device, dtype)
            opt = make_opt(params)

            def step():
                clip_fn(params, opt)
                opt.step()
            return step
        return factory

    cases["adamw_clip"] = {"fasttricks": clipped(lambda ps: fo.AdamW(ps, **adam), ours_clip),
                           "torch_fused": clipped(lambda ps: torch.optim.AdamW(ps, fused=True, **adam), torch_clip)}
    cases["adamw_clip_amp"] = {
        "fasttricks_fused_unscale": under_scaler(lambda ps: fo.AdamW(ps, fused=True, **adam), ours_clip),
        "torch_fused": under_scaler(lambda ps: torch.optim.AdamW(ps, fused=True, **adam), torch_clip)}
    cases["adamw_bf16_master_clip"] = {
        "fasttricks": clipped(lambda ps: fo.AdamW(ps, master_weights=True, **adam), ours_clip, torch.bfloat16),
        "torch_upcast_fused": lambda shapes: torch_upcast(shapes, clip)}

    def norm_only(ours):  # the norm alone: ours (fasttricks/ops/norm.py) against torch's get_total_norm(foreach)
        def factory(shapes):
            params = make(shapes, device)
            if ours:
                return functools.partial(fo.AdamW(params, **adam).clip_grad_norm_, clip)
            return functools.partial(torch.nn.utils.get_total_norm, [p.grad for p in params], 2.0, foreach=True)
        return factory

    cases["grad_norm"] = {"fasttricks": norm_only(True), "torch_foreach": norm_only(False)}

    def ours_precision(dtype, **kw):
        return lambda shapes: fo.AdamW(make(shapes, device, dtype), **adam, **kw).step

    cases["adamw_precision"] = {
        "fp32": ours_precision(torch.float32),
        "bf16_master": ours_precision(torch.bfloat16, master_weights=True),
        "bf16_sr": ours_precision(torch.bfloat16, stochastic_rounding=True, state_dtype=torch.float32),
        "bf16_sr_bf16_state": ours_precision(torch.bfloat16, stochastic_rounding=True, state_dtype=torch.bfloat16),
        "bf16_nearest": ours_precision(torch.bfloat16),
        "torch_fused_fp32": lambda shapes: torch.optim.AdamW(make(shapes, device), fused=True, **adam).step,
        "torch_fused_bf16": lambda shapes: torch.optim.AdamW(make(shapes, device, torch.bfloat16), fused=True,
                                                             **adam).step,
    }
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="skip the 100M-param set")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sets", default=None, help=f"comma-separated subset of {','.join(SHAPE_SETS)}")
    ap.add_argument("--cases", default=None, type=lambda s: s.split(","),
                    help="comma-separated subset of the cases (adamw, sgd_momentum, sgd_nesterov, "
                         "adamw_bf16_master, adamw_amp, adamw_clip, adamw_clip_amp, adamw_bf16_master_clip, "
                         "grad_norm, adamw_precision)")
    add_save_flag(ap)
    args = ap.parse_args(argv)
    device = args.device
    rows = []
    sets = args.sets.split(",") if args.sets else ["resnet50", "161_tiny", "10k_tiny"] + ([] if args.quick else ["100M"])
    if any(s not in SHAPE_SETS for s in sets):
        raise SystemExit(f"--sets takes a comma-separated subset of {','.join(SHAPE_SETS)}")
    for set_name in sets:
        shapes = SHAPE_SETS[set_name]
        numel = sum(torch.Size(s).numel() for s in shapes)
        tiny = set_name in TINY
        ceiling = ceiling_gbps(numel, device) if not tiny else None
        for case, impls in opt_cases(device).items():
            if tiny and case not in TINY_CASES or not tiny and case in TINY_ONLY or args.cases and case not in args.cases:
                continue
            fns = {name: factory(shapes) for name, factory in impls.items()}
            times = compare(fns, device=device, iters=TINY[set_name][0] if tiny else args.iters, warmup=3)
            warm = compare(fns, device=device, warmup=1, iters=10, block=TINY[set_name][1]) if tiny else {}
            peer = next(p for p in PEERS if p in times)
            for impl, t in times.items():
                row = {"case": case, "shapes": set_name, "tensors": len(shapes), "params_M": numel / 1e6,
                       "impl": impl, "median_ms": t * 1e3, "speedup_vs_" + peer: times[peer] / t}
                if tiny:
                    # step_us: calls interleaved with the other impls' steps
                    # (cold caches); step_us_warm: calls in a row (a loop)
                    row["step_us"] = t * 1e6
                    row["step_us_warm"] = warm[impl] * 1e6
                else:
                    row["GBps"] = bytes_per_elem(case, impl) * numel / t / 1e9
                    row["ceiling_GBps"] = ceiling
                if case == "adamw_precision":
                    row["bytes_moved_per_param"], row["bytes_held_per_param"] = PRECISION_BYTES[impl]
                rows.append(row)
            del fns
    for r in rows:
        r["speedup"] = next(r[f"speedup_vs_{p}"] for p in PEERS if f"speedup_vs_{p}" in r)
    # adamw_precision: speedup is against our own bf16 + fp32 master step
    print_table(rows, ["case", "shapes", "impl", "median_ms", "speedup", "GBps", "ceiling_GBps", "step_us_warm",
                       "bytes_moved_per_param", "bytes_held_per_param"])
    # A subset of the cases goes to its own file (optim_<cases>_<device>.json).
    write_rows("_".join(["optim", *args.cases]) if args.cases else "optim", rows, device, args.save)
    return rows


if __name__ == "__main__":
    main()
