"""NXTP, the network: a CLIP image encoder feeding a truncated LLaMA decoder that writes object labels.

Files, PIL images, ranking into text and the official reference loop live in inference.py;
`predict` here is the convenience that calls it.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cache, inference, masks, sampling
from .config import NXTPConfig
from .llama import Decoder
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
        self._static = None  # the last StaticSampler, kept so that a captured CUDA graph is replayed

    @property
    def device(self):
        return self.language_decoder.output.weight.device

    @property
    def dtype(self):
        return self.language_decoder.output.weight.dtype

    def need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load it with tokenizer=PATH (see weights/README.md)")
        return self.tokenizer

    # --- the sequence (NXTP steps 1-2) ---

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, P, D]: projected patch tokens; the class token is dropped."""
        return self.vision_encoder(pixels.to(self.device, self.dtype))[:, 1:]

    def prompt_ids(self) -> list:
        return inference_ids(self.need_tokenizer(), self.config.prompt)

    def prefix(self, pixels: torch.Tensor, prompt_ids: list = None) -> torch.Tensor:
        """Decoder input for inference: image tokens then prompt embeddings, [B, P + T, D]."""
        image = self.image_tokens(pixels)
        ids = torch.tensor(self.prompt_ids() if prompt_ids is None else prompt_ids, device=self.device)
        text = self.language_decoder.tok_embeddings(ids).expand(image.shape[0], -1, -1)
        return torch.cat([image, text], dim=1)

    # --- one-shot sampling (NXTP step 4), with the key/value cache of cache.py ---

    @torch.inference_mode()
    def sampler(self, pixels, k: int, prompt_ids=None, steps=sampling.MAX_TOKENS - 1, attention=False):
        """The prefix run once into a key/value cache; `.first` holds the first-step logits [B, V] and
        `.step` feeds the branches still running, for `sampling.one_shot` (at most `steps` times).

        attention=True also keeps how much every fed token attends to every image patch (`.engine.attention`).
        """
        x = self.prefix(pixels, prompt_ids)  # [B, L, D]
        mask = masks.prefix_mask(x.shape[1], self.config.vision.n_patches, x.device)
        n_image = self.config.vision.n_patches if attention else 0
        engine = cache.TorchEngine(self.language_decoder, x, mask, k, steps, n_image)
        return cache.CachedSampler(x.shape[0], x.shape[1], k, steps, engine)

    @torch.inference_mode()
    def static_sampler(self, pixels, k: int, prompt_ids=None, steps=sampling.MAX_TOKENS - 1, capture=None):
        """The same prefix and cache for `sampling.one_shot_fixed`: every step runs all k branches.

        capture (default: on CUDA) records the step once as a CUDA graph; the sampler is kept and reused
        while the batch shape stays the same, so a folder of images is captured once.
        """
        x = self.prefix(pixels, prompt_ids)
        capture = x.is_cuda if capture is None else capture
        shape = (x.shape[0], x.shape[1], k, steps, x.device, x.dtype)
        if self._static is None or self._static.shape != shape or (self._static.graph is not None) != capture:
            self._static = cache.StaticSampler(self.language_decoder, *shape)
            if capture:
                self._static.capture()
        return self._static.prefill(x, masks.prefix_mask(x.shape[1], self.config.vision.n_patches, x.device))

    def predict(self, images, k: int = 10, fast: bool = True, decode: str = None, autocast=None) -> list:
        """For each image, a list of (label, probability), highest first (see `inference.predict`)."""
        return inference.predict(self, images, k, fast, decode, autocast)

    # --- training objective (NXTP step 3) ---

    def loss(self, pixels: torch.Tensor, labels: list, prompt=None, mask: str = "label") -> torch.Tensor:
        """The official objective: mean cross-entropy of the text under the non-causal label mask.

        pixels [B, 3, S, S]; labels: one list of label strings per image, used in the order given.
        prompt: the prompt of every row or one per row (default: the config's, as at inference).
        mask: "label" (the official mask) or "causal" (a plain language model over the same text,
        for comparison).
        """
        tok = self.need_tokenizer()
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
        if not (tokens[-1] == tok.answer_id).any():
            raise ValueError(f"the prompt of the batch's last row has no {tok.decode([tok.answer_id])!r}, where "
                             "the answer starts; end the prompt with it")
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        image = self.image_tokens(pixels)
        # padding (-1) selects the last row, <|empty|>, as in the official code
        text = self.language_decoder.tok_embeddings(tokens % self.config.language.vocab_size)
        x = torch.cat([image, text], dim=1)  # [B, max_seq_len, D]
        if mask == "label":
            input_tokens = torch.cat([tokens.new_full((tokens.shape[0], n_image), -1), tokens], dim=1)
            attend = masks.label_mask(input_tokens, n_image, tok.answer_id, tok.delimiter_id)
        else:
            attend = masks.prefix_mask(max_seq_len, n_image, self.device)
        h, _ = self.language_decoder.blocks(x, torch.arange(max_seq_len, device=self.device), attend)
        # Only text is trained: image positions predict image positions, whose targets are padding.
        logits = self.language_decoder.output(h[:, n_image:-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), targets[:, n_image + 1 :].flatten(), ignore_index=tok.pad_id)
