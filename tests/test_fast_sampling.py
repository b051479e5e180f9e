"""The cached sampler gives the official loop's answers: same labels, scores within 1e-5."""

import pytest
import torch

import nxtp_minimal
from conftest import FIXTURES, fixture_tensors
from nxtp_minimal import sampling

T = fixture_tensors("tiny_nxtp_cases.safetensors")
PROMPT = [32000, 1, 450, 3618, 297, 278, 1967, 526]
DELIMITER = 29892
INPUTS = {
    "image0": T["image0.pixels"],
    "image1": T["image1.pixels"],
    "batched": torch.cat([T["image0.pixels"], T["image1.pixels"]]),
}


@pytest.fixture(scope="module")
def model(device):
    return nxtp_minimal.load(FIXTURES / "tiny_nxtp.safetensors", device=device)


def labels(model, pixels, k, fast):
    tokens, probs, _ = model.sample(pixels, k, PROMPT, DELIMITER, fast=fast)
    return [dict((tuple(ids), s) for ids, s in sampling.branch_labels(t, p, DELIMITER)) for t, p in zip(tokens, probs)]


@pytest.mark.parametrize("k", [1, 5, 10, 50])
@pytest.mark.parametrize("name", INPUTS)
def test_fast_equals_reference(model, name, k):
    reference = labels(model, INPUTS[name], k, fast=False)
    fast = labels(model, INPUTS[name], k, fast=True)
    for ref, got in zip(reference, fast):
        assert got.keys() == ref.keys()
        for ids in ref:
            assert got[ids] == pytest.approx(ref[ids], abs=1e-5)


def test_fast_predict_equals_reference_text(llama_tokenizer):
    model = nxtp_minimal.load(FIXTURES / "tiny_nxtp.safetensors", tokenizer=llama_tokenizer)
    images = [FIXTURES / "tiny_nxtp_image0.png", FIXTURES / "tiny_nxtp_image1.png"]
    for fast, ref in zip(model.predict(images, k=10), model.predict(images, k=10, fast=False)):
        assert [lab for lab, _ in fast] == [lab for lab, _ in ref]
        assert [p for _, p in fast] == pytest.approx([p for _, p in ref], abs=1e-5)


def test_finished_branches_leave_the_batch(model):
    first, step = model.start_sampling(INPUTS["image1"], 5, PROMPT, fast=True)
    sizes = []

    def counting_step(tokens, live):
        sizes.append(int(live.sum()))
        return step(tokens, live)

    sampling.one_shot(first, counting_step, 5, DELIMITER)
    assert sizes[0] == 5 and sizes[-1] < 5 and sizes == sorted(sizes, reverse=True)
