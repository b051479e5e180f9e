"""ONNX export of the cached sampler (cache.py), and an onnxruntime engine that samples with it.

    python -m nxtp_minimal export onnx --weights W [--tokenizer T] --out DIR [--dtype float32|float16]

writes three graphs, each with its weights beside it as ONNX external data (`*.onnx.data`: the released
model is past protobuf's 2 GB limit), and `nxtp.json`, which holds what a runner in any language needs:

    vision.onnx   pixels [B, 3, S, S] float32 -> image [B, P, D]: the projected patch tokens
    prefill.onnx  image [B, P, D], prompt [n] ids -> logits [B, V] at the answer position,
                  keys.i, values.i [B, H, L, hd] of every block i, L = P + n
    step.onnx     tokens [B, m] (the newest token of m branches per image), positions [m], mask
                  [B, 1, m, C] bool, columns [B, m], keys.i, values.i [B, H, C, hd] (the cache, C = L + k * T)
                  -> logits [B, m, V], new_keys.i, new_values.i [B, H, m, hd]

step.onnx returns only the new keys and values, which the runner writes into its cache at `columns`:
returning the whole updated cache instead copies all of it out of onnxruntime at every step (see README,
"ONNX"). Both decoder graphs run `Decoder.blocks`, the PyTorch decoder's own code, with the rotary table
inside them; masks and columns come from `cache.plan_step`, as for the PyTorch decoder. The official export (kaiyuyue/nxtp src/onnx_engine.py)
has no cache: its decoder graph re-runs the whole sequence of every branch at every step.
"""

import argparse
import hashlib
import importlib
import json
import logging
import os
import shutil
import warnings

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .. import cache, inference, masks, sampling
from ..config import NXTPConfig
from ..model import NXTP
from ..tokenizer import Tokenizer
from .errors import DTYPES, UserError, check_exists

GRAPHS = ("vision", "prefill", "step")
META = "nxtp.json"
FORMAT = "nxtp-onnx"
INSTALL = "the ONNX engine needs onnxruntime (and export needs onnx and onnxscript): pip install -e .[onnx]"


