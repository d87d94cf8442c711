"""Shared helpers. Without a GPU, Triton runs on the CPU through its
interpreter; with one, it compiles (tests/test_gpu.py). The variable must be
set before fasttricks.kernels (and so triton.jit) is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fasttricks  # noqa: E402
from helpers import cpu_backends  # noqa: E402


def pytest_sessionstart(session):
    required = [n for n in os.environ.get("FASTTRICKS_REQUIRE", "").split(",") if n]
    missing = [n for n in required if n not in cpu_backends()]
    if missing:
        raise pytest.UsageError(f"required backends unavailable: {missing}: {fasttricks.backends()}")
