"""NXTP: a CLIP image encoder feeding a truncated LLaMA decoder that writes object labels."""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import cache, masks, sampling
from .config import NXTPConfig
from .llama import Decoder
from .preprocess import load_image, preprocess
from .prompt import inference_ids, training_batch
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
        return inference_ids(self._need_tokenizer(), self.config.prompt)

    def prefix(self, pixels: torch.Tensor, prompt_ids: list) -> torch.Tensor:
        """Decoder input for inference: image tokens then prompt embeddings, [B, P + T, D]."""
        image = self.image_tokens(pixels)
        ids = torch.tensor(prompt_ids, device=self.device)
        text = self.language_decoder.tok_embeddings(ids).expand(image.shape[0], -1, -1)
        return torch.cat([image, text], dim=1)

    # --- one-shot sampling (NXTP step 4) ---

    def cached_sampler(self, pixels, k: int, prompt_ids=None, steps=sampling.MAX_TOKENS - 1, attention=False):
        """The prefix of every image run once into a key/value cache (cache.py), ready for `steps` decode steps.

        attention=True also keeps how much every fed token attends to every image patch.
        """
        prompt_ids = self.prompt_ids() if prompt_ids is None else prompt_ids
        x = self.prefix(pixels, prompt_ids)  # [B, L, D]
        mask = masks.prefix_mask(x.shape[1], self.config.vision.n_patches).to(x.device)
        n_image = self.config.vision.n_patches if attention else 0
        return cache.torch_sampler(self.language_decoder, x, mask, k, steps, n_image)

    @torch.inference_mode()
    def start_sampling(self, pixels, k: int, prompt_ids: list = None, fast: bool = True, max_tokens=sampling.MAX_TOKENS):
        """Encode the images, run the prefix, and return (first-step logits [B, V], step function).

        fast=False is the official loop, kept as the reference: every step re-runs the whole
        sequence of every branch. fast=True runs the prefix once and feeds only new tokens (cache.py).
        """
        if fast:
            sampler = self.cached_sampler(pixels, k, prompt_ids, max_tokens - 1)
            return sampler.first, sampler.step
        prompt_ids = self.prompt_ids() if prompt_ids is None else prompt_ids
        x = self.prefix(pixels, prompt_ids)  # [B, L, D]
        n_image, decoder = self.config.vision.n_patches, self.language_decoder
        first = decoder(x, masks.prefix_mask(x.shape[1], n_image).to(x.device), last_only=True)  # [B, V]
        x = x.repeat_interleave(k, dim=0)  # [B * k, L, D]: every branch carries its own copy

        @torch.inference_mode()
        def step(tokens, live):
            seq = torch.cat([x, decoder.tok_embeddings(tokens)], dim=1)
            return decoder(seq, masks.prefix_mask(seq.shape[1], n_image).to(x.device), last_only=True)

        return first, step

    @torch.inference_mode()
    def sample(self, pixels, k: int, prompt_ids=None, delimiter_id=None, fast=True, max_tokens=sampling.MAX_TOKENS,
               attention=False):
        """Branch tokens and probabilities [B, k, T] plus the first-step logits [B, V].

        Ids can be given instead of read from the tokenizer, so the port can be checked without it.
        attention=True (cached loop only) adds a fourth result: per branch, the attention of each of its
        tokens to the image patches, [B, k, T - 1, blocks, heads, grid, grid] (see `label_maps`).
        """
        delimiter_id = self._need_tokenizer().delimiter_id if delimiter_id is None else delimiter_id
        if attention:
            sampler = self.cached_sampler(pixels, k, prompt_ids, max_tokens - 1, attention=True)
            first, step = sampler.first, sampler.step
        else:
            first, step = self.start_sampling(pixels, k, prompt_ids, fast, max_tokens)
        tokens, probs = sampling.one_shot(first, step, k, delimiter_id, max_tokens)
        if not torch.isfinite(probs).all():
            raise ValueError(
                "the model's outputs are not finite numbers (NaN or inf): check the weights file (a corrupt or "
                "badly converted file gives this) and the dtype (float16 on a CPU overflows: use float32)"
            )
        if not attention:
            return tokens, probs, first
        grid = self.config.vision.grid
        return tokens, probs, first, sampler.attention.unflatten(-1, (grid, grid))

    def predict(self, images, k: int = 10, fast: bool = True) -> list:
        """For each image, a list of (label, probability), highest first.

        images: a PIL image, a file path, a list of those, or preprocessed pixels [B, 3, S, S].
        fast=False runs the official recompute-everything loop (same answers, much slower).
        """
        self._need_tokenizer()
        pixels = self.pixels(images)
        tokens, probs, _ = self.sample(pixels, k, fast=fast)
        return [self.rank(t, p) for t, p in zip(tokens, probs)]

    @torch.inference_mode()
    def decode_list(self, images, method: str = "greedy", k: int = 1, max_tokens: int = 40) -> list:
        """For each image, the label list decoded as one sentence, in the order written (repeats kept).

        The alternatives to one-shot sampling (lessons 04 and 10): method "greedy" takes the most
        likely token at every step; "beam" keeps the k most likely sequences. Both stop at eos.
        """
        tok = self._need_tokenizer()
        pixels = self.pixels(images)
        if method == "greedy":
            first, step = self.start_sampling(pixels, 1, max_tokens=max_tokens)
            tokens = sampling.one_shot(first, step, 1, tok.eos_id, max_tokens)[0][:, 0]
        elif method == "beam":
            sampler = self.cached_sampler(pixels, k, steps=max_tokens - 1)
            tokens = sampling.beam(sampler.first, sampler.step, k, tok.eos_id, max_tokens, sampler.reorder)
        else:
            raise ValueError(f"method must be 'greedy' or 'beam', got {method!r}")
        return [sampling.split_labels(t.tolist(), tok.delimiter_id, tok.eos_id, tok.decode) for t in tokens]

    def rank(self, tokens, probs) -> list:
        """One image's branches, tokens and probs [k, T], as ranked (label, probability) pairs."""
        tok = self._need_tokenizer()
        branches = sampling.branch_labels(tokens, probs, tok.delimiter_id)
        return sampling.rank(branches, tok.decode, tok.decode([tok.delimiter_id]))

    def label_maps(self, tokens, probs, attention) -> dict:
        """One image's `sample(..., attention=True)` results -> label -> [blocks, heads, grid, grid].

        Like `attention_maps`, from each label's last token; where several branches wrote the same label,
        the map of the highest-scoring one.
        """
        tok = self._need_tokenizer()
        best = {}
        for i, (ids, score) in enumerate(sampling.branch_labels(tokens, probs, tok.delimiter_id)):
            label = sampling.label_text(ids, tok.decode, tok.decode([tok.delimiter_id]))
            last = len(ids) - 2 if ids[-1] == tok.delimiter_id else len(ids) - 1  # the delimiter's predictor
            last = min(max(last, 0), attention.shape[1] - 1)
            if label not in best or score > best[label][0]:
                best[label] = (score, attention[i, last])
        return {label: m / m.sum(dim=(-2, -1), keepdim=True) for label, (_, m) in best.items()}

    @torch.inference_mode()
    def attention_maps(self, image, labels: list) -> dict:
        """Where each label looks: label -> attention [blocks, heads, grid, grid], each map summing to 1.

        image: what `predict` takes, for one image; a label named twice is answered once. Each label is
        fed after the prompt as a branch would write it; the map is the attention of its last token (the
        position that predicts the delimiter, so it has read the whole label) to the image patches,
        renormalised over the patches.
        """
        tok = self._need_tokenizer()
        labels = list(dict.fromkeys(labels))
        if not labels or any(not label.strip() for label in labels):
            raise ValueError(f"attention_maps needs at least one non-empty label, got {labels!r}")
        pixels = self.pixels(image)
        if pixels.shape[0] != 1:
            raise ValueError(f"attention_maps takes one image, got {pixels.shape[0]}")
        ids = [tok.encode(label) for label in labels]
        n = max(map(len, ids))
        sampler = self.cached_sampler(pixels, len(labels), steps=n, attention=True)
        tokens = torch.tensor([i + [tok.delimiter_id] * (n - len(i)) for i in ids], device=self.device)
        lengths = torch.tensor([len(i) for i in ids], device=self.device)
        for t in range(1, n + 1):  # feed label token t - 1 of every label that has one
            sampler.step(tokens[:, :t], t <= lengths)
        last = sampler.attention[0, torch.arange(len(labels)), lengths - 1]  # [labels, blocks, H, P]
        maps = (last / last.sum(dim=-1, keepdim=True)).unflatten(-1, (self.config.vision.grid,) * 2)
        return dict(zip(labels, maps.cpu()))

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

    def loss(self, pixels: torch.Tensor, labels: list, prompt=None, mask: str = "label") -> torch.Tensor:
        """The official objective: mean cross-entropy of the text under the non-causal label mask.

        pixels [B, 3, S, S]; labels: one list of label strings per image, used in the order given.
        prompt: the prompt of every row or one per row (default: the config's, as at inference).
        mask: "label" (the official mask) or "causal" (a plain language model over the same text,
        for comparison).
        """
        tok = self._need_tokenizer()
        if len(labels) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(labels)} label lists")
        if any(len(ls) == 0 for ls in labels):
            raise ValueError("every image needs at least one label")
        for label in (label for ls in labels for label in ls):
            if not label.strip() or "," in label:
                raise ValueError(f"label {label!r} is empty or holds the delimiter ','; give one object name per label")
        if mask not in ("label", "causal"):
            raise ValueError(f"mask must be 'label' or 'causal', got {mask!r}")
        n_image, max_seq_len = self.config.vision.n_patches, self.config.language.max_seq_len
        prompt = self.config.prompt if prompt is None else prompt
        tokens, targets = training_batch(tok, prompt, labels, n_image, max_seq_len)
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        image = self.image_tokens(pixels)
        # padding (-1) selects the last row, <|empty|>, as in the official code
        text = self.language_decoder.tok_embeddings(tokens % self.config.language.vocab_size)
        x = torch.cat([image, text], dim=1)  # [B, max_seq_len, D]
        if mask == "label":
            input_tokens = torch.cat([tokens.new_full((tokens.shape[0], n_image), -1), tokens], dim=1)
            attend = masks.label_mask(input_tokens.cpu(), n_image, tok.answer_id, tok.delimiter_id)
        else:
            attend = masks.prefix_mask(max_seq_len, n_image)
        logits = self.language_decoder(x, attend.to(self.device))
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=tok.pad_id
        )
