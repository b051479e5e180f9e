"""Attention masks equal the official ones exactly (same 0 / -inf pattern)."""

import json

import torch
from safetensors import safe_open

from conftest import FIXTURES, fixture_tensors
from nxtp_minimal import masks

L = fixture_tensors("llama.safetensors")
with safe_open(FIXTURES / "llama.safetensors", "pt") as _f:
    META = json.loads(_f.metadata()["meta"])
DELIMITER, ANSWER = META["delimiter_id"], META["answer_id"]


def test_causal_mask():
    assert torch.equal(masks.causal_mask(L["causal.mask"].shape[-1]), L["causal.mask"])


def test_prefix_mask():
    S = L["prefix.mask"].shape[-1]
    assert torch.equal(masks.prefix_mask(S, META["n_image_tokens"]), L["prefix.mask"])


def test_label_mask_llama_case():
    got = masks.label_mask(L["train.input_tokens"], META["n_image_tokens"], ANSWER, DELIMITER)
    assert torch.equal(got, L["train.mask"])


def test_label_mask_train_case(cases):
    t = fixture_tensors("train_case.safetensors")
    got = masks.label_mask(t["input_tokens_objs"], cases["train"]["n_image_tokens"], ANSWER, DELIMITER)
    assert torch.equal(got, t["mask"])


def test_label_mask_without_labels_is_the_prefix_mask():
    # at inference the prompt holds no delimiter: the training mask reduces to the prefix mask
    tokens = torch.tensor([[-1, -1, -1, 32000, 1, 450, 526]])
    assert torch.equal(masks.label_mask(tokens, 3, ANSWER, DELIMITER)[:, :, :6, :6], masks.prefix_mask(6, 3))
