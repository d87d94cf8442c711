"""The one GPU check: on a machine with a CUDA GPU and torch installed, from
the root of a clone (no network needed), run

    python bench/gpu_check.py [--quick] [--skip-benches] [--budget SECONDS]

It checks the installed fasttricks, never the checkout: when none is
installed (or it has no CPU extension), it first builds and installs this
checkout with `pip install --no-build-isolation --no-deps .`, offline. Then,
stage by stage within the time budget (8 minutes by default), it runs the
GPU parity tests (tests/test_gpu.py) from outside the checkout, the framework
tests where lightning, accelerate or transformers are installed, the probes
below for each GPU backend (triton, cuda), and the benches with `--device
cuda`. After every stage it rewrites one JSON and one markdown file under
bench/results/ named after the device; the last line printed says where they
are and what passed. It fails (exit 1) when a GPU backend that should be
there is missing (--require, default cuda,triton), when no GPU test ran, or
when anything failed. The probes:

* no host sync in steady-state steps (torch.cuda.set_sync_debug_mode("error")),
  with GradScaler's grad_scale / found_inf on the device too;
* a step on a side stream equals one on the default stream;
* a CUDA-graph capture of opt.step() with static grads replays as eager steps;
* a param of more than 2^31 elements is stepped everywhere (needs ~18 GB);
* odd-offset, transposed and channels-last params step bit for bit as contiguous ones;
* cuda and triton agree;
* Triton compiles no new kernel when the number of params with grads changes;
* GB/s of a step against a device copy (bench_optim, in the benches).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _timing import RESULTS, environment  # noqa: E402

CUDA = torch.device("cuda")


def params_and_grads(shapes, dtype=torch.float32, seed=0, make=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for s in shapes:
        p = torch.randn(s, generator=g).to(CUDA, dtype)
        p = (make(p) if make else p).requires_grad_()
        p.grad = torch.randn(s, generator=g).to(CUDA, dtype)
        if make:
            p.grad = make(p.grad.detach())
        out.append(p)
    return out


SHAPES = [(64, 3, 7, 7), (1000, 37), (5,), (), (4099,)] + [(i % 9 + 1, 3) for i in range(40)]


def probe_no_host_sync(backend):
    import fasttricks.optim as fo

    params = params_and_grads(SHAPES)
    opt = fo.AdamW(params, lr=1e-3, backend=backend)
    sgd_params = params_and_grads(SHAPES, seed=1)
    sgd = fo.SGD(sgd_params, lr=0.1, momentum=0.9, backend=backend)
    for _ in range(3):  # the first steps build plans and state (they may sync)
        opt.step()
        sgd.step()
    opt.grad_scale = torch.tensor(2.0, device=CUDA)
    opt.found_inf = torch.tensor(0.0, device=CUDA)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
            sgd.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"ok": True, "detail": "AdamW (with device grad_scale/found_inf) and SGD momentum: 3 steps, no sync"}


def _twins(shapes=SHAPES):
    """Two identical sets of params with grads."""
    return params_and_grads(shapes, seed=4), params_and_grads(shapes, seed=4)


def probe_side_stream(backend):
    import fasttricks.optim as fo

    a, b = _twins()
    oa, ob = fo.AdamW(a, lr=1e-2, backend=backend), fo.AdamW(b, lr=1e-2, backend=backend)
    side = torch.cuda.Stream()
    for _ in range(3):
        oa.step()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ob.step()
        torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    ok = all(torch.equal(p, q) for p, q in zip(a, b))
    return {"ok": ok, "detail": "3 AdamW steps on a side stream vs the default stream, bitwise"}


def probe_cuda_graph(backend):
    import fasttricks.optim as fo

    a, b = _twins()
    oa, ob = fo.AdamW(a, lr=1e-2, backend=backend), fo.SGD(b, lr=0.1, momentum=0.9, backend=backend)
    eager_a = [p.detach().clone().requires_grad_() for p in a]
    eager_b = [p.detach().clone().requires_grad_() for p in b]
    for e, p in zip(eager_a + eager_b, a + b):
        e.grad = p.grad.clone()
    ea, eb = fo.AdamW(eager_a, lr=1e-2, backend=backend), fo.SGD(eager_b, lr=0.1, momentum=0.9, backend=backend)
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch's graph recipe asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            oa.step()
            ob.step()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        ea.step()
        eb.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        oa.step()
        ob.step()
    for _ in range(3):
        graph.replay()
    for _ in range(3):
        ea.step()
        eb.step()
    torch.cuda.synchronize()
    # The captured step counter is a device tensor, so Adam's bias correction moves on each replay.
    err = max((p - e).abs().max().item() for p, e in zip(a + b, eager_a + eager_b) if p.numel())
    return {"ok": err == 0.0, "detail": f"AdamW + SGD captured once, replayed 3x vs 3 eager steps: max diff {err:.3g}"}


def probe_large_param(backend):
    import fasttricks.optim as fo

    n = 2**31 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2 + (1 << 30):
        return {"ok": None, "detail": f"skipped: {free / 2**30:.1f} GiB free"}
    p = torch.full((n,), 1.0, dtype=torch.bfloat16, device=CUDA).requires_grad_()
    p.grad = torch.full((n,), 0.5, dtype=torch.bfloat16, device=CUDA)
    opt = fo.SGD([p], lr=1.0, backend=backend)
    opt.step()
    torch.cuda.synchronize()
    idx = torch.tensor([0, 2**31 - 1, 2**31, n - 1], device=CUDA)
    got = p.detach()[idx].float().tolist()
    del opt, p
    torch.cuda.empty_cache()
    return {"ok": got == [0.5] * 4, "detail": f"bf16 SGD on {n} elements, values at the ends and past 2^31: {got}"}


def probe_layouts(backend):
    import fasttricks.optim as fo

    shapes = [(8, 16, 5, 7), (33, 65)]
    results = {}
    for name, make in (("odd offset", lambda t: torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)),
                       ("transposed", lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)),
                       ("channels-last", lambda t: t.contiguous(memory_format=torch.channels_last)
                        if t.dim() == 4 else t)):
        a = params_and_grads(shapes, seed=3)
        b = params_and_grads(shapes, seed=3, make=make)
        oa, ob = fo.AdamW(a, lr=1e-2, backend=backend), fo.AdamW(b, lr=1e-2, backend=backend)
        for _ in range(3):
            oa.step()
            ob.step()
        results[name] = all(torch.equal(p, q) for p, q in zip(a, b))
    return {"ok": all(results.values()), "detail": results}


def probe_cuda_vs_triton(_backend=None):
    import fasttricks.optim as fo
    from fasttricks import _backends

    if any(_backends.available(b, CUDA) is not None for b in ("cuda", "triton")):
        return {"ok": None, "detail": "skipped: needs both backends"}
    out = {}
    for cls, cfg in ((fo.AdamW, dict(lr=1e-2, weight_decay=0.1)), (fo.SGD, dict(lr=0.1, momentum=0.9, nesterov=True))):
        runs = {}
        for backend in ("cuda", "triton"):
            ps = params_and_grads(SHAPES, seed=5)
            opt = cls(ps, backend=backend, **cfg)
            for _ in range(5):
                opt.step()
            runs[backend] = ps
        out[cls.__name__] = max((p - q).abs().max().item() for p, q in zip(runs["cuda"], runs["triton"]) if p.numel())
    return {"ok": all(v <= 1e-6 for v in out.values()), "detail": {k: f"max diff {v:.3g}" for k, v in out.items()}}


def _kernel_cache_size(fn) -> int:
    caches = getattr(fn, "device_caches", None)
    if caches is None:
        return -1
    return sum(len(entry[0]) for entry in caches.values())


def probe_triton_recompiles(_backend=None):
    from fasttricks import _backends

    if _backends.available("triton", CUDA) is not None:
        return {"ok": None, "detail": "skipped: no triton backend"}
    from fasttricks.kernels.adam import adam_kernel

    import fasttricks.optim as fo

    params = params_and_grads([(7,)] * 40)
    opt = fo.AdamW(params, lr=1e-3, backend="triton")
    opt.step()
    before = _kernel_cache_size(adam_kernel)
    for with_grad in (1, 16, 17, 32, 40):
        for i, p in enumerate(params):
            p.grad = torch.ones_like(p) if i < with_grad else None
        opt.step()
    after = _kernel_cache_size(adam_kernel)
    if before < 0:
        return {"ok": None, "detail": "this triton has no device_caches to count"}
    return {"ok": after == before, "detail": f"kernels compiled: {before} before, {after} after 1/16/17/32/40 grads"}


PROBES = {"no host sync": probe_no_host_sync, "side stream": probe_side_stream, "CUDA graph": probe_cuda_graph,
          "param past 2^31 elements": probe_large_param, "layouts": probe_layouts}
SHARED_PROBES = {"cuda vs triton": probe_cuda_vs_triton, "triton recompiles": probe_triton_recompiles}


def run_probe(fn, backend):
    t0 = time.perf_counter()
    try:
        result = fn(backend)
    except Exception as exc:  # a probe that raises failed; keep going with the others
        result = {"ok": False, "detail": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


# The checkout must never be imported in place of the installed package.
OUTSIDE_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run_command(args, timeout, cwd=ROOT, env=None):
    t0 = time.perf_counter()
    try:
        out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=max(1.0, timeout), env=env)
        text, code = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as exc:
        text, code = f"timed out after {timeout:.0f} s\n{exc.stdout or ''}", 124
    return {"command": " ".join(str(a) for a in args[1:]), "returncode": code,
            "seconds": round(time.perf_counter() - t0, 1), "tail": text[-3000:]}


# ---- what is installed ------------------------------------------------------------

def installed() -> dict | None:
    """The fasttricks a fresh interpreter imports outside the checkout: its
    path, version and backends on CUDA; None when there is none."""
    code = ("import json, torch, fasttricks; from fasttricks import _backends; "
            "dev = torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu'); "
            "print(json.dumps({'path': fasttricks.__file__, 'version': fasttricks.__version__, "
            "'backends': fasttricks.backends(), "
            "'gpu': {b: _backends.available(b, dev) for b in ('cuda', 'triton')}}))")
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=OUTSIDE_ENV)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def install_checkout(timeout: float) -> dict:
    """Build and install this checkout against the torch already here, offline."""
    return run_command([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                        str(ROOT)], timeout)


def missing_backends(info: dict | None, required: list[str]) -> dict[str, str]:
    """Required GPU backends the installed fasttricks lacks, with why."""
    if info is None:
        return {b: "fasttricks is not importable" for b in required}
    return {b: info["gpu"].get(b) or "unknown" for b in required if info["gpu"].get(b) is not None}


# ---- pytest runs from outside the checkout ----------------------------------------

def junit_counts(path: Path) -> dict:
    """tests, failures, errors and skipped of a pytest --junitxml file (zeros when absent)."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if not path.is_file():
        return counts
    root = ET.parse(path).getroot()
    for suite in (root.iter("testsuite")):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    return counts


