"""One-shot sampling and label ranking (NXTP step 4).

The answer position's distribution gives the k most likely first tokens; each starts a branch that
continues greedily until it writes the delimiter. Because the training mask made labels independent,
the k branches are k labels, not k orderings of the same labels.
"""

import math
from typing import Callable

import torch

MAX_TOKENS = 19  # official max_update_iter = 20: at most 19 sampled tokens per branch


def one_shot(first_logits: torch.Tensor, step: Callable, k: int, delimiter_id: int, max_tokens: int = MAX_TOKENS):
    """Grow k branches per image from first_logits [B, V].

    `step(tokens, live)` gets the sampled ids so far, tokens [B * k, t], and the branches still running,
    live [B * k] bool; it returns next-token logits [B * k, V] (rows of finished branches may be anything).
    A branch finishes when it writes the delimiter at its second token or later; sampling stops when
    all have finished or each holds `max_tokens` tokens.
    Returns tokens and their probabilities, each [B, k, T].
    """
    B, V = first_logits.shape
    if not 1 <= k <= V:
        raise ValueError(f"k must be between 1 and the vocabulary size {V}, got {k}")
    probs, tokens = torch.softmax(first_logits.float(), dim=-1).topk(k)  # [B, k]
    tokens, probs = tokens.reshape(-1, 1), probs.reshape(-1, 1)  # [B * k, 1]
    live = torch.ones(B * k, dtype=torch.bool, device=tokens.device)
    while live.any() and tokens.shape[1] < max_tokens:
        p, t = torch.softmax(step(tokens, live).float(), dim=-1).max(dim=-1)  # greedy
        tokens, probs = torch.cat([tokens, t[:, None]], 1), torch.cat([probs, p[:, None]], 1)
        live &= t != delimiter_id
    return tokens.view(B, k, -1), probs.view(B, k, -1)


def branch_labels(tokens, probs, delimiter_id: int) -> list:
    """Per branch: (label ids up to and including its first delimiter, product of their probabilities).

    tokens, probs [k, T] for one image. A branch that never wrote the delimiter keeps all its tokens.
    The official code pads such a branch with an unscored delimiter and then shifts every later
    branch's probabilities (REFERENCE.md, sampling point 5); here each branch is scored from its own.
    """
    out = []
    for ids, ps in zip(tokens.tolist(), probs.tolist()):
        end = ids.index(delimiter_id) + 1 if delimiter_id in ids else len(ids)
        out.append((ids[:end], math.prod(ps[:end])))
    return out


def rank(branches: list, decode: Callable, delimiter: str = ",") -> list:
    """Merge branches with the same label text by summing their scores; highest first.

    Text is the decoded ids with every delimiter character removed (a branch that starts with the
    delimiter gives an empty label). Ties keep branch order, as Python's stable sort does officially.
    """
    scores = {}
    for ids, score in branches:
        label = decode(ids).replace(delimiter, "")
        scores[label] = scores.get(label, 0.0) + score
    return sorted(scores.items(), key=lambda item: item[1], reverse=True)
