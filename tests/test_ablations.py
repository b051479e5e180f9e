"""The ablation command trains, stores and measures its runs; the shipped results describe the shipped files."""

import json

import pytest

import nxtp_minimal
from conftest import REPO
from nxtp_minimal.training import ablations, evaluate

ABLATIONS = REPO / "weights" / "ablations"
KEYS = {"name", "mask", "blocks", "init", "steps", "seed", "top_n_recall", "duplicates_per_image", "seconds_per_image"}
# the commands that made weights/ablations/, as docs/experiments.md lists them: (experiment, --seeds, --steps)
SHIPPED = [("mask", 1, None), ("mask", 3, 200), ("depth", 3, None)]


def test_ablate_trains_stores_and_measures(tmp_path, monkeypatch):
    runs = [ablations.Run("deep", "causal", 3, None, steps=2, warmup=1),
            ablations.Run("cut", "label", 1, "deep", steps=2, warmup=1)]
    monkeypatch.setitem(ablations.EXPERIMENTS, "mask", runs)
    monkeypatch.setitem(ablations.COMPARED, "mask", ("cut",))
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["mask", "--seeds", "2", "--steps", "3", "--out-dir", str(out), "--work-dir", str(work), "--scenes", "20"]
    ablations.main(argv)
    rows = json.loads((out / "results.json").read_text())
    assert [(r["name"], r["steps"], r["seed"]) for r in rows] == [("deep", 2, 0), ("cut_3steps", 3, 0), ("cut_3steps_seed1", 3, 1)]
    assert all(set(r) == KEYS for r in rows)
    assert not (out / "cut_3steps_seed1.safetensors").exists()  # an extra seed keeps its numbers only
    tokenizer = nxtp_minimal.load_demo().tokenizer
    for row, run in zip(rows, [runs[0], runs[1], runs[1]]):
        assert (row["mask"], row["init"], row["blocks"]) == (run.mask, run.init, run.blocks)
        # the float16 file the row was measured on: in OUT for seed 0, in the run's work folder otherwise
        stored = out / f"{row['name']}.safetensors" if row["seed"] == 0 else work / row["name"] / "float16.safetensors"
        model = nxtp_minimal.load(stored, tokenizer)
        assert model.config.language.n_layers == run.blocks and model.dtype == nxtp_minimal.load_demo().dtype
        again = evaluate.ablation_row(model, 20)
        assert row["top_n_recall"] == again["top_n_recall"]
        assert row["duplicates_per_image"] == again["duplicates_per_image"]
        record = json.loads((out / f"{row['name']}.json").read_text())
        predicted, reference = evaluate.predict_scenes(model, evaluate.HELD_OUT_SEED, 20)
        assert record["per_scene_top_n_recall"] == pytest.approx([evaluate.top_n_recall(p, r) for p, r in zip(predicted, reference)])
        # the log holds the train command's held-out checks; the last one is the float32 model it saved at the end
        assert [e["step"] for e in record["log"]] == list(range(1, row["steps"] + 1))
        last = nxtp_minimal.load(work / row["name"] / "demo.safetensors", tokenizer)
        predicted, reference = evaluate.predict_scenes(last, evaluate.HELD_OUT_SEED, record["log"][-1]["scenes"])
        recall = sum(map(evaluate.top_n_recall, predicted, reference)) / len(reference)
        assert record["log"][-1]["held_out_top_n_recall"] == pytest.approx(recall, abs=5e-5)
    seed0, seed1 = (nxtp_minimal.load(p, tokenizer).state_dict() for p in
                    (out / "cut_3steps.safetensors", work / "cut_3steps_seed1" / "float16.safetensors"))
    assert any(not seed0[k].equal(seed1[k]) for k in seed0)  # another seed: other scenes and label orders
    # run again: what is stored with its row is kept, nothing is trained twice
    monkeypatch.setattr(ablations, "train_run", lambda *a: pytest.fail("trained a run that was already stored"))
    ablations.main(argv)
    assert json.loads((out / "results.json").read_text()) == rows


def test_plan_names_every_run_once():
    names = [run.name for experiment, seeds, steps in SHIPPED for run in ablations.plan(experiment, seeds, steps)]
    assert len(names) == len(set(names))
    assert [r.name for r in ablations.plan("depth", 2)][-2:] == ["depth1_truncated_seed1", "depth1_scratch_seed1"]
    short = ablations.plan("mask", 1, 200)
    assert [(r.name, r.steps, r.warmup) for r in short] == [("mask_label_200steps", 200, 20), ("mask_causal_200steps", 200, 20)]


def test_shipped_results_describe_the_shipped_files():
    if not (ABLATIONS / "results.json").is_file():
        pytest.skip("weights/ablations/results.json is not there yet: python -m nxtp_minimal ablate mask|depth")
    rows = json.loads((ABLATIONS / "results.json").read_text())
    expected = {run.name for experiment, seeds, steps in SHIPPED for run in ablations.plan(experiment, seeds, steps)}
    assert {r["name"] for r in rows} == expected
    tokenizer = nxtp_minimal.load_demo().tokenizer
    for row in rows:
        assert set(row) == KEYS
        weights, record = ABLATIONS / f"{row['name']}.safetensors", ABLATIONS / f"{row['name']}.json"
        assert weights.is_file() == (row["seed"] == 0)
        if weights.is_file():
            assert nxtp_minimal.load(weights, tokenizer).config.language.n_layers == row["blocks"]
        if record.is_file():  # every run since the runs have kept their logs
            record = json.loads(record.read_text())
            assert len(record["per_scene_top_n_recall"]) == 500
            assert sum(record["per_scene_top_n_recall"]) / 500 == pytest.approx(row["top_n_recall"], abs=1e-5)
            assert record["log"][-1]["step"] == row["steps"] == record["steps"]
        else:
            assert row["seed"] == 0
    assert sum(f.stat().st_size for f in (REPO / "weights").rglob("*") if f.is_file()) < 40 * 2**20
