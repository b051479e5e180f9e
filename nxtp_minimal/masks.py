"""Attention masks (NXTP step 3). Boolean: True where a query may attend, False where it may not.

Shapes are [B or 1, 1, S, S] (query rows, key columns), the layout scaled_dot_product_attention takes.
Every mask is built on the device of its input, without a loop over rows, so training builds its masks
where the model runs.
"""

import torch


def causal_mask(S: int, device=None) -> torch.Tensor:
    """Plain language-model mask: position i sees 0..i."""
    return torch.ones(S, S, dtype=torch.bool, device=device).tril()[None, None]


def prefix_mask(S: int, n_image: int, device=None) -> torch.Tensor:
    """Inference mask: causal, except that the image tokens (0..n_image-1) all see each other."""
    i = torch.arange(S, device=device)
    image = i < n_image
    return ((i[:, None] >= i[None, :]) | (image[:, None] & image[None, :]))[None, None]


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
    i = torch.arange(S, device=input_tokens.device)
    answer = (input_tokens[-1] == answer_id).int().argmax()  # the first one, read on the device
    allowed = prefix_mask(S, n_image, input_tokens.device) & (i <= answer)  # [1, 1, S, S]
    # Segment of each position: how many delimiters stand before it. The official loop opens segment 0
    # at the answer position and each later one after a delimiter, up to the delimiter that ends it.
    delimiter = (input_tokens == delimiter_id).int()
    before = delimiter.cumsum(dim=1) - delimiter  # [B, S]
    ended = before < delimiter.sum(dim=1, keepdim=True)  # a delimiter stands at or after the position
    inside = ended & ((before > 0) | (i >= answer))  # [B, S]
    same = (before[:, :, None] == before[:, None, :]) & inside[:, :, None] & inside[:, None, :]
    return allowed | (same & (i[:, None] >= i[None, :]))[:, None]
