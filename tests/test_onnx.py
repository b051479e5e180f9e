"""The ONNX export in onnxruntime against the PyTorch model and the official values: every end-to-end case.

The tiny official model is exported once, by the command line (with LLaMA's tokenizer where there is
one; the id-level checks give the prompt ids themselves, as tests/test_end_to_end.py does).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, REPO, fixture_tensors, llama_tokenizer_path

import nxtp_minimal
from nxtp_minimal import inference, sampling
from nxtp_minimal.tools.errors import UserError

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install -e .[onnx])")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install -e .[onnx])")
from nxtp_minimal.tools.onnx_engine import OnnxNXTP  # noqa: E402

TINY = FIXTURES / "tiny_nxtp.safetensors"
T = fixture_tensors("tiny_nxtp_cases.safetensors")
CASES = json.loads((FIXTURES / "cases.json").read_text())["tiny_nxtp"]["cases"]
SINGLE = [c for c in CASES if "image" in c]
BATCHED = [c for c in CASES if "images" in c]
PROMPT = CASES[0]["prompt_token_ids"]
DELIMITER = 29892


def cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "nxtp_minimal", *map(str, args)], capture_output=True, text=True,
                          check=check, cwd=REPO)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    tokenizer = llama_tokenizer_path()
    cli("export", "onnx", "--weights", TINY, *(["--tokenizer", tokenizer] if tokenizer else []), "--out", out)
    return out


@pytest.fixture(scope="module")
def engine(exported):
    return OnnxNXTP(exported)


@pytest.fixture(scope="module")
def model():
    return nxtp_minimal.load(TINY)


def fixture(name, what):
    """A tensor of tiny_nxtp_cases.safetensors for an image file: fixture("tiny_nxtp_image0.png", "pixels")."""
    return T[f"image{name.split('image')[-1].split('.')[0]}.{what}"]


def ranked_branches(tokens, probs):
    return sorted(sampling.branch_labels(tokens, probs, DELIMITER), key=lambda b: -b[1])


def check_against_torch_and_official(engine, model, pixels, k, official):
    """official: per image, (label ids highest first, their scores). Returns the first-step logits."""
    tokens, probs, first = inference.sample(engine, pixels, k, PROMPT, DELIMITER)
    ref_tokens, ref_probs, ref_first = inference.sample(model, pixels, k, PROMPT, DELIMITER)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=1e-4)
    torch.testing.assert_close(first, ref_first, rtol=0, atol=1e-4)
    for b, (ids, scores) in enumerate(official):
        branches = ranked_branches(tokens[b], probs[b])
        assert [i for i, _ in branches] == ids
        assert [s for _, s in branches] == pytest.approx(scores, abs=1e-4)
    return first


@pytest.mark.parametrize("case", SINGLE, ids=lambda c: f"{c['image'].split('.')[0]}-k{c['k']}")
def test_single_image_cases(engine, model, case):
    official = [(case["label_token_ids"], case["probs"])]
    first = check_against_torch_and_official(engine, model, fixture(case["image"], "pixels"), case["k"], official)
    torch.testing.assert_close(first, fixture(case["image"], "first_logits"), rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", BATCHED, ids=["batched"])
def test_batched_case(engine, model, case):
    pixels = torch.cat([fixture(name, "pixels") for name in case["images"]])
    official = [(image["label_token_ids"], image["probs"]) for image in case["batched"]]
    check_against_torch_and_official(engine, model, pixels, case["k"], official)


def test_export_description(exported):
    meta = json.loads((exported / "nxtp.json").read_text())
    assert meta["config"] == json.loads((FIXTURES / "cases.json").read_text())["tiny_nxtp"]["config"]
    assert meta["dtype"] == "float32" and meta["max_tokens"] == sampling.MAX_TOKENS
    if meta["tokenizer"] is not None:
        assert meta["prompt_ids"] == PROMPT and meta["delimiter_id"] == DELIMITER and meta["eos_id"] == 2
    # prefill and step share one copy of the decoder's weights
    assert sorted(p.name for p in exported.iterdir() if p.name.endswith(".data")) == [
        "decoder.onnx.data", "vision.onnx.data"]


def test_predict_text(engine, llama_tokenizer):
    images = [FIXTURES / name for name in BATCHED[0]["images"]]
    for got, expected in zip(engine.predict(images, k=BATCHED[0]["k"]), BATCHED[0]["batched"]):
        assert [lab for lab, _ in got] == expected["labels"]
        assert [p for _, p in got] == pytest.approx(expected["probs"], abs=1e-4)


def test_command_line_equals_torch(exported):
    if llama_tokenizer_path() is None:
        pytest.skip("LLaMA tokenizer not found: set NXTP_LLAMA_TOKENIZER (see weights/README.md)")
    images = [FIXTURES / name for name in BATCHED[0]["images"]]
    onnx = json.loads(cli("predict", *images, "--engine", "onnx", "--onnx", exported, "--top-k", 5, "--json").stdout)
    ref = json.loads(cli("predict", *images, "--weights", TINY, "--tokenizer", llama_tokenizer_path(),
                         "--top-k", 5, "--json").stdout)
    assert [r["image"] for r in onnx] == [r["image"] for r in ref]
    for a, b in zip(onnx, ref):
        assert [x["label"] for x in a["labels"]] == [x["label"] for x in b["labels"]]
        assert [x["prob"] for x in a["labels"]] == pytest.approx([x["prob"] for x in b["labels"]], abs=1e-4)


def test_bench_exports_the_same_model(tmp_path):
    """bench --engine onnx exports its random-weight preset from a child process: the graphs there must hold
    the weights the PyTorch rows were timed with."""
    from nxtp_minimal.tools import bench

    out = cli("bench", "--preset", "tiny", "--top-k", 3, "--steps", 1, "--engine", "onnx", "--onnx", tmp_path, "--json")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["preset"], r["engine"], r["k"]) for r in rows] == [("tiny", "onnx", 3)]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    args = (pixels, 3, bench.PROMPT_IDS, bench.NEVER)
    tokens, probs, first = inference.sample(OnnxNXTP(tmp_path), *args, max_tokens=4)
    ref_tokens, ref_probs, ref_first = inference.sample(bench.build("tiny", "cpu", torch.float32), *args, max_tokens=4)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=1e-4)
    torch.testing.assert_close(first, ref_first, rtol=0, atol=1e-4)


def broken_copy(exported, tmp_path, change):
    """A copy of the export with `change(folder)` applied."""
    folder = tmp_path / "broken"
    shutil.copytree(exported, folder)
    change(folder)
    return folder


def edit_meta(edit):
    def change(folder):
        meta = json.loads((folder / "nxtp.json").read_text())
        edit(meta)
        (folder / "nxtp.json").write_text(json.dumps(meta))
    return change


@pytest.mark.parametrize("change, error, message", [
    (lambda f: shutil.rmtree(f), FileNotFoundError, "ONNX export folder not found"),
    (lambda f: os.remove(f / "step.onnx"), FileNotFoundError, "ONNX graph not found"),
    (lambda f: os.remove(f / "nxtp.json"), FileNotFoundError, "ONNX export description not found"),
    (lambda f: (f / "nxtp.json").write_text("{not json"), ValueError, "is not an NXTP ONNX export description"),
    (edit_meta(lambda m: m.pop("config")), ValueError, "is not an NXTP ONNX export description"),
    (edit_meta(lambda m: m.update(format="other")), ValueError, "is not an NXTP ONNX export description"),
    (edit_meta(lambda m: m["config"]["language"].update(dim=64)), ValueError, "do not fit its nxtp.json"),
    (edit_meta(lambda m: m["config"]["language"].update(vocab_size=100)), ValueError, "do not fit its nxtp.json"),
    (lambda f: (f / "prefill.onnx").write_bytes(b"not a graph"), ValueError, "onnxruntime cannot load"),
    (lambda f: os.remove(f / "decoder.onnx.data"), ValueError, "onnxruntime cannot load"),
], ids=["no-folder", "no-graph", "no-json", "bad-json", "no-config", "wrong-format", "other-dim", "other-vocab",
        "bad-graph", "no-weights"])
def test_malformed_export(exported, tmp_path, change, error, message):
    folder = broken_copy(exported, tmp_path, change)
    with pytest.raises(error, match=message) as e:
        OnnxNXTP(folder)
    assert "\n" not in str(e.value)


def test_malformed_export_command_line(exported, tmp_path):
    folder = broken_copy(exported, tmp_path, lambda f: os.remove(f / "vision.onnx"))
    out = cli("predict", FIXTURES / "tiny_nxtp_image0.png", "--engine", "onnx", "--onnx", folder, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: ONNX graph not found: {folder / 'vision.onnx'}. Export one "
                                               "with: python -m nxtp_minimal export onnx --weights W --tokenizer T "
                                               "--out DIR"]


def test_without_onnxruntime(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(UserError, match=r"pip install -e \.\[onnx\]"):
        OnnxNXTP(exported)
