"""The training text, targets and loss equal the official ones (train_case.safetensors, cases.json `train`)."""

import pytest
import torch

import nxtp_minimal
from conftest import FIXTURES, fixture_tensors
from nxtp_minimal import prompt

T = fixture_tensors("train_case.safetensors")


def test_training_tokens_and_targets(llama_tokenizer, cases):
    train = cases["train"]
    tokens, targets = prompt.training_batch(
        llama_tokenizer, "The objects in the image are", train["label_lists_in_shuffled_order"],
        train["n_image_tokens"], train["max_seq_len"],
    )
    assert torch.equal(tokens, T["tokens_objs"])
    assert torch.equal(targets, T["target_objs"])
    for row, text in zip(tokens, train["text"]):
        assert llama_tokenizer.decode([i for i in row.tolist() if i >= 0]) == text


def test_loss_equals_official(llama_tokenizer, cases):
    model = nxtp_minimal.load(FIXTURES / "tiny_nxtp.safetensors", tokenizer=llama_tokenizer)
    with torch.no_grad():
        loss = model.loss(T["pixels"], cases["train"]["label_lists_in_shuffled_order"])
    assert loss.item() == pytest.approx(cases["train"]["loss"], rel=1e-5)


def test_loss_rejects_empty_labels(llama_tokenizer):
    model = nxtp_minimal.load(FIXTURES / "tiny_nxtp.safetensors", tokenizer=llama_tokenizer)
    with pytest.raises(ValueError, match="at least one label"):
        model.loss(T["pixels"], [["dog"], []])
    with pytest.raises(ValueError, match="2 images but 1 label lists"):
        model.loss(T["pixels"], [["dog"]])
    with pytest.raises(ValueError, match="holds the delimiter"):
        model.loss(T["pixels"], [["dog, cat"], ["cup"]])
