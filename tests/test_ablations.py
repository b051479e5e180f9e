"""The ablation command trains, stores and measures its runs; the shipped results describe the shipped files."""

import json

import pytest

import nxtp_minimal
from conftest import REPO
from nxtp_minimal.training import ablations, evaluate

ABLATIONS = REPO / "weights" / "ablations"
KEYS = {"name", "mask", "blocks", "init", "steps", "top_n_recall", "duplicates_per_image", "seconds_per_image"}


def test_ablate_trains_stores_and_measures(tmp_path, monkeypatch):
    runs = [ablations.Run("deep", "causal", 3, None, steps=2, warmup=1),
            ablations.Run("cut", "label", 1, "deep", steps=2, warmup=1)]
    monkeypatch.setitem(ablations.EXPERIMENTS, "mask", runs)
    ablations.main(["mask", "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--scenes", "20"])
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["name"] for r in rows] == ["deep", "cut"] and all(set(r) == KEYS for r in rows)
    for row, run in zip(rows, runs):
        model = nxtp_minimal.load(tmp_path / "out" / f"{row['name']}.safetensors", nxtp_minimal.load_demo().tokenizer)
        assert model.config.language.n_layers == run.blocks and model.dtype == nxtp_minimal.load_demo().dtype
        again = evaluate.ablation_row(model, 20)
        assert row["top_n_recall"] == again["top_n_recall"]
        assert row["duplicates_per_image"] == again["duplicates_per_image"]
        assert (row["mask"], row["init"], row["steps"]) == (run.mask, run.init, run.steps)
    # run again: what is stored with its row is kept, nothing is trained twice
    monkeypatch.setattr(ablations, "train_run", lambda *a: pytest.fail("trained a run that was already stored"))
    ablations.main(["mask", "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--scenes", "20"])
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == rows


def test_shipped_results_describe_the_shipped_files():
    if not (ABLATIONS / "results.json").is_file():
        pytest.skip("weights/ablations/results.json is not there yet: python -m nxtp_minimal ablate mask|depth")
    rows = json.loads((ABLATIONS / "results.json").read_text())
    expected = {run.name for runs in ablations.EXPERIMENTS.values() for run in runs}
    assert {r["name"] for r in rows} == expected
    tokenizer = nxtp_minimal.load_demo().tokenizer
    for row in rows:
        assert set(row) == KEYS
        model = nxtp_minimal.load(ABLATIONS / f"{row['name']}.safetensors", tokenizer)
        assert model.config.language.n_layers == row["blocks"]
    assert sum(f.stat().st_size for f in (REPO / "weights").rglob("*") if f.is_file()) < 40 * 2**20
