"""One-shot sampling rules with a scripted stand-in for the decoder."""

import pytest
import torch

from nxtp_minimal import sampling

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
