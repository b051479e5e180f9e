"""One-shot sampling rules with a scripted stand-in for the decoder."""

import pytest
import torch
from conftest import REPO

import nxtp_minimal
from nxtp_minimal import inference, sampling

V, DELIM = 12, 3


def logits_for(token, p):
    """Logits whose softmax gives `token` probability p and spreads the rest evenly."""
    probs = torch.full((V,), (1 - p) / (V - 1))
    probs[token] = p
    return probs.log()


def test_limit_and_first_token_delimiter():
    # branch 0 starts with token 5 and never writes the delimiter: it runs into the 19-token limit.
    # branch 1 starts with the delimiter itself: not finished yet (needs one at its 2nd token or later).
    first = torch.stack([logits_for(5, 0.5)]).clone()
    first[0, DELIM] = first[0, 5] - 0.1  # second most likely first token
    p_first = torch.softmax(first, -1)[0]

    def step(tokens, live):
        t = tokens.shape[1]
        rows = [logits_for(7, 0.9), logits_for(DELIM if t == 3 else 8, 0.8)]
        return torch.stack(rows)

    tokens, probs = sampling.one_shot(first, step, k=2, delimiter_id=DELIM)
    assert tokens.shape == (1, 2, sampling.MAX_TOKENS)
    assert tokens[0, 0].tolist() == [5] + [7] * 18
    assert tokens[0, 1, :4].tolist() == [DELIM, 8, 8, DELIM]

    (ids0, score0), (ids1, score1) = sampling.branch_labels(tokens[0], probs[0], DELIM)
    # the branch that hit the limit keeps its 19 tokens, scored from its own probabilities
    assert ids0 == [5] + [7] * 18
    assert score0 == pytest.approx(p_first[5].item() * 0.9**18, rel=1e-5)
    # the branch that began with the delimiter is the empty label, scored by its first token
    assert ids1 == [DELIM]
    assert score1 == pytest.approx(p_first[DELIM].item(), rel=1e-5)


def test_stops_when_every_branch_has_its_delimiter():
    first = logits_for(4, 0.6)[None]
    steps = []

    def step(tokens, live):
        steps.append(live.tolist())
        t = tokens.shape[1]
        return torch.stack([logits_for(DELIM if t == 1 else 9, 0.7), logits_for(DELIM if t == 2 else 9, 0.7)])

    tokens, _ = sampling.one_shot(first, step, k=2, delimiter_id=DELIM)
    assert tokens.shape[-1] == 3
    assert steps == [[True, True], [False, True]]  # the first branch left after writing its delimiter


def test_rank_merges_same_text_and_sorts():
    branches = [([1, DELIM], 0.2), ([2, DELIM], 0.3), ([5, 1, DELIM], 0.15)]
    names = {1: "cat", 2: "dog", 5: "", DELIM: ","}
    decode = lambda ids: "".join(names[i] for i in ids)  # noqa: E731
    assert sampling.rank(branches, decode) == [("cat", pytest.approx(0.35)), ("dog", 0.3)]


def test_k_out_of_range():
    with pytest.raises(ValueError, match="k must be between 1 and the vocabulary size 12"):
        sampling.one_shot(torch.zeros(1, V), None, k=13, delimiter_id=DELIM)


def markov_step(table):
    """A decoder whose next-token distribution depends only on the last token: table [V, V] of logits."""
    return lambda tokens, live: table[tokens[:, -1]]


def test_beam_finds_the_most_likely_sequence():
    # brute force over every sequence of at most 4 tokens ending with the stop token is the reference
    g = torch.Generator().manual_seed(0)
    n, stop = 5, 0
    first, table = torch.randn(1, n, generator=g) * 2, torch.randn(n, n, generator=g) * 2
    logp_first, logp = torch.log_softmax(first[0], -1), torch.log_softmax(table, -1)
    best, best_score = None, float("-inf")
    for length in range(1, 5):
        for seq in torch.cartesian_prod(*[torch.arange(n)] * length).reshape(-1, length).tolist():
            if seq[-1] != stop or stop in seq[:-1]:
                continue
            score = logp_first[seq[0]] + sum(logp[a, b] for a, b in zip(seq, seq[1:]))
            if score > best_score:
                best, best_score = seq, score
    got = sampling.beam(first, markov_step(table), n, stop, max_tokens=4)[0].tolist()
    assert got[: got.index(stop) + 1] == best


def test_split_labels():
    names = {4: "hot", 5: "dog", 6: "sun", DELIM: ",", 2: "</s>"}
    decode = lambda ids: " ".join(names[i] for i in ids)  # noqa: E731
    assert sampling.split_labels([4, 5, DELIM, 6, DELIM, 6, 2, 4], DELIM, 2, decode) == ["hot dog", "sun", "sun"]
    assert sampling.split_labels([6, DELIM], DELIM, 2, decode) == ["sun"]


def test_cached_decoders_equal_the_recomputing_loop():
    # the cache (fast path, beam search reordering its branch slots) gives the official loop's tokens
    model = nxtp_minimal.load_demo()
    pixels = inference.pixels(model, sorted((REPO / "lessons" / "images").glob("scene_*.png")))
    eos = model.tokenizer.eos_id
    for k in (1, 3):
        official = inference.ReferenceSampler(model, pixels, k)
        reference = sampling.beam(official.first, official.step, k, eos, 12)
        sampler = model.sampler(pixels, k, steps=11)
        assert torch.equal(sampling.beam(sampler.first, sampler.step, k, eos, 12, sampler.reorder), reference)
    official = inference.ReferenceSampler(model, pixels, 1)
    reference = sampling.one_shot(official.first, official.step, 1, eos, 12)[0][:, 0]
    tok = model.tokenizer
    expected = [sampling.split_labels(t.tolist(), tok.delimiter_id, eos, tok.decode) for t in reference]
    assert inference.decode_list(model, pixels, "greedy", max_tokens=12) == expected
