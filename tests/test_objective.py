"""The training text, targets and loss equal the official ones (train_case.safetensors, cases.json `train`)."""

import pytest
import torch
import torch.nn.functional as F

import nxtp_minimal
from conftest import FIXTURES, fixture_tensors
from nxtp_minimal import masks, prompt
from nxtp_minimal.config import PROMPTS

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


def official_text_inputs(tokenizer, template, label_lists, offset, max_seq_len):
    """kaiyuyue/nxtp src/encoding.py construct_text_inputs for the object text in training, written again
    from the official code as the reference: encode, cut, pad with -1, put <|image|> in column 0 and bos in
    column 1, targets shifted by one from the <|image|> position on, eos targets ignored."""
    length = max_seq_len - offset
    texts = ["<|image|>" + template + " " + ", ".join(label.lower() for label in labels) for labels in label_lists]
    encoded = [tokenizer.encode(text, bos=True, eos=True)[:length] for text in texts]
    tokens = torch.full((len(texts), length), tokenizer.pad_id, dtype=torch.long)
    for k, ids in enumerate(encoded):
        tokens[k, : len(ids)] = torch.tensor(ids)
    tokens[:, 1] = tokenizer.bos_id
    tokens[:, 0] = tokenizer.encode("<|image|>")[0]
    targets = torch.full((len(texts), max_seq_len), tokenizer.pad_id, dtype=torch.long)
    for k, row in enumerate(tokens):
        targets[k, offset + 1 : offset + len(row)] = row[1:]
    targets[targets == tokenizer.eos_id] = tokenizer.pad_id
    return tokens, targets


@pytest.mark.parametrize("template", PROMPTS)
def test_every_template_has_the_official_layout(llama_tokenizer, template):
    labels = [["hot dog", "Cat"], ["traffic light"], ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]]
    n_image, max_seq_len = 16, 48  # the last list is cut by max_seq_len, as officially
    tokens, targets = prompt.training_batch(llama_tokenizer, template, labels, n_image, max_seq_len)
    expected_tokens, expected_targets = official_text_inputs(llama_tokenizer, template, labels, n_image, max_seq_len)
    assert torch.equal(tokens, expected_tokens) and torch.equal(targets, expected_targets)
    # every template ends with the answer piece: the label mask starts there
    answer = (tokens[0] == llama_tokenizer.answer_id).nonzero()[0, 0]
    assert llama_tokenizer.decode(tokens[0, 2 : answer + 1].tolist()) == template


def test_causal_mask_objective_is_plain_language_modelling(llama_tokenizer, cases):
    model = nxtp_minimal.load(FIXTURES / "tiny_nxtp.safetensors", tokenizer=llama_tokenizer)
    n_image = cases["train"]["n_image_tokens"]
    with torch.no_grad():
        x = torch.cat([model.image_tokens(T["pixels"]), model.language_decoder.tok_embeddings(T["tokens_objs"] % 32002)], 1)
        logits = model.language_decoder(x, masks.prefix_mask(x.shape[1], n_image))
        by_hand = F.cross_entropy(logits[:, :-1].flatten(0, 1), T["target_objs"][:, 1:].flatten(), ignore_index=-1)
        causal = model.loss(T["pixels"], cases["train"]["label_lists_in_shuffled_order"], mask="causal")
    assert causal.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert causal.item() != pytest.approx(cases["train"]["loss"], rel=1e-5)  # the label mask is another objective
