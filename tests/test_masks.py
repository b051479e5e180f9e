"""Attention masks equal the official ones exactly: True (may attend) exactly where the official additive
mask holds 0, False where it holds -inf."""

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
    assert torch.equal(masks.causal_mask(L["causal.mask"].shape[-1]), L["causal.mask"] == 0)


def test_prefix_mask():
    S = L["prefix.mask"].shape[-1]
    assert torch.equal(masks.prefix_mask(S, META["n_image_tokens"]), L["prefix.mask"] == 0)


def test_label_mask_llama_case():
    got = masks.label_mask(L["train.input_tokens"], META["n_image_tokens"], ANSWER, DELIMITER)
    assert torch.equal(got, L["train.mask"] == 0)


def test_label_mask_train_case(cases):
    t = fixture_tensors("train_case.safetensors")
    got = masks.label_mask(t["input_tokens_objs"], cases["train"]["n_image_tokens"], ANSWER, DELIMITER)
    assert torch.equal(got, t["mask"] == 0)


def test_label_mask_without_labels_is_the_prefix_mask():
    # at inference the prompt holds no delimiter: the training mask reduces to the prefix mask
    tokens = torch.tensor([[-1, -1, -1, 32000, 1, 450, 526]])
    assert torch.equal(masks.label_mask(tokens, 3, ANSWER, DELIMITER)[:, :, :6, :6], masks.prefix_mask(6, 3))


def official_label_mask(input_tokens, n_image, answer_id, delimiter_id):
    """kaiyuyue/nxtp src/models/lang.py Transformer.forward (training, decoupled labels), written again from
    the official code as the reference: the answer index comes from the batch's last row."""
    B, S = input_tokens.shape
    mask = torch.full((B, 1, S, S), float("-inf")).triu(1)
    mask[:, :, :n_image, :n_image] = 0.0
    answer = int(torch.nonzero(input_tokens[-1] == answer_id)[0][0])
    mask[:, :, :, answer + 1 :] = float("-inf")
    previous_row, previous = 0, answer
    for row, index in torch.nonzero(input_tokens == delimiter_id).tolist():
        index += 1
        if row != previous_row:
            previous_row, previous = row, answer
        size = index - previous
        tri = previous + torch.tril_indices(size, size)
        mask[row, 0, tri[0], tri[1]] = 0.0
        previous = index
    return mask


def test_label_mask_with_mixed_templates_takes_the_last_rows_answer(llama_tokenizer):
    # rows with longer prompts than the last row's: their answer boundary is the last row's (official quirk)
    from nxtp_minimal.config import PROMPTS
    from nxtp_minimal.prompt import training_batch

    n_image, templates = 4, [PROMPTS[5], PROMPTS[2], PROMPTS[0]]
    labels = [["hot dog", "cat"], ["tree", "traffic light", "sun"], ["cup", "bird"]]
    tokens, _ = training_batch(llama_tokenizer, templates, labels, n_image, 40)
    input_tokens = torch.cat([tokens.new_full((3, n_image), -1), tokens], dim=1)
    got = masks.label_mask(input_tokens, n_image, llama_tokenizer.answer_id, llama_tokenizer.delimiter_id)
    assert torch.equal(got, official_label_mask(input_tokens, n_image, ANSWER, DELIMITER) == 0)
    # the quirk matters for this batch: alone, the first row would get another mask
    alone = masks.label_mask(input_tokens[:1], n_image, ANSWER, DELIMITER)
    assert not torch.equal(got[:1], alone)


def test_label_mask_equals_the_official_loop_on_random_batches():
    # the segment-id construction against the official row-by-row loop, on batches with any number of
    # labels, delimiters anywhere after the answer, padding and rows of every length
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        B, S, n_image = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(6, 24, (1,), generator=g)), 3
        tokens = torch.randint(1, 6, (B, S), generator=g)
        tokens[tokens == 5] = DELIMITER
        tokens[:, :n_image] = -1
        tokens[:, n_image : n_image + 2] = 7  # a prompt without the answer or a delimiter
        tokens[-1, n_image + 2] = ANSWER
        tokens[:-1, n_image + 2] = torch.where(torch.rand(B - 1, generator=g) < 0.5, ANSWER, 7)
        expected = official_label_mask(tokens, n_image, ANSWER, DELIMITER) == 0
        assert torch.equal(masks.label_mask(tokens, n_image, ANSWER, DELIMITER), expected)