def require(module: str):
    """`import module`, or a UserError that says how to install the onnx extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(INSTALL) from None


# --- the graphs: this package's modules, traced by torch.export ---


class _GraphCache(cache.KVCache):
    """One block's cache inside a graph: its keys and values are graph inputs, and it keeps the newest
    keys and values, which the graph returns."""

    def __init__(self, keys=None, values=None):
        self.keys, self.values = keys, values

    def prefill(self, k, v):
        self.new = k, v
        return k, v

    def append(self, k, v, columns):
        self.new = k, v
        return super().append(k, v, columns)


class Vision(nn.Module):
    def __init__(self, model: NXTP):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model.image_tokens(pixels)


class Prefill(nn.Module):
    def __init__(self, model: NXTP):
        super().__init__()
        self.decoder, self.n_image = model.language_decoder, model.config.vision.n_patches

    def forward(self, image, prompt):
        text = self.decoder.tok_embeddings(prompt).expand(image.shape[0], -1, -1)
        x = torch.cat([image, text], dim=1)  # [B, L, D], as NXTP.prefix
        caches = [_GraphCache() for _ in self.decoder.layers]
        L = x.shape[1]
        h, _ = self.decoder.blocks(x, torch.arange(L), masks.prefix_mask(L, self.n_image), caches)
        # [:, -1:] keeps h 3-D, so the output layer exports as in step.onnx and its weights are stored once
        logits = self.decoder.output(h[:, -1:])[:, 0]  # [B, V]
        return logits, [c.new[0] for c in caches], [c.new[1] for c in caches]


class Step(nn.Module):
    def __init__(self, model: NXTP):
        super().__init__()
        self.decoder = model.language_decoder

    def forward(self, tokens, positions, mask, columns, keys, values):
        caches = [_GraphCache(k.clone(), v.clone()) for k, v in zip(keys, values)]
        h, _ = self.decoder.blocks(self.decoder.tok_embeddings(tokens), positions, mask, caches, columns)
        return self.decoder.output(h), [c.new[0] for c in caches], [c.new[1] for c in caches]


def _names(prefix: str, n: int) -> list:
    return [f"{prefix}keys.{i}" for i in range(n)] + [f"{prefix}values.{i}" for i in range(n)]


def _graphs(model: NXTP) -> dict:
    """name -> (module, example inputs, input names, output names, dynamic axes) of each graph.

    Example sizes: 2 images, an 8-id prompt, 3 rows, a cache of 3 branches x 4 slots; all are dynamic axes.
    """
    v, lang, dtype = model.config.vision, model.config.language, model.dtype
    B, n, m = 2, 8, 3
    L = v.n_patches + n
    S = L + 3 * 4
    batch, prompt, rows, columns = (torch.export.Dim(name) for name in ("batch", "prompt", "rows", "columns"))
    # one tensor per block and per input: torch.export would take a tensor passed twice for one input
    kv = [[torch.zeros(B, lang.n_heads, S, lang.head_dim, dtype=dtype) for _ in range(lang.n_layers)] for _ in "kv"]
    per_block = [{0: batch, 2: columns}] * lang.n_layers
    prefill_inputs = torch.zeros(B, v.n_patches, lang.dim, dtype=dtype), torch.zeros(n, dtype=torch.long)
    step_inputs = (torch.zeros(B, m, dtype=torch.long), torch.full((m,), L), torch.ones(B, 1, m, S, dtype=torch.bool),
                   torch.full((B, m), L), *kv)
    return {
        "vision": (Vision(model), (torch.zeros(B, 3, v.image_size, v.image_size),), ["pixels"], ["image"],
                   ({0: batch},)),
        "prefill": (Prefill(model), prefill_inputs, ["image", "prompt"], ["logits", *_names("", lang.n_layers)],
                    ({0: batch}, {0: prompt})),
        "step": (Step(model), step_inputs, ["tokens", "positions", "mask", "columns", *_names("", lang.n_layers)],
                 ["logits", *_names("new_", lang.n_layers)],
                 ({0: batch, 1: rows}, {0: rows}, {0: batch, 2: rows, 3: columns}, {0: batch, 1: rows}, per_block,
                  per_block)),
    }


def export(model: NXTP, directory, prompt_ids=None) -> None:
    """Write the three graphs of `model` (in its dtype) and nxtp.json to `directory`.

    prompt_ids: the inference prompt's ids (default: from the model's tokenizer; without either, a runner
    must be given the ids).
    """
    require("onnxscript")  # torch.onnx's exporter translates with it
    tok = model.tokenizer
    prompt_ids = model.prompt_ids() if prompt_ids is None and tok is not None else prompt_ids
    os.makedirs(directory, exist_ok=True)
    graphs = _graphs(model)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # notices about torchvision's absent operators
    for name in tqdm(GRAPHS, desc="export"):
        module, args, inputs, outputs, dynamic = graphs[name]
        path = os.path.join(directory, f"{name}.onnx")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and axis-naming notices
            torch.onnx.export(module.eval(), args, path, dynamo=True, external_data=True, verbose=False,
                              input_names=inputs, output_names=outputs, dynamic_shapes=dynamic)
    _share_decoder(directory)
    if tok is not None:
        shutil.copyfile(tok.path, os.path.join(directory, "tokenizer.model"))
    meta = dict(
        format=FORMAT, config=model.config.to_dict(), dtype=str(model.dtype).removeprefix("torch."),
        prompt_ids=prompt_ids, delimiter_id=None if tok is None else tok.delimiter_id,
        eos_id=None if tok is None else tok.eos_id, max_tokens=sampling.MAX_TOKENS,
        tokenizer=None if tok is None else "tokenizer.model",
    )
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=1)


def _share_decoder(directory) -> None:
    """Write the decoder's weights once, to decoder.onnx.data, for prefill.onnx and step.onnx.

    The exporter writes each graph's weights to its own file, in its own order and under its own names,
    so tensors are matched by their bytes. One file halves the export on disk, and onnxruntime
    memory-maps it, so the two sessions share one copy in memory (`_session`).
    """
    onnx = require("onnx")
    shared, at = os.path.join(directory, "decoder.onnx.data"), {}  # sha256 -> (offset, length) in `shared`
    with open(shared, "wb") as out:
        for name in ("prefill", "step"):
            path = os.path.join(directory, f"{name}.onnx")
            graph = onnx.load(path, load_external_data=False)
            with open(f"{path}.data", "rb") as data:
                for tensor in graph.graph.initializer:
                    if tensor.data_location != onnx.TensorProto.EXTERNAL:
                        continue
                    entry = {e.key: e for e in tensor.external_data}
                    data.seek(int(entry["offset"].value))
                    blob = data.read(int(entry["length"].value))
                    digest = hashlib.sha256(blob).digest()
                    if digest not in at:
                        at[digest] = out.tell(), len(blob)
                        out.write(blob)
                    entry["location"].value = os.path.basename(shared)
                    entry["offset"].value, entry["length"].value = (str(x) for x in at[digest])
            onnx.save(graph, path)
            os.remove(f"{path}.data")


# --- the runner: onnxruntime sessions plugged into cache.CachedSampler ---


def _session(path, prepack=True):
    """prepack=False keeps the weights where onnxruntime memory-maps them, shared by the decoder's two
    sessions; prepacking gives each session its own rearranged copy of every matrix."""
    onnxruntime = require("onnxruntime")
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    try:
        return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own classes for a damaged graph or missing weights
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"onnxruntime cannot load {path} ({reason}); export the model again") from None


def _shapes(session) -> dict:
    """name -> declared shape (ints for fixed axes, names for dynamic ones) of a session's inputs and outputs."""
    return {x.name: x.shape for x in session.get_inputs() + session.get_outputs()}


