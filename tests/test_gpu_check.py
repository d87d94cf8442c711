"""The GPU check (bench/gpu_check.py) cannot pass empty: it fails when the
installed fasttricks lacks a GPU backend that should be there (a checkout with
no built extension), and when no GPU test executed. Run here without a GPU by
faking the device listing and the stages."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
gpu_check = pytest.importorskip("gpu_check")


def fake_gpu(monkeypatch, tmp_path, installed, tests=None):
    """A machine that lists a GPU: the check's own stages are replaced by fakes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu_check, "environment", lambda device: {"git": "test"})
    monkeypatch.setattr(gpu_check, "installed", lambda: installed)
    builds = []
    monkeypatch.setattr(gpu_check, "install_checkout", lambda timeout: builds.append(timeout) or
                        {"command": "pip install", "returncode": 1, "seconds": 0, "tail": "no compiler"})
    monkeypatch.setattr(gpu_check, "run_tests", lambda files, timeout, marker=None: dict(tests))
    monkeypatch.setattr(gpu_check, "PROBES", {})
    monkeypatch.setattr(gpu_check, "SHARED_PROBES", {})
    return builds


def ran(tests, skipped, failures=0):
    return {"command": "pytest", "returncode": 1 if failures else 0, "seconds": 1.0, "tail": "", "tests": tests,
            "failures": failures, "errors": 0, "skipped": skipped, "ran": tests - skipped}


GOOD = {"path": "/site-packages/fasttricks/__init__.py", "version": "0.1.0",
        "backends": {"cpu": {"available": True}}, "gpu": {"cuda": None, "triton": None}}


def test_an_unbuilt_checkout_fails_loudly(monkeypatch, tmp_path, capsys):
    builds = fake_gpu(monkeypatch, tmp_path, installed=None)
    assert gpu_check.main(["--skip-benches"]) == 1
    assert builds, "it tried to build the checkout first"
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "FAILED" in last and "backend cuda missing: fasttricks is not importable" in last
    assert (tmp_path / "gpu_check_fake_gpu.json").is_file() and (tmp_path / "gpu_check_fake_gpu.md").is_file()


def test_a_missing_gpu_backend_fails(monkeypatch, tmp_path, capsys):
    no_cuda = {**GOOD, "gpu": {"cuda": "not built: nvcc not found", "triton": None}}
    fake_gpu(monkeypatch, tmp_path, installed=no_cuda, tests=ran(20, 0))
    monkeypatch.setattr(gpu_check, "FRAMEWORKS", ())
    assert gpu_check.main(["--skip-benches"]) == 1
    assert "backend cuda missing: not built: nvcc not found" in capsys.readouterr().out
    assert gpu_check.main(["--skip-benches", "--require", "triton"]) == 0  # unless it is not required


def test_a_run_where_no_gpu_test_executed_fails(monkeypatch, tmp_path, capsys):
    fake_gpu(monkeypatch, tmp_path, installed=GOOD, tests=ran(40, 40))  # every test skipped
    monkeypatch.setattr(gpu_check, "FRAMEWORKS", ())
    assert gpu_check.main(["--skip-benches"]) == 1
    assert "GPU tests: no test ran (40 collected, 40 skipped)" in capsys.readouterr().out


def test_a_passing_run_says_so_on_its_last_line(monkeypatch, tmp_path, capsys):
    fake_gpu(monkeypatch, tmp_path, installed=GOOD, tests=ran(40, 2))
    monkeypatch.setattr(gpu_check, "FRAMEWORKS", ())
    assert gpu_check.main(["--skip-benches"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("gpu_check: PASSED (GPU tests: 38/38 passed, 2 skipped") and "gpu_check_fake_gpu.json" in last


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="3"/></testsuites>')
    assert gpu_check.junit_counts(xml) == {"tests": 5, "failures": 1, "errors": 0, "skipped": 3}
    assert gpu_check.junit_counts(tmp_path / "absent.xml")["tests"] == 0
