"""The `fasttricks` command: demo, bench, lr-find.

    fasttricks demo [--quick] [--out DIR] [--data mnist1d|digits|cifar10] [--data-dir DIR] [--ddp]
    fasttricks bench [--quick] [--save] [--only optim,sampling,mixup]
    fasttricks check --device cuda [--quick] [--skip-benches]
    fasttricks lr-find [--out DIR] [--data ...]

Under torchrun, `demo --ddp` trains with DistributedDataParallel over the
gloo backend (CPU) or NCCL (CUDA): each rank takes its share of every global
batch, and rank 0 writes the report.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _writable_dir(parser, flag: str, path: str) -> None:
    """Fail before any training if the results could not be written."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        # One probe per process: DDP ranks check the same folder at once.
        probe = Path(path) / f".fasttricks-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        parser.error(f"cannot write to {flag} {path}: {exc.strerror or exc}")


def _share_the_cores() -> None:
    """Ranks on one machine share its cores: threads = cores / local world
    size, unless the user set them (OMP_NUM_THREADS or --threads)."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _demo(args) -> int:
    import torch

    from fasttricks.demo import ALL_RECIPES, RECIPES, DemoConfig, load_data, run_demo

    recipes = tuple(args.recipes.split(",")) if args.recipes else RECIPES
    bad = [r for r in recipes if r not in ALL_RECIPES]
    if bad:
        args.parser.error(f"argument --recipes: unknown recipe(s) {','.join(bad)}; choose from "
                          f"{','.join(ALL_RECIPES)}")
    if args.data == "cifar10" and not args.data_dir:
        args.parser.error("argument --data cifar10 needs --data-dir (the folder holding cifar-10-batches-py)")
    _writable_dir(args.parser, "--out", args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.ddp:
        _share_the_cores()
    kw = {"data": args.data, "data_dir": args.data_dir, "out": args.out, "recipes": recipes, "ddp": args.ddp,
          "progress": not args.no_progress}
    for name in ("epochs", "seeds", "batch_size", "lr", "jobs", "train_size"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    cfg = DemoConfig.quick_config(**kw) if args.quick else DemoConfig(**kw)
    try:
        data = load_data(cfg)
    except ValueError as exc:  # e.g. a --train-size the data cannot give
        args.parser.error(str(exc))
    if args.ddp:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    out = Path(cfg.out)
    try:
        result = run_demo(cfg, command="fasttricks " + " ".join(shlex.quote(a) for a in sys.argv[1:]), data=data)
    except KeyboardInterrupt:
        if not args.ddp or _rank() == 0:
            print(f"\nfasttricks demo: interrupted; the finished runs are in {out / 'report.md'} (marked partial)",
                  file=sys.stderr)
        return 130
    finally:
        if args.ddp:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not args.ddp or _rank() == 0:
        print((out / "report.md").read_text())
        pngs = ", ".join(str(p) for p in sorted(out.glob("*.png")))
        print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {pngs}")
        for f in result["failed"]:
            print(f"fasttricks demo: {f['error']}", file=sys.stderr)
    return 0 if result["summary"] and not result["failed"] else 1


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _bench_folder(command: str) -> Path:
    """The source checkout's bench/ (the benches live there, next to their results/), on sys.path."""
    candidates = [Path.cwd() / "bench", Path(__file__).resolve().parent.parent / "bench"]
    root = next((c for c in candidates if (c / "bench_optim.py").is_file()), None)
    if root is None:
        raise SystemExit(f"fasttricks {command} runs the scripts in a source checkout's bench/ folder: "
                         "run it from the root of a clone")
    sys.path.insert(0, str(root))
    return root


def _check(args) -> int:
    if args.device != "cuda":
        raise SystemExit("fasttricks check: only --device cuda is checked this way; the CPU is covered by the tests")
    _bench_folder("check")
    import gpu_check

    return gpu_check.main((["--quick"] if args.quick else []) + (["--skip-benches"] if args.skip_benches else [])
                          + ["--budget", str(args.budget), "--require", args.require])


def _bench(args) -> int:
    _bench_folder("bench")
    import importlib

    known = ["optim", "sampling", "mixup"]
    only = args.only.split(",") if args.only else known
    if any(name not in known for name in only):
        raise SystemExit(f"--only takes a comma-separated subset of {','.join(known)}, got {args.only!r}")
    for name in only:
        print(f"\n== bench_{name} ==")
        module = importlib.import_module(f"bench_{name}")
        module.main((["--quick"] if args.quick else []) + (["--save"] if args.save else []))
    return 0


