"""The GPU paths compile on this CPU-only machine (DESIGN.md): every Triton
kernel variant the host can launch, ahead of time for sm_90, and the CUDA
kernels with nvcc -arch=sm_90."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_compile_for_hopper(tmp_path):
    pytest.importorskip("triton")
    # triton.compile needs real (non-interpreted) jit functions: a fresh process.
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fasttricks.kernels import adam, mixup, sgd
        n = 0
        for module in (adam, sgd, mixup):
            for name, fn, sig, const in module.aot_variants():
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                                          target=GPUTarget("cuda", 90, 32))
                assert "ptx" in compiled.asm, name
                n += 1
        print("compiled", n)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    # cwd away from the checkout: `python -c` would import its uninstalled fasttricks/.
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "compiled 38" in out.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu")))
def test_cuda_kernels_compile_with_nvcc(tmp_path, source):
    out = subprocess.run(
        ["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-O3", f"-I{ROOT / 'csrc' / 'include'}",
         str(ROOT / "csrc" / "cuda" / source), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "kernel.o").stat().st_size > 0
