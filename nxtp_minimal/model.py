"""NXTP: a CLIP image encoder feeding a truncated LLaMA decoder that writes object labels."""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import cache, masks, prompt, sampling
from .config import NXTPConfig
from .llama import Decoder
from .preprocess import load_image, preprocess
from .tokenizer import Tokenizer
from .vit import VisionEncoder


class NXTP(nn.Module):
    def __init__(self, config: NXTPConfig, tokenizer: Tokenizer = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.vision_encoder = VisionEncoder(config.vision, embed_dim=config.language.dim)
        self.language_decoder = Decoder(config.language)

    @property
    def device(self):
        return self.language_decoder.output.weight.device

    @property
    def dtype(self):
        return self.language_decoder.output.weight.dtype

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load it with tokenizer=PATH (see weights/README.md)")
        return self.tokenizer

    # --- the sequence (NXTP steps 1-2) ---

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, P, D]: projected patch tokens; the class token is dropped."""
        return self.vision_encoder(pixels.to(self.device, self.dtype))[:, 1:]

    def prompt_ids(self) -> list:
        return prompt.inference_ids(self._need_tokenizer(), self.config.prompt)

    def prefix(self, pixels: torch.Tensor, prompt_ids: list) -> torch.Tensor:
        """Decoder input for inference: image tokens then prompt embeddings, [B, P + T, D]."""
        image = self.image_tokens(pixels)
        ids = torch.tensor(prompt_ids, device=self.device)
        text = self.language_decoder.tok_embeddings(ids).expand(image.shape[0], -1, -1)
        return torch.cat([image, text], dim=1)

    # --- one-shot sampling (NXTP step 4) ---

    @torch.inference_mode()
    def start_sampling(self, pixels, k: int, prompt_ids: list = None, fast: bool = True, max_tokens=sampling.MAX_TOKENS):
        """Encode the images, run the prefix, and return (first-step logits [B, V], step function).

        fast=False is the official loop, kept as the reference: every step re-runs the whole
        sequence of every branch. fast=True runs the prefix once and feeds only new tokens (cache.py).
        """
        prompt_ids = self.prompt_ids() if prompt_ids is None else prompt_ids
        x = self.prefix(pixels, prompt_ids)  # [B, L, D]
        n_image, decoder = self.config.vision.n_patches, self.language_decoder
        mask = masks.prefix_mask(x.shape[1], n_image).to(x.device)
        if fast:
            return cache.cached_sampler(decoder, x, mask, k, max_tokens)
        first = decoder(x, mask, last_only=True)  # [B, V]
        x = x.repeat_interleave(k, dim=0)  # [B * k, L, D]: every branch carries its own copy

        @torch.inference_mode()
        def step(tokens, live):
            seq = torch.cat([x, decoder.tok_embeddings(tokens)], dim=1)
            return decoder(seq, masks.prefix_mask(seq.shape[1], n_image).to(x.device), last_only=True)

        return first, step

    @torch.inference_mode()
    def sample(self, pixels, k: int, prompt_ids=None, delimiter_id=None, fast=True, max_tokens=sampling.MAX_TOKENS):
        """Branch tokens and probabilities [B, k, T] plus the first-step logits [B, V].

        Ids can be given instead of read from the tokenizer, so the port can be checked without it.
        """
        delimiter_id = self._need_tokenizer().delimiter_id if delimiter_id is None else delimiter_id
        first, step = self.start_sampling(pixels, k, prompt_ids, fast, max_tokens)
        tokens, probs = sampling.one_shot(first, step, k, delimiter_id, max_tokens)
        return tokens, probs, first

    def predict(self, images, k: int = 10, fast: bool = True) -> list:
        """For each image, a list of (label, probability), highest first.

        images: a PIL image, a file path, a list of those, or preprocessed pixels [B, 3, S, S].
        fast=False runs the official recompute-everything loop (same answers, much slower).
        """
        tok = self._need_tokenizer()
        pixels = self.pixels(images)
        tokens, probs, _ = self.sample(pixels, k, fast=fast)
        delimiter = tok.decode([tok.delimiter_id])
        return [
            sampling.rank(sampling.branch_labels(t, p, tok.delimiter_id), tok.decode, delimiter)
            for t, p in zip(tokens, probs)
        ]

    def pixels(self, images) -> torch.Tensor:
        """Accept what predict accepts and return [B, 3, S, S] float32."""
        size = self.config.vision.image_size
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1:] != (3, size, size):
                raise ValueError(f"pixels must be [B, 3, {size}, {size}], got {list(images.shape)}")
            return images
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        loaded = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        return torch.stack([preprocess(im, size) for im in loaded])

    # --- training objective (NXTP step 3) ---

    def loss(self, pixels: torch.Tensor, labels: list) -> torch.Tensor:
        """The official objective: mean cross-entropy of the text under the non-causal label mask.

        pixels [B, 3, S, S]; labels: one list of label strings per image, used in the order given.
        """
        tok = self._need_tokenizer()
        if len(labels) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(labels)} label lists")
        if any(len(ls) == 0 for ls in labels):
            raise ValueError("every image needs at least one label")
        for label in (label for ls in labels for label in ls):
            if not label.strip() or "," in label:
                raise ValueError(f"label {label!r} is empty or holds the delimiter ','; give one object name per label")
        n_image, max_seq_len = self.config.vision.n_patches, self.config.language.max_seq_len
        tokens, targets = prompt.training_batch(tok, self.config.prompt, labels, n_image, max_seq_len)
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        image = self.image_tokens(pixels)
        # padding (-1) selects the last row, <|empty|>, as in the official code
        text = self.language_decoder.tok_embeddings(tokens % self.config.language.vocab_size)
        x = torch.cat([image, text], dim=1)  # [B, max_seq_len, D]
        input_tokens = torch.cat([tokens.new_full((tokens.shape[0], n_image), -1), tokens], dim=1)
        mask = masks.label_mask(input_tokens.cpu(), n_image, tok.answer_id, tok.delimiter_id).to(self.device)
        logits = self.language_decoder(x, mask)
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=tok.pad_id
        )
