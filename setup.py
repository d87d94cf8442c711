"""Builds the optional extensions; everything else is in pyproject.toml.

fasttricks._C, _C_avx2, _C_avx512   the CPU kernels, once per ISA (whenever torch is
                                    importable); fasttricks._backends picks one at import
                                    from the running CPU, as ATen does (README, "Two commands").
fasttricks._C_cuda                  CUDA kernels, only where torch has CUDA, nvcc is found,
                                    its major version matches torch's and an arch list is known.
Nothing about CUDA fails the install: a CUDA extension that cannot build is skipped with
one line on stderr, and `fasttricks.backends()` says why (the reason is written into
fasttricks/_build_info.py). A wheel never carries code for the builder's ISA alone.
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join(ROOT, "csrc", "include")]
# The CPU extension also includes its own folders by name (csrc/host/plans.h as "host/plans.h").
CPU_INCLUDE = INCLUDE + [os.path.join(ROOT, "csrc")]

# ATen's vector types pick their ISA from CPU_CAPABILITY_*. The baseline module (no
# define) is plain x86-64 / aarch64 code and runs everywhere.
CPU_ISAS = {
    "default": ("fasttricks._C", []),
    "avx2": ("fasttricks._C_avx2", ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]),
    "avx512": ("fasttricks._C_avx512", ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                                        "-mavx512dq", "-mfma"]),
}


def cpu_isas():
    """The ISAs to build: all three on x86-64 (FASTTRICKS_CPU_ISAS=default,avx2 builds fewer)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    names = os.environ.get("FASTTRICKS_CPU_ISAS", "default,avx2,avx512").split(",")
    unknown = [n for n in names if n not in CPU_ISAS]
    if unknown or "default" not in names:
        raise SystemExit(f"FASTTRICKS_CPU_ISAS must list 'default' and only {sorted(CPU_ISAS)}, got {names}")
    return names


def cuda_skip_reason(torch, cpp_extension):
    """None when the CUDA extension can build here, else why not (one line)."""
    if not torch.version.cuda:
        return f"torch {torch.__version__} has no CUDA"
    if os.environ.get("FASTTRICKS_NO_CUDA") == "1":
        return "FASTTRICKS_NO_CUDA=1"
    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc not found (set CUDA_HOME)"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{nvcc} --version failed: {exc}"
    found = re.search(r"release (\d+)\.(\d+)", out)
    if not found:
        return f"cannot read the version of {nvcc}"
    if found.group(1) != torch.version.cuda.split(".")[0]:
        return f"nvcc is CUDA {found.group(1)}.{found.group(2)} but torch was built with CUDA {torch.version.cuda}"
    headers = ("cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h")
    include = os.path.join(home, "include")
    missing = [h for h in headers if not os.path.exists(os.path.join(include, h))]
    if missing:
        return f"CUDA headers missing in {include}: {', '.join(missing)}"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # torch derives the list from the visible GPUs and fails without one.
        try:
            visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
        except Exception:  # a driver that cannot be queried
            visible = False
        if not visible:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
            print("fasttricks: no GPU visible; building CUDA kernels for TORCH_CUDA_ARCH_LIST=8.0;9.0",
                  file=sys.stderr)
    return None


def write_build_info(info: dict, folder: str = os.path.join(ROOT, "fasttricks")) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py at build time: what was built and what was skipped."""\n')
        f.write(f"BUILD = {info!r}\n")


def extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fasttricks: torch not importable at build time; building no extension", file=sys.stderr)
        write_build_info({"cpu_isas": [], "cuda": "torch was not importable at build time"})
        return [], {}
    isas = cpu_isas()
    exts = [
        cpp_extension.CppExtension(
            CPU_ISAS[isa][0],
            # csrc/host: the host plumbing (tensor table, plans, device pointer table);
            # csrc/cpu: the kernels and the bindings.
            sorted(glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/host/*.cpp")),
            include_dirs=CPU_INCLUDE,
            # -fopenmp: at::parallel_for is inlined here; it links torch's own libgomp.
            # -ffp-contract=off: no a*b + c*d contracted into an FMA where -mfma allows it, so
            # every ISA variant rounds as the reference does (docs/precision.md).
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off", *CPU_ISAS[isa][1]],
            extra_link_args=["-fopenmp"],
        )
        for isa in isas
    ]
    skip = cuda_skip_reason(torch, cpp_extension)
    if skip is None:
        exts.append(
            cpp_extension.CUDAExtension(
                "fasttricks._C_cuda",
                sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")),
                include_dirs=INCLUDE,
                # No --use_fast_math: IEEE sqrt/division and denormals, as torch and the
                # other backends (docs/precision.md); the kernels are memory-bound anyway.
                extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                    # no FMA contraction: the same fp32 bits as the other backends
                                    "nvcc": ["-O3", "-std=c++17", "--fmad=false"]},
            )
        )
    else:
        print(f"fasttricks: skipping the CUDA extension: {skip}", file=sys.stderr)
    info = {"cpu_isas": isas, "cuda": "built" if skip is None else skip}
    write_build_info(info)

    class BuildExt(cpp_extension.BuildExtension):
        """A CUDA extension that fails to compile or link is dropped, not fatal."""

        def build_extension(self, ext):
            try:
                return super().build_extension(ext)
            except Exception as exc:  # compiler or linker errors: the CPU side still installs
                if not ext.name.endswith("_C_cuda"):
                    raise
                reason = f"building the CUDA extension failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                print(f"fasttricks: {reason}", file=sys.stderr)
                write_build_info({**info, "cuda": reason}, os.path.join(self.build_lib, "fasttricks"))

    return exts, {"build_ext": BuildExt.with_options(use_ninja=True)}


def license_metadata() -> dict:
    """The license as this setuptools takes it: an SPDX expression (PEP 639)
    needs setuptools 77, and older ones (65 in a fresh venv beside torch 2.11,
    built with --no-build-isolation) reject it in pyproject.toml, so it is
    dynamic there and given here in the form the running setuptools knows."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": LICENSE} if major >= 77 else {"license": LICENSE}


LICENSE = "BSD-3-Clause"
ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, **license_metadata())
