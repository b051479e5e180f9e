"""The token sequence (NXTP step 2): image tokens, `<|image|>`, bos, the prompt, then labels."""

import torch

from .tokenizer import Tokenizer

IMAGE_TOKEN = "<|image|>"


def _swap_image_and_bos(ids: list) -> list:
    # Official layout: the text is encoded as [bos, <|image|>, ...] and the first two ids swapped,
    # so <|image|> directly follows the patch tokens and bos starts the text.
    return [ids[1], ids[0]] + ids[2:]


def inference_ids(tokenizer: Tokenizer, prompt: str) -> list:
    """`<|image|>` + bos + prompt, e.g. [32000, 1, 450, 3618, 297, 278, 1967, 526] for LLaMA."""
    return _swap_image_and_bos(tokenizer.encode(IMAGE_TOKEN + prompt, bos=True))


def training_ids(tokenizer: Tokenizer, prompt: str, labels: list, length: int) -> list:
    """Prompt + ", "-joined lower-cased labels with bos and eos, cut to `length` (official truncation)."""
    text = IMAGE_TOKEN + prompt + " " + ", ".join(label.lower() for label in labels)
    return _swap_image_and_bos(tokenizer.encode(text, bos=True, eos=True)[:length])


def training_batch(tokenizer: Tokenizer, prompt, label_lists: list, n_image: int, max_seq_len: int):
    """Text ids and targets for a batch, laid out like the official `construct_text_inputs`.

    prompt: the prompt of every row, or a list with one prompt per row.
    Returns tokens [B, max_seq_len - n_image] padded with -1, and targets [B, max_seq_len] aligned with
    the decoder input (image tokens, then text): position n_image + i holds text token i for i >= 1,
    so everything from bos on is trained, except eos; image positions, `<|image|>` and padding are -1.
    The loss pairs logits at position p with targets at p + 1.
    """
    length = max_seq_len - n_image
    if length < 3:
        raise ValueError(f"max_seq_len {max_seq_len} leaves no room for text after {n_image} image tokens")
    pad = tokenizer.pad_id
    prompts = [prompt] * len(label_lists) if isinstance(prompt, str) else prompt
    tokens = torch.full((len(label_lists), length), pad, dtype=torch.long)
    for b, (row_prompt, labels) in enumerate(zip(prompts, label_lists)):
        ids = training_ids(tokenizer, row_prompt, labels, length)
        tokens[b, : len(ids)] = torch.tensor(ids)
    targets = torch.full((len(label_lists), max_seq_len), pad, dtype=torch.long)
    targets[:, n_image + 1 :] = tokens[:, 1:]
    targets[targets == tokenizer.eos_id] = pad  # the eos only marks where padding starts
    return tokens, targets