def _lr_find(args) -> int:
    if not args.start_lr < args.end_lr:
        args.parser.error(f"--start-lr ({args.start_lr:g}) must be below --end-lr ({args.end_lr:g})")
    if args.data == "cifar10" and not args.data_dir:
        args.parser.error("argument --data cifar10 needs --data-dir (the folder holding cifar-10-batches-py)")
    _writable_dir(args.parser, "--out", args.out)
    import torch
    import torch.nn.functional as F

    from fasttricks import lr_find
    from fasttricks.data import Batches
    from fasttricks.demo import DemoConfig, build_model, load_data
    from fasttricks.optim import SGD

    cfg = DemoConfig(data=args.data, data_dir=args.data_dir)
    x, y, _, _ = load_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, x.shape[1], int(y.max()) + 1, zero_gamma=False)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    result = lr_find(model, Batches(x, y, 64), F.cross_entropy, opt, start_lr=args.start_lr, end_lr=args.end_lr,
                     num_steps=args.num_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = result.plot(out / "lr_find.png")
    suggestion = f"{result.suggestion:.3g}" if result.suggestion else "none"
    print(f"tested {len(result.lrs)} lrs from {result.lrs[0]:.2g} to {result.lrs[-1]:.2g}"
          f"{' (stopped: the loss diverged)' if result.diverged else ''}; suggested lr: {suggestion}")
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    from fasttricks import __version__

    ap = argparse.ArgumentParser(prog="fasttricks", description="Fused training tricks for PyTorch.")
    ap.add_argument("--version", action="version", version=f"fasttricks {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a small ResNet with several recipes over several seeds and report what "
                                    "each buys against plain SGD")
    d.add_argument("--quick", action="store_true",
                   help="8 epochs x 2 seeds instead of 30 x 8: a smoke test of under a minute on 2 CPU cores, "
                        "too short to tell the recipes apart")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--data", default="mnist1d", choices=["mnist1d", "digits", "cifar10"],
                   help="mnist1d (generated locally, the default), digits (scikit-learn's) or cifar10 (--data-dir)")
    d.add_argument("--data-dir", default=None, help="folder with cifar-10-batches-py (python pickle version)")
    d.add_argument("--epochs", type=_positive_int)
    d.add_argument("--seeds", type=_positive_int)
    d.add_argument("--batch-size", type=_positive_int)
    d.add_argument("--lr", type=_positive_float)
    d.add_argument("--train-size", type=_positive_int, default=None,
                   help="training examples, equal per class (default: 1000 of mnist1d's 4000, all of the others)")
    d.add_argument("--jobs", type=_positive_int, default=None,
                   help="runs at a time, each in its own process on one thread (default: one per core for "
                        "mnist1d and digits, 1 for cifar10 and under --ddp)")
    d.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads (default: torch's; under torchrun, the cores divided among the local ranks)")
    d.add_argument("--recipes", default=None,
                   help="comma-separated recipes (default: all but the bf16 ones; bf16,bf16_sr train the plain "
                        "recipe in bf16, rounded to nearest or stochastically)")
    d.add_argument("--ddp", action="store_true", help="DistributedDataParallel under torchrun (gloo)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=_demo)
    b = sub.add_parser("bench", help="run the microbenchmarks against torch (from a source checkout)")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--only", default=None, help="comma-separated: optim,sampling,mixup")
    b.add_argument("--save", action="store_true", help="write the rows to bench/results/ (off: print only)")
    b.set_defaults(fn=_bench)
    c = sub.add_parser("check", help="the GPU check: parity tests, probes and benches on a CUDA device "
                                     "(from a source checkout; writes bench/results/gpu_check_<device>.*)")
    c.add_argument("--device", default="cuda", choices=["cuda"])
    c.add_argument("--quick", action="store_true", help="benches without the 100M-param sets")
    c.add_argument("--skip-benches", action="store_true")
    c.add_argument("--budget", type=_positive_float, default=480.0,
                   help="seconds for the whole check (default 480); later stages are skipped past it")
    c.add_argument("--require", default="cuda,triton", help="GPU backends that must be available")
    c.set_defaults(fn=_check)
    f = sub.add_parser("lr-find", help="the LR range test on the demo model; saves lr_find.png")
    f.add_argument("--out", default="demo_out")
    f.add_argument("--data", default="mnist1d", choices=["mnist1d", "digits", "cifar10"])
    f.add_argument("--data-dir", default=None)
    f.add_argument("--start-lr", type=_positive_float, default=1e-5)
    f.add_argument("--end-lr", type=_positive_float, default=10.0)
    f.add_argument("--num-steps", type=_positive_int, default=100)
    f.set_defaults(fn=_lr_find)
    for parser in (d, b, c, f):
        parser.set_defaults(parser=parser)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
