"""The CPU kernels load for the running CPU's ISA (one module per ISA), a lower one
can be forced, and the build reports what it built or skipped."""
import os
import subprocess
import sys

import pytest

from fasttricks import _backends

SCRIPT = "from fasttricks import _backends as b; m = b.cpu_ext(); print(m.simd if m else 'none')"


def _simd(isa, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTTRICKS_CPU_ISA"}
    if isa:
        env["FASTTRICKS_CPU_ISA"] = isa
    # Outside the checkout: import the installed package.
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    return out


@pytest.mark.skipif(_backends.cpu_ext() is None, reason="CPU extension not built")
def test_best_isa_loads_by_default_and_lower_ones_on_request(tmp_path):
    best = _backends.cpu_isa_supported()
    assert _simd(None, tmp_path).stdout.strip() == best
    for isa in _backends.CPU_ISA_ORDER[: _backends.CPU_ISA_ORDER.index(best) + 1]:
        out = _simd(isa, tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == isa


def test_bad_or_unsupported_isa_request_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTTRICKS_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="FASTTRICKS_CPU_ISA must be one of"):
        _backends.cpu_isa_choice()
    if _backends.cpu_isa_supported() != "avx512":
        monkeypatch.setenv("FASTTRICKS_CPU_ISA", "avx512")
        with pytest.raises(ValueError, match="supports at most"):
            _backends.cpu_isa_choice()


def test_build_info_says_what_was_built():
    info = _backends.build_info()
    if _backends.cpu_ext() is None:
        pytest.skip("not built")
    assert "default" in info["cpu_isas"]
    assert isinstance(info["cuda"], str) and info["cuda"]
    if info["cuda"] != "built":
        import torch

        if torch.version.cuda is None:
            assert "has no CUDA" in _backends.backends()["cuda"]["detail"]
