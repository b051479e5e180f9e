"""`pytest --device cuda` on a machine without CUDA stops with one line instead of skipping every test."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_usage_error():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--device", "cuda", "tests/test_masks.py", "-q", "-p", "no:cacheprovider"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    assert (run.stdout + run.stderr).strip().splitlines() == [
        "ERROR: --device cuda was given but this PyTorch has no CUDA device; run without --device"
    ]
