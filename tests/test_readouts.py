"""The read-outs of `training.readouts` against independent computations on small cases.

- first / last / delimiter rows: one uncached pass of one label alone through `Decoder.blocks(need_weights=True)`,
  ending at that row; the last row also against `inference.attention_maps` (the key/value cache);
- the gradient of the label's log-probability with respect to the attention: a forward written out here, which
  adds a zero tensor to each block's probabilities and differentiates with respect to it, one label at a time;
  and central finite differences in float64 on the largest entries;
- gradient-weighted attention: Chefer's rule written as a loop over labels and blocks;
- contrastive maps: map minus the mean of the other labels' maps, by hand;
- the score: hand-made peaks and boxes, and maps that do not depend on the label score named = other.
"""

import math

import pytest
import torch

import nxtp_minimal
from nxtp_minimal import inference, masks, sampling
from nxtp_minimal.training import readouts, scenes
from nxtp_minimal.training.evaluate import HELD_OUT_SEED

INDEX = 1043  # a held-out scene with four objects, two of them with two-token names ("traffic cone", "hot dog")


@pytest.fixture(scope="module")
def demo():
    return nxtp_minimal.load_demo()


@pytest.fixture(scope="module")
def scene_record(demo):
    image, labels = scenes.scene(HELD_OUT_SEED, INDEX)
    one, _ = scenes.scene(HELD_OUT_SEED, 0)
    pixels = inference.pixels(demo, [image, one])
    return image, labels, readouts.record(demo, pixels, [labels, ["fish", "sun"]])


def single_pass(model, image, ids):
    """The whole sequence image + prompt + ids, without a cache, one label alone: the attention rows
    [blocks, H, keys] of its last position."""
    P = model.config.vision.n_patches
    x = model.prefix(inference.pixels(model, image), model.prompt_ids())
    seq = torch.cat([x, model.language_decoder.tok_embeddings(torch.tensor([ids]))], dim=1)
    S = seq.shape[1]
    with torch.inference_mode():
        _, probs = model.language_decoder.blocks(seq, torch.arange(S), masks.prefix_mask(S, P), need_weights=True)
    return torch.stack(probs)[:, 0, :, -1]


