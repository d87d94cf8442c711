"""Which kernel backends loaded, and the choice of one for a tensor's device.

Backends: "reference" (pure torch, always there), "cpu" (the C++ extension
fasttricks._C), "triton" (fasttricks.kernels; CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1), "cuda" (the CUDA extension fasttricks._C_cuda).
Extensions load inside try/except: a missing one is reported, never fatal.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

_loaded: dict[str, object] = {}
_why_not: dict[str, str] = {}


def _load(name: str, module: str):
    if name not in _loaded and name not in _why_not:
        try:
            _loaded[name] = importlib.import_module(module)
        except Exception as exc:  # ImportError, or an ABI mismatch (OSError)
            _why_not[name] = f"{type(exc).__name__}: {exc}"
    return _loaded.get(name)


# The CPU kernels are built once per ISA (setup.py); the best one the running CPU
# supports loads, as ATen picks its own kernels. FASTTRICKS_CPU_ISA forces a lower one.
CPU_ISA_MODULES = {"default": "fasttricks._C", "avx2": "fasttricks._C_avx2", "avx512": "fasttricks._C_avx512"}
CPU_ISA_ORDER = tuple(CPU_ISA_MODULES)  # lowest first


def build_info() -> dict:
    """What setup.py built and skipped ({} for a checkout that was never built)."""
    try:
        from fasttricks._build_info import BUILD
    except ImportError:
        return {}
    return dict(BUILD)


def cpu_isa_supported() -> str:
    """The best ISA of CPU_ISA_ORDER this CPU runs, as ATen detects it."""
    try:
        cap = torch.backends.cpu.get_cpu_capability().lower()
    except Exception:  # an old torch, or a CPU ATen does not know
        return "default"
    # ATEN_CPU_CAPABILITY lowers ATen's answer too; "avx512_vnni"-style answers count as avx512.
    for isa in reversed(CPU_ISA_ORDER):
        if cap.startswith(isa):
            return isa
    return "default"


def cpu_isa_choice() -> str:
    """The ISA whose module cpu_ext() loads: the best supported, or FASTTRICKS_CPU_ISA if lower."""
    best = cpu_isa_supported()
    forced = os.environ.get("FASTTRICKS_CPU_ISA")
    if not forced:
        return best
    if forced not in CPU_ISA_ORDER:
        raise ValueError(f"FASTTRICKS_CPU_ISA must be one of {CPU_ISA_ORDER}, got {forced!r}")
    if CPU_ISA_ORDER.index(forced) > CPU_ISA_ORDER.index(best):
        raise ValueError(f"FASTTRICKS_CPU_ISA={forced} but this CPU supports at most {best}")
    return forced


def cpu_ext():
    """The CPU extension module for this CPU's ISA, or None. A wheel built with fewer
    ISAs (FASTTRICKS_CPU_ISAS at build time) falls back to the best one it has."""
    if "cpu" not in _loaded and "cpu" not in _why_not:
        choice = cpu_isa_choice()
        for isa in reversed(CPU_ISA_ORDER[: CPU_ISA_ORDER.index(choice) + 1]):
            if importlib.util.find_spec(CPU_ISA_MODULES[isa]) is not None:
                return _load("cpu", CPU_ISA_MODULES[isa])
        _why_not["cpu"] = "fasttricks._C was not built (torch was not importable when the package was built)"
    return _loaded.get("cpu")


def cuda_ext():
    """The CUDA extension module, or None (never imported on a CPU build of torch)."""
    if not torch.version.cuda:
        _why_not.setdefault("cuda", f"torch {torch.__version__} has no CUDA")
        return None
    built = build_info().get("cuda")
    if built not in (None, "built"):
        _why_not.setdefault("cuda", f"not built: {built}")
        return None
    return _load("cuda", "fasttricks._C_cuda")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_kernels():
    """The fasttricks.kernels package (imports triton), or None."""
    if importlib.util.find_spec("triton") is None:
        _why_not.setdefault("triton", "triton is not installed")
        return None
    return _load("triton", "fasttricks.kernels")


def available(backend: str, device: torch.device) -> str | None:
    """None if `backend` can run on `device`, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs CPU tensors, not {device.type}"
        return None if cpu_ext() else _why_not.get("cpu", "fasttricks._C did not load")
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, not {device.type}"
        return None if cuda_ext() else _why_not.get("cuda", "fasttricks._C_cuda did not load")
    if backend == "triton":
        if device.type == "cpu" and not triton_interpreting():
            return "triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run {device.type} tensors here"
        return None if triton_kernels() else _why_not.get("triton", "fasttricks.kernels did not load")
    raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on `device`. "auto" takes the fastest
    that is available; an explicit choice that cannot run raises RuntimeError."""
    if backend == "auto":
        order = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
        for name in order:
            if available(name, device) is None:
                return name
        return "reference"
    reason = available(backend, device)
    if reason is not None:
        raise RuntimeError(f"fasttricks backend {backend!r} is unavailable for {device}: {reason}")
    return backend


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")


def backends() -> dict[str, dict[str, object]]:
    """What loaded: {name: {"available": bool, "detail": str}}."""
    cpu, cuda, tri = cpu_ext(), cuda_ext(), triton_kernels()
    report = {"reference": {"available": True, "detail": f"torch {torch.__version__}"}}
    report["cpu"] = {"available": cpu is not None,
                     "detail": f"simd={cpu.simd} (cpu supports {cpu_isa_supported()}), threads={torch.get_num_threads()}" if cpu else _why_not.get("cpu", "")}
    if tri is not None:
        import triton

        where = "CUDA" if torch.cuda.is_available() else ("CPU (interpreter)" if triton_interpreting() else "no CUDA device; CPU needs TRITON_INTERPRET=1")
        report["triton"] = {"available": True, "detail": f"triton {triton.__version__}, runs on {where}"}
    else:
        report["triton"] = {"available": False, "detail": _why_not.get("triton", "")}
    report["cuda"] = {"available": cuda is not None,
                      "detail": "built" + ("" if torch.cuda.is_available() else ", no CUDA device visible") if cuda else _why_not.get("cuda", "")}
    return report
