"""From images to ranked labels: everything NXTP does around the network at inference.

Images come in as file paths, PIL images or pixels; ranked text goes out. Every function takes the
model first and uses only its `config`, `tokenizer` and samplers, so the ONNX runner
(tools/onnx_engine.py) goes through the same code; only `label_pass` (the gradient read-out of
`attention_maps`) differentiates through the network itself. The official recompute-everything loop is kept
here as the reference the cached samplers are tested against.
"""

import os
from dataclasses import dataclass

import torch
from PIL import Image

from . import masks, sampling
from .preprocess import load_image, preprocess

DECODES = ("dynamic", "static")


def default_decode(device) -> str:
    """The faster sampler where it runs: fixed shapes, captured, on a GPU; dynamic shapes on a CPU,
    where every branch fed costs compute (README, performance page)."""
    return "static" if torch.device(device).type == "cuda" else "dynamic"


def pixels(model, images) -> torch.Tensor:
    """What `predict` accepts (a PIL image, a file path, a list of those, or [B, 3, S, S] pixels) as
    [B, 3, S, S] float32."""
    size = model.config.vision.image_size
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


class ReferenceSampler:
    """The official loop (kaiyuyue/nxtp src/infer.py with src/decoding.py), kept as the reference:
    every step re-runs image tokens, prompt and all sampled tokens of every branch, with no cache."""

    @torch.inference_mode()
    def __init__(self, model, pixels, k: int, prompt_ids=None):
        self.decoder, self.n_image = model.language_decoder, model.config.vision.n_patches
        x = model.prefix(pixels, prompt_ids)  # [B, L, D]
        self.first = self.decoder(x, masks.prefix_mask(x.shape[1], self.n_image, x.device), last_only=True)
        self.x = x.repeat_interleave(k, dim=0)  # [B * k, L, D]: every branch carries its own copy

    @torch.inference_mode()
    def step(self, tokens, live):
        seq = torch.cat([self.x, self.decoder.tok_embeddings(tokens)], dim=1)
        return self.decoder(seq, masks.prefix_mask(seq.shape[1], self.n_image, seq.device), last_only=True)


@torch.inference_mode()
def sample(model, pixels, k: int, prompt_ids=None, delimiter_id=None, fast=True, max_tokens=sampling.MAX_TOKENS,
           attention=False, decode=None, autocast=None):
    """Branch tokens and probabilities [B, k, T] plus the first-step logits [B, V].

    Ids can be given instead of read from the tokenizer, so the port can be checked without it.
    fast=False runs the official loop. decode: "dynamic" (cache.CachedSampler) or "static"
    (cache.StaticSampler, captured on CUDA); default by device, see `default_decode`.
    attention=True (dynamic sampler) adds a fourth result: per branch, the attention of each of its
    tokens to the image patches, [B, k, T - 1, blocks, heads, grid, grid] (see `label_maps`).
    autocast: a half-precision dtype to run the network under torch.autocast, the official regime
    (kaiyuyue/nxtp src/infer.py: float16 weights under float16 autocast on a GPU).
    """
    delimiter_id = model.need_tokenizer().delimiter_id if delimiter_id is None else delimiter_id
    decode = default_decode(model.device) if decode is None else decode
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
    # no cast cache: a captured CUDA graph must not point at casts freed when the context ends
    with torch.autocast(torch.device(model.device).type, autocast, enabled=autocast is not None, cache_enabled=False):
        return _sample(model, pixels, k, prompt_ids, delimiter_id, fast, max_tokens, attention, decode)


def _sample(model, pixels, k, prompt_ids, delimiter_id, fast, max_tokens, attention, decode):
    if fast and decode == "static" and not attention:
        sampler = model.static_sampler(pixels, k, prompt_ids, max_tokens - 1)
        tokens, probs = sampling.one_shot_fixed(sampler.first, sampler.step, k, delimiter_id, max_tokens)
    else:
        sampler = model.sampler(pixels, k, prompt_ids, max_tokens - 1, attention) if fast else \
            ReferenceSampler(model, pixels, k, prompt_ids)
        tokens, probs = sampling.one_shot(sampler.first, sampler.step, k, delimiter_id, max_tokens)
    if not torch.isfinite(probs).all():
        raise ValueError(
            "the model's outputs are not finite numbers (NaN or inf): check the weights file (a corrupt or "
            "badly converted file gives this) and the dtype (float16 on a CPU overflows: use float32)"
        )
    if not attention:
        return tokens, probs, sampler.first
    grid = model.config.vision.grid
    return tokens, probs, sampler.first, sampler.engine.attention.unflatten(-1, (grid, grid))


