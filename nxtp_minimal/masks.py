"""Attention masks (NXTP step 3). Additive: 0 where a query may attend, -inf where it may not.

Shapes are [B or 1, 1, S, S] (query rows, key columns), the layout scaled_dot_product_attention takes.
"""

import torch


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))


def _causal(S: int) -> torch.Tensor:
    return torch.ones(S, S, dtype=torch.bool).tril()


def causal_mask(S: int) -> torch.Tensor:
    """Plain language-model mask: position i sees 0..i."""
    return _additive(_causal(S))[None, None]


def prefix_mask(S: int, n_image: int) -> torch.Tensor:
    """Inference mask: causal, except that the image tokens (0..n_image-1) all see each other."""
    allowed = _causal(S)
    allowed[:n_image, :n_image] = True
    return _additive(allowed)[None, None]


def label_mask(input_tokens: torch.Tensor, n_image: int, answer_id: int, delimiter_id: int) -> torch.Tensor:
    """Training mask: a label's tokens see the image, the prompt and their own label's earlier tokens.

    input_tokens [B, S]: -1 at image positions, then the text ids. Starting from `prefix_mask`, every
    column after the answer position is closed, then the causal triangle is re-opened inside each
    label segment: answer position .. first delimiter, token after a delimiter .. next delimiter.
    A delimiter ends its segment, so the delimiter's row, which predicts the next label's first token,
    sees the label before it.
    Two official quirks, kept because the released models were trained with them (kaiyuyue/nxtp
    src/models/lang.py, Transformer.forward): the answer position is read from the batch's last row and
    used for every row; and tokens after the last delimiter (last label, eos, padding) stay closed, so
    they see only positions up to the answer, not even themselves.
    """
    B, S = input_tokens.shape
    allowed = _causal(S).repeat(B, 1, 1)
    allowed[:, :n_image, :n_image] = True
    answer = int((input_tokens[-1] == answer_id).nonzero()[0, 0])
    allowed[:, :, answer + 1 :] = False
    for b in range(B):
        start = answer
        for d in (input_tokens[b] == delimiter_id).nonzero()[:, 0].tolist():
            allowed[b, start : d + 1, start : d + 1] = _causal(d + 1 - start)
            start = d + 1
    return _additive(allowed)[:, None]