def test_rows_equal_one_uncached_pass_of_the_label_alone(demo, scene_record):
    image, labels, rec = scene_record
    P, tok = demo.config.vision.n_patches, demo.tokenizer
    cached = inference.attention_maps(demo, image, labels)
    maps = {which: readouts.attention_maps(rec, which) for which in readouts.ROWS}
    assert maps["last"].shape == (len(labels) + 2, 2, 4, P)
    for i, label in enumerate(labels):
        ids = tok.encode(label)
        # each pass ends at the row read: the label cut after its first token, the label, the label + delimiter
        for which, fed in (("first", ids[:1]), ("last", ids), ("delimiter", ids + [tok.delimiter_id])):
            row = single_pass(demo, image, fed)[..., :P]
            expected = row / row.sum(-1, keepdim=True)
            torch.testing.assert_close(maps[which][i], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(maps["last"][i], cached[label].flatten(-2), rtol=0, atol=1e-5)
    two_tokens = [i for i, label in enumerate(labels) if len(tok.encode(label)) == 2]
    assert two_tokens and all(not torch.allclose(maps["first"][i], maps["last"][i]) for i in two_tokens)
    assert rec.image_of.tolist() == [0] * len(labels) + [1, 1]


def rms_norm(norm, x):
    return x * (x.pow(2).mean(-1, keepdim=True) + norm.eps).rsqrt() * norm.weight


def rope(x, theta: float):
    """Meta's rotary embedding in float64: pairs (x0, x1), (x2, x3), ... of each head turned by position."""
    S, hd = x.shape[1], x.shape[-1]
    angle = torch.arange(S, dtype=torch.float64)[:, None] / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # [S, 1, hd / 2]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def written_out_logp(model, x, ids, delta):
    """The decoder written out here in float64 for one row x [1, S, D]: each block adds delta[b] [1, H, S, S] to
    its attention probabilities; returns the log-probability of the label ids followed by the delimiter."""
    d, P = model.language_decoder, model.config.vision.n_patches
    S, H = x.shape[1], d.config.n_heads
    hd = d.config.dim // H
    blocked = ~masks.prefix_mask(S, P)[0, 0]
    h = x
    for layer, extra in zip(d.layers, delta):
        a, y = layer.attention, rms_norm(layer.attention_norm, h)
        q, k, v = (w(y).view(1, S, H, hd) for w in (a.wq, a.wk, a.wv))
        q, k = rope(q, d.config.rope_theta).transpose(1, 2), rope(k, d.config.rope_theta).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(blocked, float("-inf"))
        probs = scores.softmax(-1) + extra
        h = h + a.wo((probs @ v.transpose(1, 2)).transpose(1, 2).reshape(1, S, -1))
        h = h + layer.feed_forward(rms_norm(layer.ffn_norm, h))
    logits = d.output(rms_norm(d.norm, h))[0]
    targets = ids + [model.tokenizer.delimiter_id]
    L = S - len(targets)
    return sum(logits[L - 1 + t].log_softmax(-1)[token] for t, token in enumerate(targets))


def test_gradient_equals_autograd_of_a_forward_written_out_and_finite_differences():
    model = nxtp_minimal.load_demo(dtype=torch.float64)
    image, labels = scenes.scene(HELD_OUT_SEED, INDEX)
    labels = labels[:3]
    rec = readouts.record(model, inference.pixels(model, image), [labels])
    prefix = model.prefix(inference.pixels(model, image), model.prompt_ids()).detach()
    for i, label in enumerate(labels):
        ids = model.tokenizer.encode(label)
        x = torch.cat([prefix, model.language_decoder.tok_embeddings(torch.tensor([ids + [model.tokenizer.delimiter_id]]))],
                      dim=1).detach()
        S, H = x.shape[1], model.config.language.n_heads
        delta = [torch.zeros(1, H, S, S, dtype=torch.float64, requires_grad=True) for _ in model.language_decoder.layers]
        logp = written_out_logp(model, x, ids, delta)
        expected = torch.autograd.grad(logp, delta)
        for b, g in enumerate(expected):
            torch.testing.assert_close(rec.gradient[b][i, :, :S, :S], g[0].float(), rtol=1e-4, atol=1e-5)
            assert not rec.gradient[b][i, :, S:].any()  # padding rows carry nothing
        # central differences on the three largest entries of every block
        with torch.no_grad():
            for b, g in enumerate(expected):
                for flat in g.abs().flatten().topk(3).indices:
                    bump = [torch.zeros(1, H, S, S, dtype=torch.float64) for _ in delta]
                    bump[b].view(-1)[flat] = 1e-6
                    plus = written_out_logp(model, x, ids, bump)
                    minus = written_out_logp(model, x, ids, [-t for t in bump])
                    assert (plus - minus).item() / 2e-6 == pytest.approx(g.view(-1)[flat].item(), rel=1e-5, abs=1e-7)


def test_gradient_weighted_equals_chefers_rule_written_as_a_loop(scene_record):
    _, _, rec = scene_record
    rolled, summed = readouts.gradient_weighted(rec), readouts.gradient_weighted(rec, rollout=False)
    S, P = rec.attention[0].shape[-1], rec.n_image
    for i in range(len(rec.lengths)):
        R, total = torch.eye(S), torch.zeros(S, S)
        for a, g in zip(rec.attention, rec.gradient):
            bar = torch.stack([torch.clamp(a[i, h] * g[i, h], min=0) for h in range(a.shape[1])]).mean(0)
            R = R + bar @ R
            total = total + bar
        rows = range(rec.prefix - 1, rec.prefix + int(rec.lengths[i]))  # the answer row .. the label's last token
        torch.testing.assert_close(rolled[i], sum(R[r, :P] for r in rows), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(summed[i], sum(total[r, :P] for r in rows), rtol=1e-5, atol=1e-7)
        assert (rolled[i] >= 0).all() and rolled[i].sum() > 0


def test_contrastive_is_the_map_minus_the_mean_of_the_other_labels_maps():
    maps = torch.rand(6, 5)
    image_of = torch.tensor([0, 0, 0, 1, 2, 2])
    out = readouts.contrastive(maps, image_of)
    torch.testing.assert_close(out[0], maps[0] - (maps[1] + maps[2]) / 2)
    torch.testing.assert_close(out[2], maps[2] - (maps[0] + maps[1]) / 2)
    torch.testing.assert_close(out[3], maps[3])  # alone in its image
    torch.testing.assert_close(out[4], maps[4] - maps[5])


def test_named_vs_other_on_hand_made_peaks():
    # image 0: labels 0, 1; image 1: one label (not scored); image 2: labels 3, 4, 5. Four patches.
    inside = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]).bool()
    peaks = [0, 1, 3, 0, 0, 2]  # label 0 in its box; label 1 in both boxes; label 3 own; 4 in 3's; 5 own
    maps = torch.nn.functional.one_hot(torch.tensor(peaks), 4).float()
    named, other = readouts.named_vs_other(maps, inside, torch.tensor([0, 0, 1, 2, 2, 2]))
    assert named == pytest.approx([1.0, 2 / 3])
    # image 0: (0 in 1's box: no), (1 in 0's box: yes) -> 1/2; image 2: only (4 in 3's box) of 6 pairs
    assert other == pytest.approx([1 / 2, 1 / 6])