def predict(model, images, k: int = 10, fast: bool = True, decode: str = None, autocast=None) -> list:
    """For each image, a list of (label, probability), highest first.

    images: a PIL image, a file path, a list of those, or preprocessed pixels [B, 3, S, S].
    fast=False runs the official recompute-everything loop (same answers, much slower).
    """
    model.need_tokenizer()
    tokens, probs, _ = sample(model, pixels(model, images), k, fast=fast, decode=decode, autocast=autocast)
    return [rank(model, t, p) for t, p in zip(tokens, probs)]


def rank(model, tokens, probs) -> list:
    """One image's branches, tokens and probs [k, T], as ranked (label, probability) pairs."""
    tok = model.need_tokenizer()
    branches = sampling.branch_labels(tokens, probs, tok.delimiter_id)
    return sampling.rank(branches, tok.decode, tok.decode([tok.delimiter_id]))


def label_maps(model, tokens, probs, attention) -> dict:
    """One image's `sample(..., attention=True)` results -> label -> [blocks, heads, grid, grid].

    Like `attention_maps`, from each label's last token; where several branches wrote the same label,
    the map of the highest-scoring one.
    """
    tok = model.need_tokenizer()
    best = {}
    for i, (ids, score) in enumerate(sampling.branch_labels(tokens, probs, tok.delimiter_id)):
        label = sampling.label_text(ids, tok.decode, tok.decode([tok.delimiter_id]))
        last = len(ids) - 2 if ids[-1] == tok.delimiter_id else len(ids) - 1  # the delimiter's predictor
        last = min(max(last, 0), attention.shape[1] - 1)
        if label not in best or score > best[label][0]:
            best[label] = (score, attention[i, last])
    return {label: m / m.sum(dim=(-2, -1), keepdim=True) for label, (_, m) in best.items()}


READOUTS = {  # what `attention_maps` can draw, in words for captions (lesson 13 compares them)
    "last": "attention of each label's last token",
    "gradient": "gradient-weighted attention (attention x gradient of the label's log-probability, Chefer et al.)",
}


def attention_maps(model, image, labels: list, readout: str = "last") -> dict:
    """Where each label looks: label -> a map over the image patches [blocks, heads, grid, grid], each summing to 1.

    image: what `predict` takes, for one image; a label named twice is answered once.
    readout "last": each label is fed after the prompt as a branch would write it; the map is the attention of
    its last token (the position that predicts the delimiter, so it has read the whole label) to the image
    patches, renormalised over the patches. It shows where the image's objects are more than which one the
    label names (lessons 09 and 13).
    readout "gradient": gradient-weighted attention (`gradient_weighted`), one map per label, [1, 1, grid, grid]:
    in lesson 13 its peak falls in the named object's box far more often than in another object's box.
    """
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    tok = model.need_tokenizer()
    labels = list(dict.fromkeys(labels))
    if not labels or any(not label.strip() for label in labels):
        raise ValueError(f"attention_maps needs at least one non-empty label, got {labels!r}")
    x = pixels(model, image)
    if x.shape[0] != 1:
        raise ValueError(f"attention_maps takes one image, got {x.shape[0]}")
    grid = model.config.vision.grid
    if readout == "gradient":
        maps = gradient_weighted(label_pass(model, x, [labels]))  # [labels, P]
        total = maps.sum(-1, keepdim=True)
        maps = torch.where(total > 0, maps / total.clamp(min=1e-30), 1 / maps.shape[-1])  # nothing positive: uniform
        return dict(zip(labels, maps[:, None, None].unflatten(-1, (grid, grid)).cpu()))
    with torch.inference_mode():
        ids = [tok.encode(label) for label in labels]
        n = max(map(len, ids))
        sampler = model.sampler(x, len(labels), steps=n, attention=True)
        tokens = torch.tensor([i + [tok.delimiter_id] * (n - len(i)) for i in ids], device=model.device)
        lengths = torch.tensor([len(i) for i in ids], device=model.device)
        for t in range(1, n + 1):  # feed label token t - 1 of every label that has one
            sampler.step(tokens[:, :t], t <= lengths)
        last = sampler.engine.attention[0, torch.arange(len(labels)), lengths - 1]  # [labels, blocks, H, P]
        maps = (last / last.sum(dim=-1, keepdim=True)).unflatten(-1, (grid,) * 2)
    return dict(zip(labels, maps.cpu()))


@dataclass
class LabelPass:
    """One uncached pass of N label rows: image tokens, prompt, a label's tokens, the delimiter (then padding).

    attention, gradient: per block [N, H, S, S] float32 on the CPU, the probabilities and the gradient of each
    row's label log-probability with respect to them; image_of [N]: the image of each row; lengths [N]: the
    label's token count; prefix: L, image tokens + prompt (the label's first token sits at position L);
    logp [N]: each label's log-probability (its tokens and the delimiter).
    """

    attention: list
    gradient: list
    image_of: torch.Tensor
    lengths: torch.Tensor
    prefix: int
    n_image: int
    logp: torch.Tensor

    def rows(self, which: str) -> torch.Tensor:
        """[N] the position of each label's "first" token, "last" token or "delimiter"."""
        offset = {"first": 0, "last": self.lengths - 1, "delimiter": self.lengths}[which]
        return self.prefix + offset + torch.zeros_like(self.lengths)