def run_tests(files: list[str], timeout: float, marker: str | None = None) -> dict:
    """pytest on the checkout's test files, run from a temporary folder so
    that the tests import the installed fasttricks, never the checkout."""
    with tempfile.TemporaryDirectory() as cwd:
        xml = Path(cwd) / "junit.xml"
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml")]
        args += ["-m", marker] if marker else []
        result = run_command(args + [str(ROOT / f) for f in files], timeout, cwd=cwd, env=OUTSIDE_ENV)
        result.update(junit_counts(xml))
    result["ran"] = result["tests"] - result["skipped"]
    return result


def stage_problems(result: dict | None, what: str) -> list[str]:
    """Why a pytest stage failed: its exit code, or no test executed at all."""
    if result is None:
        return []
    problems = []
    if result["returncode"] != 0:
        problems.append(f"{what}: pytest exit {result['returncode']}")
    if result["ran"] == 0:
        problems.append(f"{what}: no test ran ({result['tests']} collected, {result['skipped']} skipped)")
    return problems


def verdict(report: dict) -> list[str]:
    """Everything that failed, in words; empty when the check passed."""
    problems = [f"backend {b} missing: {why}" for b, why in report.get("missing", {}).items()]
    problems += stage_problems(report.get("tests"), "GPU tests")
    problems += stage_problems(report.get("framework_tests"), "framework tests")
    problems += [f"probe {backend}/{name} failed" for backend, probes in report["probes"].items()
                 for name, r in probes.items() if isinstance(r, dict) and r.get("ok") is False]
    problems += [f"bench {b['command']} exit {b['returncode']}" for b in report["benches"] if b["returncode"] != 0]
    return problems