def test_a_map_that_ignores_the_label_scores_named_equal_other():
    torch.manual_seed(0)
    image_of = torch.arange(40).repeat_interleave(3)
    maps = torch.rand(40, 16).repeat_interleave(3, dim=0)  # the three labels of an image share one map
    inside = torch.rand(120, 16) < 0.3
    named, other = readouts.named_vs_other(maps, inside, image_of)
    assert named == pytest.approx(other)


def test_best_head_finds_the_planted_head():
    torch.manual_seed(0)
    N, P = 60, 9
    image_of = torch.arange(30).repeat_interleave(2)
    inside = torch.zeros(N, P, dtype=torch.bool)
    inside[torch.arange(N), torch.randint(0, P, (N,))] = True
    maps = torch.rand(N, 3, 4, P)
    maps[:, 1, 2] = inside.float() + 0.01 * torch.rand(N, P)  # block 1, head 2 peaks in the named box
    assert readouts.best_head(maps, inside, image_of) == (1, 2)


def test_compare_on_a_few_scenes(demo):
    out = readouts.compare(demo, scored=range(6), selection=range(6, 12))
    assert "last token (today)" in out and any(k.startswith("best head") for k in out)
    for r in out.values():
        assert r["scenes"] == len(r["per_scene_named"]) >= 2
        assert r["named"] == pytest.approx(sum(r["per_scene_named"]) / r["scenes"])
        assert r["difference"] == pytest.approx(r["named"] - r["other"])


# --- the read-out that passed, offered by inference.attention_maps, predict --attention-maps and the demo page ---


