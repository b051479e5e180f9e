"""Attention maps against references.

- `Decoder.blocks(..., need_weights=True)` returns the probabilities Hugging Face's eager LLaMA attention returns
  (`output_attentions=True`) on the same weights, under a causal and a prefix mask, and changes no logit.
- `NXTP.attention_maps` (key/value cache, labels fed as branches) equals one uncached pass over image
  tokens + prompt + label under `masks.prefix_mask`: the last label token's row, image columns, renormalised.
- `NXTP.label_maps` of `sample(..., attention=True)` equals `attention_maps` for the sampled labels.
- `scenes.scene_boxes` bounds the pixels that change when each object is pasted into the scene.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from test_convert import DIM, HEADS, HIDDEN, VOCAB, meta_from_hf, perturb

import nxtp_minimal
from nxtp_minimal import inference, masks
from nxtp_minimal.config import LanguageConfig
from nxtp_minimal.llama import Decoder
from nxtp_minimal.training import scenes
from nxtp_minimal.training.evaluate import HELD_OUT_SEED

SCENES = (0, 7, 1043)  # held-out scenes with 1, 3 and 4 objects, one- and two-word labels


@pytest.fixture(scope="module")
def hf_and_ours():
    """A random 3-block HF LLaMA with eager attention, and our decoder holding the same weights."""
    transformers = pytest.importorskip("transformers", reason="the reference: pip install -r requirements-dev.txt")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    perturb(hf, 5)
    ours = Decoder(LanguageConfig(dim=DIM, n_layers=3, n_heads=HEADS, multiple_of=32, vocab_size=VOCAB, max_seq_len=64))
    ours.load_state_dict(meta_from_hf(hf.state_dict(), HEADS))
    return hf, ours.eval()


@pytest.mark.parametrize("mask", ["causal", "prefix"])
def test_recorded_attention_equals_hf_eager(hf_and_ours, mask):
    hf, ours = hf_and_ours
    S, n_image = 14, 6
    ids = torch.randint(0, VOCAB, (2, S), generator=torch.Generator().manual_seed(6))
    allowed = masks.causal_mask(S) if mask == "causal" else masks.prefix_mask(S, n_image)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))  # the 4-D mask HF takes
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=additive.expand(2, 1, S, S), output_attentions=True)
        h, record = ours.blocks(ours.tok_embeddings(ids), torch.arange(S), allowed, need_weights=True)
        logits = ours.output(h)
        plain = ours(ids, allowed)
    assert len(record) == len(expected.attentions) == 3
    for got, want in zip(record, expected.attentions):  # [B, H, S, S] per block
        assert got.shape == want.shape == (2, HEADS, S, S)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if mask == "prefix":  # HF used our mask, not its own causal one: the first patch sees the last
        assert (expected.attentions[0][:, :, 0, n_image - 1] > 0).all()
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def demo(device):
    return nxtp_minimal.load_demo(device=device)


def uncached_maps(model, image, label):
    """The whole sequence in one pass, no cache: the label's last token's attention to the patches [blocks, H, g, g]."""
    n_image, grid = model.config.vision.n_patches, model.config.vision.grid
    ids = torch.tensor([model.tokenizer.encode(label)], device=model.device)
    x = model.prefix(inference.pixels(model, image), model.prompt_ids())
    seq = torch.cat([x, model.language_decoder.tok_embeddings(ids)], dim=1)
    positions = torch.arange(seq.shape[1], device=seq.device)
    with torch.inference_mode():
        _, record = model.language_decoder.blocks(seq, positions, masks.prefix_mask(seq.shape[1], n_image),
                                                  need_weights=True)
    row = torch.stack(record)[:, 0, :, -1, :n_image]  # [blocks, H, n_image]
    return (row / row.sum(-1, keepdim=True)).unflatten(-1, (grid, grid)).cpu()


@pytest.mark.parametrize("index", SCENES)
def test_attention_maps_equal_the_uncached_pass(demo, index):
    image, drawn = scenes.scene(HELD_OUT_SEED, index)
    labels = drawn + [next(label for label in scenes.LABELS if label not in drawn)]  # and one not drawn
    maps = inference.attention_maps(demo, image, labels + labels[:1])  # a repeated label is answered once
    assert list(maps) == labels
    language, grid = demo.config.language, demo.config.vision.grid
    shape = (language.n_layers, language.n_heads, grid, grid)
    for label in labels:
        assert maps[label].shape == shape and maps[label].device.type == "cpu"
        torch.testing.assert_close(maps[label].sum((-2, -1)), torch.ones(shape[:2]), rtol=0, atol=1e-5)
        torch.testing.assert_close(maps[label], uncached_maps(demo, image, label), rtol=0, atol=1e-5)


def test_label_maps_of_sampled_labels_equal_attention_maps(demo):
    images = [scenes.scene(HELD_OUT_SEED, i)[0] for i in SCENES]
    pixels = inference.pixels(demo, images)
    tokens, probs, first, attention = inference.sample(demo, pixels, 5, attention=True)
    plain = inference.sample(demo, pixels, 5)
    assert torch.equal(tokens, plain[0])  # recording the attention changes no choice, and no probability
    torch.testing.assert_close(probs, plain[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(first, plain[2], rtol=0, atol=1e-5)
    for b, image in enumerate(images):
        maps = inference.label_maps(demo, tokens[b], probs[b], attention[b])
        assert set(maps) == {label for label, _ in inference.rank(demo, tokens[b], probs[b])}
        expected = inference.attention_maps(demo, image, list(maps))
        for label in maps:
            torch.testing.assert_close(maps[label].cpu(), expected[label], rtol=0, atol=1e-5)


def test_bad_input_raises_a_clear_error(demo):
    image, _ = scenes.scene(HELD_OUT_SEED, 0)
    with pytest.raises(ValueError, match="at least one non-empty label"):
        inference.attention_maps(demo, image, [])
    with pytest.raises(ValueError, match="at least one non-empty label"):
        inference.attention_maps(demo, image, ["fish", " "])
    with pytest.raises(ValueError, match="takes one image, got 2"):
        inference.attention_maps(demo, [image, image], ["fish"])


def test_scene_boxes_bound_the_pixels_each_object_changes(monkeypatch):
    """Record the scene before and after each object is pasted; the box must hold every changed pixel, tightly."""
    pasted, paste = [], Image.Image.paste

    def recording_paste(self, im, box=None, mask=None):
        before = self.copy()
        paste(self, im, box, mask)
        if box is not None:  # objects are pasted at a position; the background blend is not
            pasted.append((before, self.copy()))

    monkeypatch.setattr(Image.Image, "paste", recording_paste)
    sides = []
    for index in range(60):
        pasted.clear()
        boxes = scenes.scene_boxes(HELD_OUT_SEED, index)
        assert len(pasted) == len(boxes)
        for (before, after), (x0, y0, x1, y1) in zip(pasted, boxes):
            before, after = (np.asarray(im.reduce(scenes.SUPERSAMPLE)) for im in (before, after))  # at 64 px
            changed = np.any(before != after, axis=-1)
            ys, xs = np.nonzero(changed)
            assert 0 <= x0 <= xs.min() and xs.max() < x1 <= 64 and 0 <= y0 <= ys.min() and ys.max() < y1 <= 64
            # a side may exceed the changed pixels only where the object's faintest edge rounded away
            sides += [xs.min() - x0, ys.min() - y0, x1 - 1 - xs.max(), y1 - 1 - ys.max()]
        final = np.asarray(pasted[-1][1].reduce(scenes.SUPERSAMPLE))
        assert np.array_equal(final, np.asarray(scenes.scene(HELD_OUT_SEED, index)[0]))  # the scene we watched
    assert max(sides) <= 2 and np.mean(np.array(sides) == 0) > 0.9