FRAMEWORKS = ("lightning", "accelerate", "transformers")
FRAMEWORK_TESTS = ["tests/test_frameworks.py", "tests/test_dcp.py"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="benches without the 100M-param sets")
    ap.add_argument("--skip-benches", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--budget", type=float, default=480.0,
                    help="seconds for the whole check (default 480); stages past it are skipped")
    ap.add_argument("--require", default="cuda,triton",
                    help="comma-separated GPU backends that must be available (default cuda,triton)")
    ap.add_argument("--no-build", action="store_true", help="never build: fail when fasttricks is not installed")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible")
    t0 = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - t0)  # noqa: E731
    required = [b for b in args.require.split(",") if b]
    device_name = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"gpu_check_{slug}.json"
    report = {"environment": environment("cuda"), "budget_s": args.budget, "stages": [], "install": None,
              "missing": {}, "probes": {}, "tests": None, "framework_tests": None, "benches": []}

    def save(stage: str) -> None:
        report["stages"].append({"stage": stage, "elapsed_s": round(time.perf_counter() - t0, 1)})
        path.write_text(json.dumps(report, indent=1, default=str))
        path.with_suffix(".md").write_text(markdown(report, device_name))

    def finish() -> int:
        problems = verdict(report)
        report["verdict"] = problems or "passed"
        save("done")
        print(markdown(report, device_name))
        print(f"gpu_check: {'FAILED: ' + '; '.join(problems) if problems else 'PASSED'} "
              f"({summary(report)}); wrote {path} and {path.with_suffix('.md')}")
        return 1 if problems else 0

    info = installed()
    if (info is None or info["backends"].get("cpu", {}).get("available") is False) and not args.no_build:
        report["install"] = install_checkout(left())
        info = installed()
    report["fasttricks"] = info
    report["missing"] = missing_backends(info, required)
    save("install")
    if info is None:
        return finish()
    if not args.skip_tests:
        report["tests"] = run_tests(["tests/test_gpu.py"], left(), marker="gpu")
        save("GPU tests")
        if any(importlib.util.find_spec(f) is not None for f in FRAMEWORKS) and left() > 30:
            report["framework_tests"] = run_tests(FRAMEWORK_TESTS, left())
            save("framework tests")
    import fasttricks
    from fasttricks import _backends

    report["backends"] = fasttricks.backends()
    for backend in ("cuda", "triton"):
        if _backends.available(backend, CUDA) is not None:
            report["probes"][backend] = {"skipped": _backends.available(backend, CUDA)}
            continue
        report["probes"][backend] = {name: run_probe(fn, backend) for name, fn in PROBES.items()}
        save(f"probes {backend}")
    report["probes"]["both"] = {name: run_probe(fn, None) for name, fn in SHARED_PROBES.items()}
    save("probes")
    if not args.skip_benches:
        for bench in ("bench_optim.py", "bench_sampling.py", "bench_mixup.py"):
            if left() < 30:
                report["benches_skipped"] = f"budget: {bench} and after not run"
                break
            cmd = [sys.executable, f"bench/{bench}", "--device", "cuda", "--save"] + (["--quick"] if args.quick else [])
            report["benches"].append(run_command(cmd, timeout=left()))
            save(bench)
    return finish()