def test_attention_maps_readout_gradient_is_chefers_map_normalised(demo):
    image, labels = scenes.scene(HELD_OUT_SEED, INDEX)
    maps = inference.attention_maps(demo, image, labels + labels[:1], readout="gradient")
    assert list(maps) == labels
    rec = readouts.record(demo, inference.pixels(demo, image), [labels])
    expected = readouts.gradient_weighted(rec)
    grid = demo.config.vision.grid
    for i, label in enumerate(labels):
        assert maps[label].shape == (1, 1, grid, grid)
        torch.testing.assert_close(maps[label].flatten(), expected[i] / expected[i].sum(), rtol=1e-5, atol=1e-7)
    with torch.inference_mode():  # the gradient pass works for a caller under inference_mode too
        again = inference.attention_maps(demo, image, labels, readout="gradient")
    torch.testing.assert_close(again[labels[0]], maps[labels[0]])
    # the default is today's map, the last token's attention
    default, last = inference.attention_maps(demo, image, labels), inference.attention_maps(demo, image, labels, "last")
    assert all(torch.equal(default[label], last[label]) for label in labels)
    with pytest.raises(ValueError, match="readout must be one of last, gradient"):
        inference.attention_maps(demo, image, labels, readout="first")


def test_predict_draws_the_readout_asked_for(demo, tmp_path):
    from nxtp_minimal.tools import cli, predict
    from nxtp_minimal.tools.errors import UserError

    paths = []
    for i in (0, INDEX):
        paths.append(str(tmp_path / f"scene_{i}.png"))
        scenes.scene(HELD_OUT_SEED, i)[0].save(paths[-1])
    pixels = inference.pixels(demo, paths)
    for (ranked, maps), path in zip(predict.label_batch(demo, pixels, 3, attention="gradient"), paths):
        expected = inference.attention_maps(demo, path, [label for label, _ in ranked], "gradient")
        assert list(maps) == list(expected)
        for label in maps:
            torch.testing.assert_close(maps[label], expected[label], rtol=1e-5, atol=1e-7)
    cli.main(["predict", *paths, "--attention-maps", str(tmp_path / "maps"), "--readout", "gradient", "--top-k", "3"])
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["scene_0.png", f"scene_{INDEX}.png"]
    assert predict.parser().parse_args(["x.png"]).readout == "last"
    with pytest.raises(UserError, match="add --attention-maps DIR"):
        predict.main([paths[0], "--readout", "gradient"])


def test_figure_caption_names_the_readout(demo):
    import matplotlib

    matplotlib.use("Agg")
    from nxtp_minimal.tools.plot import attention_figure

    image, labels = scenes.scene(HELD_OUT_SEED, INDEX)
    fig = attention_figure(image, inference.attention_maps(demo, image, labels, "gradient"), size=64,
                           caption=inference.READOUTS["gradient"])
    assert inference.READOUTS["gradient"] in [t.get_text() for t in fig.texts]


def test_demo_page_overlays_follow_the_readout(demo):
    pytest.importorskip("gradio", reason="the demo page: pip install -e .[demo]")
    from nxtp_minimal.tools import demo as page

    image = scenes.scene(HELD_OUT_SEED, INDEX)[0]
    ranked, _, overlays, _ = page.analyse(demo, image, 3, readout="gradient")
    assert len(overlays) == len(ranked) == 3
    assert page.parser().parse_args(["--readout", "gradient"]).readout == "gradient"
    assert page.parser().parse_args([]).readout == "last"


def test_label_pass_logp_is_the_labels_probability_from_sampling(demo):
    # the score one-shot sampling gives a branch is the product of its tokens' probabilities, delimiter included
    image, _ = scenes.scene(HELD_OUT_SEED, INDEX)
    pixels = inference.pixels(demo, image)
    tokens, probs, _ = inference.sample(demo, pixels, 4)
    ranked = inference.rank(demo, tokens[0], probs[0])
    labels = [label for label, _ in ranked]
    rec = readouts.record(demo, pixels, [labels])
    tok = demo.tokenizer
    branches = {}  # label -> the score of each branch that wrote it (rank sums branches with the same text)
    for ids, score in sampling.branch_labels(tokens[0], probs[0], tok.delimiter_id):
        branches.setdefault(sampling.label_text(ids, tok.decode, tok.decode([tok.delimiter_id])), []).append(score)
    for label, logp in zip(labels, rec.logp):
        assert math.exp(logp) == pytest.approx(max(branches[label]), rel=1e-4)
