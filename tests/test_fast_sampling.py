"""The cached sampler gives the official loop's answers: same labels, scores within 1e-5."""

import pytest
import torch
from conftest import FIXTURES, fixture_tensors

import nxtp_minimal
from nxtp_minimal import cache, inference, masks, sampling

T = fixture_tensors("tiny_nxtp_cases.safetensors")
PROMPT = [32000, 1, 450, 3618, 297, 278, 1967, 526]
DELIMITER = 29892
P0, P1 = T["image0.pixels"], T["image1.pixels"]
INPUTS = {
    "image0": P0,
    "image1": P1,
    "batch2": torch.cat([P0, P1]),
    # eight different images: the fixture pair, flipped, transposed and mixed
    "batch8": torch.cat([P0, P1, P0.flip(-1), P1.flip(-1), P0.flip(-2), P1.transpose(-1, -2), (P0 + P1) / 2, P1 - P0]),
}


@pytest.fixture(scope="module")
def model(device):
    return nxtp_minimal.load(FIXTURES / "tiny_nxtp.safetensors", device=device)


def labels(model, pixels, k, fast, decode="dynamic"):
    tokens, probs, _ = inference.sample(model, pixels, k, PROMPT, DELIMITER, fast=fast, decode=decode)
    return [dict((tuple(ids), s) for ids, s in sampling.branch_labels(t, p, DELIMITER)) for t, p in zip(tokens, probs)]


@pytest.mark.parametrize("decode", ["dynamic", "static"])
@pytest.mark.parametrize("k", [1, 5, 10, 50])
@pytest.mark.parametrize("name", INPUTS)
def test_fast_equals_reference(model, name, k, decode):
    reference = labels(model, INPUTS[name], k, fast=False)
    fast = labels(model, INPUTS[name], k, fast=True, decode=decode)
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
    # per image, a step feeds as many rows as that batch's busiest image has live branches
    sampler = model.sampler(INPUTS["batch2"], 5, PROMPT)
    fed, append = [], sampler.engine.append

    def counting_append(tokens, position, mask, columns):
        fed.append(tokens.shape)
        return append(tokens, position, mask, columns)

    sampler.engine.append = counting_append
    lives = []

    def step(tokens, live):
        lives.append(int(live.view(2, 5).sum(dim=1).max()))
        return sampler.step(tokens, live)

    sampling.one_shot(sampler.first, step, 5, DELIMITER)
    assert [tuple(s) for s in fed] == [(2, m) for m in lives]
    assert lives[0] == 5 and lives[-1] < 5 and lives == sorted(lives, reverse=True)


def test_step_mask_sees_prefix_and_own_slots():
    live = torch.tensor([[True, False, True], [False, False, True]])
    rows, columns, mask = cache.plan_step(live, t=2, L=4, T=3)
    assert rows.tolist() == [[0, 2], [2, 0]]  # live branches first; image 1 pads with finished branch 0
    assert columns.tolist() == [[4 + 0 + 1, 4 + 6 + 1], [4 + 6 + 1, 4 + 0 + 1]]
    for b in range(2):
        for j, branch in enumerate(rows[b].tolist()):
            seen = mask[b, 0, j].nonzero()[:, 0].tolist()
            assert seen == [0, 1, 2, 3, 4 + 3 * branch, 4 + 3 * branch + 1]  # prefix + its first t slots


def static_run(model, sampler, pixels, k):
    x = model.prefix(pixels, PROMPT)
    sampler.prefill(x, masks.prefix_mask(x.shape[1], model.config.vision.n_patches, x.device))
    return sampling.one_shot_fixed(sampler.first, sampler.step, k, DELIMITER)


def test_static_step_compiles_whole_and_matches_eager(model):
    # fullgraph=True refuses any graph break, a value read back to the host included: what compiles whole
    # can be captured as one CUDA graph
    pixels, k = INPUTS["batch2"], 5
    shape = (2, model.config.vision.n_patches + len(PROMPT), k, sampling.MAX_TOKENS - 1, model.device, model.dtype)
    with torch.inference_mode():
        eager = static_run(model, cache.StaticSampler(model.language_decoder, *shape), pixels, k)
        compiled = static_run(model, cache.StaticSampler(model.language_decoder, *shape).compile(), pixels, k)
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=1e-5)


def test_static_step_reads_nothing_back(model, monkeypatch):
    # a step never asks a tensor for a Python value (.item(), int(), bool(), .tolist()), so it never waits
    pixels, k = INPUTS["image0"], 3
    sampler = model.static_sampler(pixels, k, PROMPT, capture=False)
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    newest = sampler.first.topk(k).indices
    for t in (1, 2, 3):
        sampler.step(newest, t)
    monkeypatch.undo()
    assert reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run pytest --device cuda on a GPU")
def test_captured_step_never_synchronises(device):
    if not device.startswith("cuda"):
        pytest.skip("run with pytest --device cuda")
    model = nxtp_minimal.load(FIXTURES / "tiny_nxtp.safetensors", device=device)
    pixels, k = INPUTS["batch2"].to(device), 5
    sampler = model.static_sampler(pixels, k, PROMPT, capture=True)
    newest = sampler.first.topk(k).indices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(1, 5):
            logits = sampler.step(newest, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert logits.shape == (2, k, model.config.language.vocab_size)
    for static, dynamic in zip(labels(model, pixels, k, True, "static"), labels(model, pixels, k, True, "dynamic")):
        assert static.keys() == dynamic.keys()