def label_pass(model, pixels, labels: list) -> LabelPass:
    """The labels of every image (pixels [B, 3, S, S], labels: one list per image) in one uncached pass.

    Row (image b, label j) holds image b's tokens, the prompt, label j's tokens and the delimiter, padded with
    delimiters to the longest label (the prefix mask is causal over the text, so padding changes no earlier
    row). Its label log-probability is the sum over the label's tokens and the delimiter, each predicted by the
    row before it: the answer row predicts the first token, the label's last token the delimiter.
    """
    tok = model.need_tokenizer()
    if len(labels) != pixels.shape[0] or any(len(ls) == 0 for ls in labels):
        raise ValueError("label_pass needs one non-empty list of labels per image")
    ids = [tok.encode(label) for ls in labels for label in ls]
    image_of = torch.tensor([b for b, ls in enumerate(labels) for _ in ls])
    lengths = torch.tensor([len(i) for i in ids])
    n = int(lengths.max()) + 1  # the label and its delimiter
    d, n_image = model.language_decoder, model.config.vision.n_patches
    # the gradient needs autograd, also when the caller runs under inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        text = torch.tensor([i + [tok.delimiter_id] * (n - len(i)) for i in ids], device=model.device)  # [N, n]
        with torch.no_grad():
            prefix = model.prefix(pixels.clone(), model.prompt_ids())[image_of.to(model.device)]  # [N, L, D]
            x = torch.cat([prefix, d.tok_embeddings(text)], dim=1)  # [N, S, D]
        L, S = prefix.shape[1], x.shape[1]
        x.requires_grad_(True)  # so that the attention probabilities are in the graph; the weights stay as they are
        h, probs = d.blocks(x, torch.arange(S, device=x.device), masks.prefix_mask(S, n_image, x.device),
                            need_weights=True)
        logp = d.output(h[:, L - 1 : S - 1]).log_softmax(-1).gather(-1, text[:, :, None])[..., 0]  # [N, n]
        counted = torch.arange(n, device=x.device) <= lengths.to(x.device)[:, None]  # the label and one delimiter
        gradient = torch.autograd.grad((logp * counted).sum(), probs)  # rows are independent: one backward
    return LabelPass([p.detach().float().cpu() for p in probs], [g.float().cpu() for g in gradient], image_of,
                     lengths, L, n_image, (logp * counted).sum(1).detach().float().cpu())


def gradient_weighted(rec: LabelPass, rollout: bool = True) -> torch.Tensor:
    """[N, P]: the relevance of each image patch for each row's label (Chefer et al., "Generic Attention-model
    Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021).

    Per block, A_bar = mean over heads of (gradient * attention) clipped at 0 ([N, S, S]); with rollout, R = I
    and R = R + A_bar R block after block, else R = the sum of the blocks' A_bar. The map sums R over the rows
    that predict the label's tokens and the delimiter (the answer row .. the last token), at the image columns.
    """
    N, _, S, _ = rec.attention[0].shape
    R = torch.eye(S).expand(N, S, S).clone() if rollout else torch.zeros(N, S, S)
    for a, g in zip(rec.attention, rec.gradient):
        weighted = (a * g).clamp(min=0).mean(1)  # [N, S, S]
        R = R + weighted @ R if rollout else R + weighted
    position = torch.arange(S)
    predicting = (position >= rec.prefix - 1) & (position[None] < (rec.prefix + rec.lengths)[:, None])  # [N, S]
    return (R[..., : rec.n_image] * predicting[..., None]).sum(1)


@torch.inference_mode()
def decode_list(model, images, method: str = "greedy", k: int = 1, max_tokens: int = 40) -> list:
    """For each image, the label list decoded as one sentence, in the order written (repeats kept).

    The alternatives to one-shot sampling (lessons 04 and 10): method "greedy" takes the most
    likely token at every step; "beam" keeps the k most likely sequences. Both stop at eos.
    """
    tok = model.need_tokenizer()
    x = pixels(model, images)
    if method == "greedy":
        sampler = model.sampler(x, 1, steps=max_tokens - 1)
        tokens = sampling.one_shot(sampler.first, sampler.step, 1, tok.eos_id, max_tokens)[0][:, 0]
    elif method == "beam":
        sampler = model.sampler(x, k, steps=max_tokens - 1)
        tokens = sampling.beam(sampler.first, sampler.step, k, tok.eos_id, max_tokens, sampler.reorder)
    else:
        raise ValueError(f"method must be 'greedy' or 'beam', got {method!r}")
    return [sampling.split_labels(t.tolist(), tok.delimiter_id, tok.eos_id, tok.decode) for t in tokens]
