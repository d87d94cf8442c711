"""The GPU paths compile on this CPU-only machine (docs/architecture.md): every Triton
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


# Every variant a launch can select: each kernel's aot_variants() builds its
# compile-time arguments with the same helper its launch uses. Adam: 16
# precisions (fasttricks/kernels/__init__.py PRECISIONS) x 2^4 switches; SGD: 16 x (2^5 -
# the 8 nesterov-without-momentum);
# mixup: 4 dtypes x (flip, permutation); soft-target CE: 3 dtypes x 3 class
# blocks x (forward, backward); the norm partials: 4 dtypes x (2, inf).
EXPECTED_VARIANTS = 16 * 16 + 16 * 24 + 4 * 2 + 3 * 3 * 2 + 4 * 2


@pytest.mark.parametrize("arch", [90, 80])
def test_triton_kernels_compile_ahead_of_time(tmp_path, arch):
    pytest.importorskip("triton")
    # triton.compile needs real (non-interpreted) jit functions: a fresh process,
    # and two workers for the two cores.
    script = textwrap.dedent(f"""
        import sys
        from concurrent.futures import ProcessPoolExecutor
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        def variants():
            from fasttricks.kernels import adam, mixup, norm, sgd, soft_ce
            return [v for module in (adam, sgd, mixup, soft_ce, norm) for v in module.aot_variants()]

        def compile_range(bounds):
            names = []
            for name, fn, sig, const, options in variants()[bounds[0]:bounds[1]]:
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                                          target=GPUTarget("cuda", {arch}, 32), options=options)
                assert "ptx" in compiled.asm, name
                names.append(name)
            return names

        if __name__ == "__main__":
            n = len(variants())
            with ProcessPoolExecutor(2) as pool:
                done = [x for part in pool.map(compile_range, [(0, n // 2), (n // 2, n)]) for x in part]
            assert len(set(done)) == n, "duplicate variant names"
            print("compiled", len(done))
    """)
    (tmp_path / "aot.py").write_text(script)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    # cwd away from the checkout: a script there would import its uninstalled fasttricks/.
    out = subprocess.run([sys.executable, "aot.py"], env=env, capture_output=True, text=True, timeout=900,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"compiled {EXPECTED_VARIANTS}" in out.stdout


def test_tensor_count_is_not_specialised(tmp_path):
    """Triton specialises integer arguments equal to 1 or divisible by 16: the
    optimizer kernels would recompile whenever the number of params with a grad
    became such a number (NOTE [plan cache]: that count changes freely), or
    whenever the stochastic-rounding key of a step (a hash) did."""
    pytest.importorskip("triton")
    script = ("from fasttricks.kernels import adam, sgd\n"
              "for fn in (adam.adam_kernel, sgd.sgd_kernel):\n"
              "    print([p.name for p in fn.params if p.do_not_specialize])\n")
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITON_INTERPRET": "0"},
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.split("\n")[:2] == ["['n_tensors', 'round_key']"] * 2


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu")))
def test_cuda_kernels_compile_with_nvcc(tmp_path, source):
    out = subprocess.run(
        ["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-O3", f"-I{ROOT / 'csrc' / 'include'}",
         str(ROOT / "csrc" / "cuda" / source), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "kernel.o").stat().st_size > 0
