"""The shipped demo model: small, accurate on held-out scenes, and what `predict` uses with no --weights."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from nxtp_minimal import load_demo
from nxtp_minimal.training.evaluate import HELD_OUT_SEED, predict_scenes, top_n_recall

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


def test_wheel_install_finds_the_demo_model(tmp_path):
    """A non-editable install carries the demo model as package data (pyproject.toml)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    shutil.copytree(REPO / "nxtp_minimal", source / "nxtp_minimal", ignore=shutil.ignore_patterns("__pycache__"))
    (source / "weights").mkdir()
    for name in ("demo.safetensors", "demo_tokenizer.model"):
        shutil.copy(WEIGHTS / name, source / "weights")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source],
                   check=True, env=env, capture_output=True, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("nxtp_minimal-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel],
                   check=True, env=env, capture_output=True, timeout=120)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**env, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import nxtp_minimal.weights as w; print(w.DEMO_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(tmp_path / "site" / "nxtp_minimal" / "demo_model"), where.stderr
    image = IMAGES / "scene_0.png"
    run = subprocess.run([sys.executable, "-m", "nxtp_minimal", "predict", str(image), "--top-k", "5"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"{image}: top-5 predictions:"
    labels = json.loads((IMAGES / "labels.json").read_text())["scene_0.png"]
    assert sorted(line.split(" - ", 1)[1] for line in lines[1: 1 + len(labels)]) == sorted(labels)
