"""Builds the optional extensions; everything else is in pyproject.toml.

fasttricks._C       CPU kernels, whenever torch is importable at build time.
fasttricks._C_cuda  CUDA kernels, only where torch has CUDA and CUDA_HOME exists.
A missing toolchain never fails the install: the package then runs on the
reference (and Triton) backends and ``fasttricks.backends()`` says why.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join(ROOT, "csrc", "include")]


def cpu_simd_flags():
    """ATen's vector types pick their ISA from CPU_CAPABILITY_*; we build for the
    best one this machine has (override with FASTTRICKS_CPU_SIMD=avx512|avx2|default)."""
    choice = os.environ.get("FASTTRICKS_CPU_SIMD")
    if choice is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(next(line for line in f if line.startswith("flags")).split())
        except (OSError, StopIteration):
            flags = set()
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
            choice = "avx512"
        elif {"avx2", "fma", "f16c"} <= flags:
            choice = "avx2"
        else:
            choice = "default"
    return {
        "avx512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
        "avx2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
        "default": [],
    }[choice]


def extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fasttricks: torch not importable at build time; building no extension", file=sys.stderr)
        return [], {}
    exts = [
        cpp_extension.CppExtension(
            "fasttricks._C",
            sorted(glob.glob("csrc/cpu/*.cpp")),
            include_dirs=INCLUDE,
            # -fopenmp: at::parallel_for is inlined here; it links torch's own libgomp.
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17", *cpu_simd_flags()],
            extra_link_args=["-fopenmp"],
        )
    ]
    if torch.version.cuda and cpp_extension.CUDA_HOME:
        exts.append(
            cpp_extension.CUDAExtension(
                "fasttricks._C_cuda",
                sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")),
                include_dirs=INCLUDE,
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            )
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return exts, {"build_ext": build_ext}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