class OnnxNXTP:
    """An exported model in onnxruntime, with the methods of `NXTP` that predicting labels uses.

    Tensors cross into the sessions as numpy arrays; the per-image cache is one numpy array of keys
    and one of values per block, [B, H, L + k * T, hd], which every step reads and writes at `columns`.
    """

    def __init__(self, directory):
        require("onnxruntime")
        hint = "Export one with: python -m nxtp_minimal export onnx --weights W --tokenizer T --out DIR"
        directory = check_exists(directory, "ONNX export folder", hint)
        meta_path = check_exists(os.path.join(directory, META), "ONNX export description", hint)
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
            self.config = NXTPConfig.from_dict(meta["config"])
            self.prompt, self.delimiter_id, tokenizer = meta["prompt_ids"], meta["delimiter_id"], meta["tokenizer"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{meta_path} is not an NXTP ONNX export description ({e!r}); {hint}") from None
        self.tokenizer = None
        if tokenizer is not None:
            self.tokenizer = Tokenizer(os.path.join(directory, tokenizer), self.config.special_tokens)
        paths = [check_exists(os.path.join(directory, f"{name}.onnx"), "ONNX graph", hint) for name in GRAPHS]
        self.vision, self.prefill, self.step = (_session(p, name == "vision") for p, name in zip(paths, GRAPHS))
        self._check_fit(directory)

    def _check_fit(self, directory):
        """The graphs' fixed axes against nxtp.json's config, and the tokenizer's ids: one line if they differ."""
        v, lang = self.config.vision, self.config.language
        image = ["batch", v.n_patches, lang.dim]
        cache_kv = {name: ["batch", lang.n_heads, "columns", lang.head_dim] for name in _names("", lang.n_layers)}
        expected = {
            self.vision: {"pixels": ["batch", 3, v.image_size, v.image_size], "image": image},
            self.prefill: {"image": image, "logits": ["batch", lang.vocab_size]} | cache_kv,
            self.step: {"logits": ["batch", "rows", lang.vocab_size]} | cache_kv,
        }
        for session, shapes in expected.items():
            got = _shapes(session)
            for name, shape in shapes.items():
                fixed = [(a, b) for a, b in zip(got.get(name, []), shape) if isinstance(b, int)]
                if name not in got or len(got[name]) != len(shape) or any(a != b for a, b in fixed):
                    raise ValueError(
                        f"the graphs in {directory} do not fit its {META}: {name} is {got.get(name)}, the config "
                        f"gives {shape}; export the model again"
                    )
        if self.tokenizer is not None and self.tokenizer.n_words != lang.vocab_size:
            raise ValueError(f"{directory}: the tokenizer gives {self.tokenizer.n_words} ids, the graphs "
                             f"{lang.vocab_size}; export the model again")

    # the text side is the PyTorch model's (inference.py): it uses only `config`, `tokenizer`, `sampler`
    device = torch.device("cpu")
    need_tokenizer = NXTP.need_tokenizer
    prompt_ids = NXTP.prompt_ids

    def sampler(self, pixels, k: int, prompt_ids=None, steps=sampling.MAX_TOKENS - 1, attention=False):
        """A `cache.CachedSampler` over the graphs, as `NXTP.sampler`."""
        if attention:
            raise UserError("the ONNX graphs do not return attention: use the PyTorch model for attention maps")
        prompt_ids = self.prompt if prompt_ids is None else prompt_ids
        if prompt_ids is None:
            raise ValueError("this export has no tokenizer, so give prompt ids (or export with --tokenizer)")
        image = self.vision.run(None, {"pixels": inference.pixels(self, pixels).float().numpy()})[0]
        first, *kv = self.prefill.run(None, {"image": image, "prompt": np.asarray(prompt_ids, dtype=np.int64)})
        B, _, L, _ = kv[0].shape
        return cache.CachedSampler(B, L, k, steps, _OnnxEngine(self.step, first, kv, k * steps))

    def predict(self, images, k: int = 10) -> list:
        """For each image, a list of (label, probability), highest first, as `NXTP.predict`."""
        return inference.predict(self, images, k, decode="dynamic")


class _OnnxEngine:
    """step.onnx behind a `cache.CachedSampler`: the cache is one numpy array of keys and one of values
    per block, [B, H, L + k * T, hd], which every step reads and writes at `columns`."""

    def __init__(self, step, first, kv, slots):
        B, H, _, hd = kv[0].shape
        self.session, self.first = step, torch.from_numpy(first)
        self.cache = [np.concatenate([x, np.zeros((B, H, slots, hd), x.dtype)], axis=2) for x in kv]
        self.names, self.images = _names("", len(kv) // 2), np.arange(B)[:, None]

    def prefill(self):
        return self.first

    def append(self, tokens, position, mask, columns):
        feed = dict(tokens=tokens.numpy(), positions=np.full(tokens.shape[1], position), mask=mask.numpy(),
                    columns=columns.numpy())
        logits, *new = self.session.run(None, feed | dict(zip(self.names, self.cache)))
        for c, x in zip(self.cache, new):
            c[self.images, :, feed["columns"]] = x.transpose(0, 2, 1, 3)  # [B, m, H, hd] at its columns
        return torch.from_numpy(logits)


def main(argv=None) -> None:
    from ..weights.format import load

    p = argparse.ArgumentParser(prog="python -m nxtp_minimal export", description="Export NXTP for onnxruntime.")
    p.add_argument("format", choices=["onnx"])
    p.add_argument("--weights", required=True, help="NXTP safetensors file")
    p.add_argument("--tokenizer", help="SentencePiece model that goes with --weights (copied into --out)")
    p.add_argument("--out", required=True, help="folder for the graphs, their weights and nxtp.json")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    args = p.parse_args(argv)
    model = load(args.weights, args.tokenizer, dtype=DTYPES[args.dtype])
    export(model, args.out)
    print(f"wrote {', '.join(f'{name}.onnx' for name in GRAPHS)} and {META} to {args.out}")
