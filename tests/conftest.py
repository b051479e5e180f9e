"""Shared fixtures. `pytest --device cuda` runs the device-aware tests on the GPU (an error without CUDA)."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="cpu or cuda: where device-aware tests run")


def pytest_configure(config):
    # a GPU run that quietly skipped every device test would look like a pass
    if config.getoption("--device").startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda was given but this PyTorch has no CUDA device; run without --device")


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--device")
    if name.startswith("cuda"):
        # float32 tests mean float32: no TensorFloat-32 shortcuts in matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return name


@pytest.fixture(scope="session")
def cases():
    return json.loads((FIXTURES / "cases.json").read_text())


def fixture_tensors(name):
    return load_file(FIXTURES / name)


def llama_tokenizer_path():
    """The LLaMA tokenizer is Meta's file and not in the repo: NXTP_LLAMA_TOKENIZER or weights/tokenizer.model."""
    path = os.environ.get("NXTP_LLAMA_TOKENIZER") or str(REPO / "weights" / "tokenizer.model")
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="session")
def llama_tokenizer():
    path = llama_tokenizer_path()
    if path is None:
        pytest.skip("LLaMA tokenizer not found: set NXTP_LLAMA_TOKENIZER to tokenizer.model (see weights/README.md)")
    from nxtp_minimal import Tokenizer

    return Tokenizer(path)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A 40-piece SentencePiece model: a tokenizer that does not fit the 32002-row fixture model."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("small_tokenizer")
    (d / "text.txt").write_text("The objects in the image are dog, cat, apple\n" * 50)
    spm.SentencePieceTrainer.train(
        input=str(d / "text.txt"), model_prefix=str(d / "small"), vocab_size=40,
        user_defined_symbols=[",", "\u2581are"], hard_vocab_limit=False, minloglevel=2,
    )
    return str(d / "small.model")
