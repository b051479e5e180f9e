"""One-shot sampling and label ranking (NXTP step 4), and the decoders it is compared with.

The answer position's distribution gives the k most likely first tokens; each starts a branch that
continues greedily until it writes the delimiter. Training taught the answer position to predict the
first label of a shuffled list, so its distribution spreads over all the labels of the image, and
the k branches are k labels, not k orderings of the same labels. Greedy and beam search decode the
whole list as one sentence instead (`greedy`, `beam`), the way a plain language model would.
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


def one_shot_fixed(first_logits: torch.Tensor, step: Callable, k: int, delimiter_id: int,
                   max_tokens: int = MAX_TOKENS, check_every: int = 4):
    """`one_shot` with fixed shapes, for a step that runs all k branches every time (cache.StaticSampler).

    `step(newest, t)` gets the newest token of every branch, [B, k], and t, the tokens each branch holds;
    it returns next-token logits [B, k, V]. Tokens and probabilities go into buffers allocated once,
    and whether any branch still runs is read back to the host only every `check_every` steps.
    Returns what `one_shot` returns: the same branches, as many steps as it would have taken (a branch's
    tokens after its delimiter differ, and both ignore them).
    """
    B, V = first_logits.shape
    if not 1 <= k <= V:
        raise ValueError(f"k must be between 1 and the vocabulary size {V}, got {k}")
    first_probs, first_tokens = torch.softmax(first_logits.float(), dim=-1).topk(k)  # [B, k]
    tokens = first_tokens.new_zeros(B, k, max_tokens)
    probs = first_probs.new_zeros(B, k, max_tokens)
    tokens[:, :, 0], probs[:, :, 0] = first_tokens, first_probs
    live = torch.ones(B, k, dtype=torch.bool, device=tokens.device)
    steps = torch.zeros((), dtype=torch.long, device=tokens.device)  # the steps one_shot would take
    for t in range(1, max_tokens):
        steps += live.any()
        p, token = torch.softmax(step(tokens[:, :, t - 1], t).float(), dim=-1).max(dim=-1)  # greedy
        tokens[:, :, t], probs[:, :, t] = token, p
        live &= token != delimiter_id
        if t % check_every == 0 and not live.any():
            break
    n = 1 + int(steps)
    return tokens[:, :, :n], probs[:, :, :n]


def branch_labels(tokens, probs, delimiter_id: int) -> list:
    """Per branch: (label ids up to and including its first delimiter, product of their probabilities).

    tokens, probs [k, T] for one image. A branch that never wrote the delimiter keeps all its tokens.
    Official defect, not copied: kaiyuyue/nxtp src/decoding.py pads such a branch with a delimiter that
    has no probability and then pairs tokens with probabilities across all branches concatenated, so
    every later branch is scored with shifted probabilities; here each branch is scored from its own.
    """
    out = []
    for ids, ps in zip(tokens.tolist(), probs.tolist()):
        end = ids.index(delimiter_id) + 1 if delimiter_id in ids else len(ids)
        out.append((ids[:end], math.prod(ps[:end])))
    return out


def label_text(ids: list, decode: Callable, delimiter: str = ",") -> str:
    """A branch's label: its decoded ids with every delimiter character removed (a branch that starts
    with the delimiter gives an empty label)."""
    return decode(ids).replace(delimiter, "")


def rank(branches: list, decode: Callable, delimiter: str = ",") -> list:
    """Merge branches with the same `label_text` by summing their scores; highest first.

    Ties keep branch order, as Python's stable sort does officially.
    """
    scores = {}
    for ids, score in branches:
        label = label_text(ids, decode, delimiter)
        scores[label] = scores.get(label, 0.0) + score
    return sorted(scores.items(), key=lambda item: item[1], reverse=True)


def beam(first_logits: torch.Tensor, step: Callable, k: int, stop_id: int, max_tokens: int, reorder=None):
    """Beam search of width k for the most likely whole sequence per image, ending with `stop_id`.

    `step` as for `one_shot`, called with the k beams of every image. Beams change places between
    steps: `reorder(parents [B, k])` tells a cache which beam each one continues; without it, `step`
    must recompute each sequence from its tokens (the official loop does). Scores are summed
    log-probabilities. Returns tokens [B, T] of each image's best beam.
    """
    B, V = first_logits.shape
    scores, tokens = torch.log_softmax(first_logits.float(), dim=-1).topk(k)  # [B, k]
    tokens = tokens[:, :, None]  # [B, k, 1]
    done = tokens[:, :, -1] == stop_id
    finished = torch.full((V,), float("-inf"), device=tokens.device)
    finished[stop_id] = 0.0  # a finished beam may only repeat the stop token, at no cost
    while not done.all() and tokens.shape[2] < max_tokens:
        logp = torch.log_softmax(step(tokens.flatten(0, 1), ~done.flatten()).float(), dim=-1).view(B, k, V)
        logp = torch.where(done[:, :, None], finished, logp)
        scores, index = (scores[:, :, None] + logp).flatten(1).topk(k)  # [B, k] over k * V candidates
        parent, token = index // V, index % V
        if reorder is not None:
            reorder(parent)
        tokens = torch.cat([tokens.gather(1, parent[:, :, None].expand_as(tokens)), token[:, :, None]], dim=2)
        done = done.gather(1, parent) | (token == stop_id)
    return tokens[torch.arange(B), scores.argmax(dim=1)]


def split_labels(ids: list, delimiter_id: int, stop_id: int, decode: Callable) -> list:
    """A whole decoded list, ids up to `stop_id`, as label strings in the order written (repeats kept)."""
    ids = ids[: ids.index(stop_id)] if stop_id in ids else ids
    labels, run = [], []
    for i in ids + [delimiter_id]:
        if i == delimiter_id:
            label = decode(run).strip()
            labels += [label] if label else []
            run = []
        else:
            run.append(i)
    return labels
