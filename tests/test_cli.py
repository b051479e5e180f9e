"""`python -m nxtp_minimal predict`: the official output layout and one clear line for each user error."""

import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, REPO, llama_tokenizer_path

TINY = str(FIXTURES / "tiny_nxtp.safetensors")
IMAGE1 = str(FIXTURES / "tiny_nxtp_image1.png")


def run(*args):
    return subprocess.run([sys.executable, "-m", "nxtp_minimal", *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def tokenizer():
    path = llama_tokenizer_path()
    if path is None:
        pytest.skip("LLaMA tokenizer not found: set NXTP_LLAMA_TOKENIZER (see weights/README.md)")
    return path


def test_table_like_the_official_script(tokenizer, cases):
    out = run("predict", IMAGE1, "--weights", TINY, "--tokenizer", tokenizer, "--top-k", "5")
    assert out.returncode == 0, out.stderr
    case = next(c for c in cases["tiny_nxtp"]["cases"] if c.get("image") == "tiny_nxtp_image1.png" and c["k"] == 5)
    lines = out.stdout.splitlines()
    assert lines[0] == f"{IMAGE1}: top-5 predictions:"
    assert lines[1:] == [f"| prob: {p:.5f} - {label}" for label, p in zip(case["labels"], case["probs"])]


def one_error_line(out):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def test_missing_image(tokenizer):
    line = one_error_line(run("predict", "no/such.png", "--weights", TINY, "--tokenizer", tokenizer))
    assert "image not found: no/such.png" in line


def test_not_an_image(tokenizer, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    line = one_error_line(run("predict", str(bad), "--weights", TINY, "--tokenizer", tokenizer))
    assert f"cannot read {bad} as an image" in line


@pytest.mark.parametrize("k", ["0", "32003"])
def test_top_k_out_of_range(tokenizer, k):
    line = one_error_line(run("predict", IMAGE1, "--weights", TINY, "--tokenizer", tokenizer, "--top-k", k))
    assert f"--top-k must be between 1 and the vocabulary size 32002, got {k}" in line


def test_weights_and_tokenizer_that_do_not_fit(small_tokenizer):
    line = one_error_line(run("predict", IMAGE1, "--weights", TINY, "--tokenizer", small_tokenizer))
    assert "do not fit together" in line


def test_missing_weights(tokenizer):
    line = one_error_line(run("predict", IMAGE1, "--weights", "nope.safetensors", "--tokenizer", tokenizer))
    assert "weights file not found: nope.safetensors" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tokenizer):
    line = one_error_line(run("predict", IMAGE1, "--weights", TINY, "--tokenizer", tokenizer, "--device", "cuda"))
    assert "--device cuda was asked for but this PyTorch has no CUDA device" in line