def summary(report: dict) -> str:
    parts = []
    for key, what in (("tests", "GPU tests"), ("framework_tests", "framework tests")):
        r = report.get(key)
        if r:
            parts.append(f"{what}: {r['ran'] - r['failures'] - r['errors']}/{r['ran']} passed, {r['skipped']} skipped")
    probes = [r for probes in report["probes"].values() for r in probes.values() if isinstance(r, dict)]
    parts.append(f"probes: {sum(r.get('ok') is True for r in probes)} ok, {sum(r.get('ok') is False for r in probes)} "
                 f"failed, {sum(r.get('ok') is None for r in probes)} skipped")
    parts.append(f"benches: {sum(b['returncode'] == 0 for b in report['benches'])}/{len(report['benches'])}")
    return "; ".join(parts)


def markdown(report, device_name) -> str:
    lines = [f"# GPU check: {device_name}", "", f"torch {torch.__version__}, git {report['environment'].get('git')}", ""]
    info = report.get("fasttricks")
    lines += [f"fasttricks: {info['path'] if info else 'not importable'}", ""]
    if report.get("missing"):
        lines += [f"Missing backends: {report['missing']}", ""]
    for key, what in (("tests", "GPU tests"), ("framework_tests", "Framework tests")):
        t = report.get(key)
        if t:
            lines += [f"{what}: exit {t['returncode']}, {t['ran']} ran ({t['failures']} failed, {t['errors']} errors, "
                      f"{t['skipped']} skipped) in {t['seconds']} s", ""]
    lines += [f"Verdict: {report.get('verdict', 'running')}", ""]
    lines += ["| backend | probe | result | detail |", "|---|---|---|---|"]
    for backend, probes in report["probes"].items():
        for name, r in probes.items():
            if not isinstance(r, dict):
                lines.append(f"| {backend} | {name} | skipped | {r} |")
                continue
            verdict = {True: "ok", False: "FAILED", None: "skipped"}[r.get("ok")]
            lines.append(f"| {backend} | {name} | {verdict} | {r.get('detail')} |")
    for b in report["benches"]:
        lines += ["", f"`{b['command']}`: exit {b['returncode']} in {b['seconds']} s", "```",
                  b["tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
