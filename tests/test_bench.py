"""The benches print; they write bench/results/ only when asked (--save), and
the torch profiler they use for allocations prints nothing of its own."""
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_mixup(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import _timing
    import bench_mixup

    monkeypatch.setattr(_timing, "RESULTS", tmp_path / "results")
    return bench_mixup, tmp_path / "results"


def test_bench_writes_results_only_with_save(bench_mixup, capfd):
    module, results = bench_mixup
    module.main(["--quick", "--iters", "1"])
    out, err = capfd.readouterr()
    assert not results.exists()
    assert "(not saved; --save writes" in out
    assert "USDT" not in out + err
    module.main(["--quick", "--iters", "1", "--save"])
    assert (results / "mixup_cpu.json").is_file()
