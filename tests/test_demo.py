"""The shipped demo model: small, accurate on held-out scenes, and what `predict` uses with no --weights."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from nxtp_minimal import load_demo
from nxtp_minimal.evaluate import HELD_OUT_SEED, predict_scenes, top_n_recall

WEIGHTS = REPO / "weights"
IMAGES = REPO / "lessons" / "images"


@pytest.fixture(scope="module")
def demo():
    return load_demo()


def test_shipped_files_are_small():
    size = (WEIGHTS / "demo.safetensors").stat().st_size + (WEIGHTS / "demo_tokenizer.model").stat().st_size
    assert size <= 10 * 2**20, f"{size / 2**20:.1f} MB"


def test_held_out_top_n_recall(demo):
    predicted, reference = predict_scenes(demo, HELD_OUT_SEED, 200, k=5)
    recall = sum(map(top_n_recall, predicted, reference)) / len(reference)
    assert recall >= 0.95, recall


def test_example_images_labels(demo):
    examples = json.loads((IMAGES / "labels.json").read_text())
    assert len(examples) >= 3
    for name, labels in examples.items():
        ranked = [label for label, _ in demo.predict(IMAGES / name, k=5)[0]]
        assert sorted(ranked[: len(labels)]) == sorted(labels), name


def test_predict_command_uses_demo_model(tmp_path):
    examples = json.loads((IMAGES / "labels.json").read_text())
    name, labels = next(iter(examples.items()))
    env = {k: v for k, v in os.environ.items() if k != "NXTP_LLAMA_TOKENIZER"}
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run([sys.executable, "-m", "nxtp_minimal", "predict", str(IMAGES / name), "--top-k", "5"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines() == ["no --weights given: using the demo model shipped in weights/"]
    lines = run.stdout.splitlines()
    assert lines[0] == f"{IMAGES / name}: top-5 predictions:"
    printed = [line.split(" - ", 1)[1] for line in lines[1:]]
    assert sorted(printed[: len(labels)]) == sorted(labels)
