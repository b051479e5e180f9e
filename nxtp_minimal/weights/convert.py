"""Official files -> one NXTP safetensors file (weights/README.md): the merge and the write.

    python -m nxtp_minimal convert nxtp  --checkpoint CKPT.pth --clip CLIP --out OUT.safetensors
    python -m nxtp_minimal convert llama --llama DIR --clip CLIP --layers 6 --out OUT.safetensors

CLIP and LLaMA are read by `convert_clip` and `convert_llama`, one reader per foreign format, each with
its name mapping in one visible place. Readers hand back `Lazy` tensors over memory-mapped files, and
`write` streams them to disk one at a time, so converting the 1.78B model holds about one tensor in
memory at once.
"""

import argparse
import json
import math
import os
import struct

import torch
import torch.nn as nn
from tqdm import tqdm

from ..config import LanguageConfig, NXTPConfig, VisionConfig
from ..llama import truncate
from ..model import NXTP
from ..tools.errors import DTYPES, UserError
from .convert_clip import read_clip
from .convert_llama import blocks, multiple_of, read_llama
from .format import check_state_dict, config_from_tensors, metadata, need_tensor
from .readers import Lazy, heads, load_pth, need, now

# --- the official NXTP training checkpoint ---


def nxtp_checkpoint(path) -> dict:
    """The official training checkpoint: a `torch.save` dict whose "model" holds only the trained
    parameters (kaiyuyue/nxtp src/utils.py `save_checkpoint`): the projection, the last CLIP blocks,
    `ln_post` and the whole truncated decoder. The frozen rest of the vision tower is CLIP's."""
    if not os.path.isfile(need(path, "NXTP checkpoint")):
        raise ValueError(f"--checkpoint {path} is a folder; pass the .pth file itself")
    ckpt = load_pth(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise KeyError(
            f"{path} has no \"model\" entry (found {found}); expected an NXTP training checkpoint such as "
            "ckpt_epoch_03_iter_0021360.pth from huggingface.co/kaiyuyue/nxtp"
        )
    # DDP saved the names with a `module.` prefix (official load_checkpoint strips it the same way)
    return {k.removeprefix("module."): now(v) for k, v in ckpt["model"].items()}


def merge(clip: dict, trained: dict, clip_path, ckpt_path) -> dict:
    """The checkpoint's trained tensors over CLIP's frozen ones, which must be the same network.

    What NXTP trains must come from the checkpoint: CLIP's copy of `ln_post` (or of a trained block) is
    the value from before training, and taking it silently would give another model.
    """
    width = clip["vision_encoder.conv1.weight"].shape[0]
    blocks = {k.split(".")[3] for k in trained if k.startswith("vision_encoder.transformer.resblocks.")}
    needed = [f"vision_encoder.{n}" for n in ("proj.weight", "ln_post.weight", "ln_post.bias")] + [
        k for k in clip if k.startswith(tuple(f"vision_encoder.transformer.resblocks.{b}." for b in blocks))]
    missing = [k for k in needed if k not in trained]
    if missing:
        raise KeyError(
            f"{ckpt_path} lacks {missing[:4]}, which NXTP trains (kaiyuyue/nxtp src/utils.py save_checkpoint "
            "keeps them); CLIP's untrained copies would give another model: use a complete checkpoint"
        )
    for name, t in trained.items():
        if name == "vision_encoder.proj.weight":
            expected = torch.Size([t.shape[0], width])
        elif name.startswith("vision_encoder."):
            if name not in clip:
                raise KeyError(f"{ckpt_path} has {name} but the CLIP weights {clip_path} have no such tensor")
            expected = clip[name].shape
        else:
            continue
        if t.shape != expected:
            raise ValueError(
                f"{name} has shape {list(t.shape)} in {ckpt_path} but CLIP {clip_path} implies {list(expected)}: "
                "the checkpoint was trained on another CLIP (the released ones: ViT-L/14 at 224 px)"
            )
    return {**clip, **trained}


# --- the official initialisation of what NXTP adds (official src/functions.py) ---


def grow_tables(tensors: dict, n_new: int, generator: torch.Generator) -> None:
    """Append the special-token rows: embeddings ~ N(0, 1); output rows Kaiming-uniform(a=sqrt(5)),
    except the last, <|empty|> (the padding row), which is zero."""
    emb, out = tensors["tok_embeddings.weight"], tensors["output.weight"]
    new_emb = torch.randn(n_new, emb.shape[1], generator=generator)  # [n_new, D]
    new_out = torch.zeros(n_new, out.shape[1])
    nn.init.kaiming_uniform_(new_out[:-1], a=math.sqrt(5), generator=generator)
    tensors["tok_embeddings.weight"] = _append_rows(emb, new_emb)
    tensors["output.weight"] = _append_rows(out, new_out)


def _append_rows(old: Lazy, new: torch.Tensor) -> Lazy:
    def read():
        t = old.read()
        return torch.cat([t, new.to(t.dtype)])  # [V + n_new, D]

    return Lazy(torch.Size([old.shape[0] + new.shape[0], *old.shape[1:]]), read)


def new_projection(width: int, dim: int, generator: torch.Generator) -> Lazy:
    """NXTP's projection from CLIP width to LLaMA dim, drawn as CLIP draws its own: width**-0.5 * N(0, 1)."""
    return now(width**-0.5 * torch.randn(dim, width, generator=generator))


# --- writing ---

SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def write(path, tensors: dict, config: NXTPConfig, dtype=torch.float16, source="the converted weights") -> NXTPConfig:
    """Check `tensors` against the model `config` describes, then stream them into an NXTP file.

    Sizes come from the shapes, as `nxtp_minimal.load` reads them; the file is written to a temporary
    name and renamed at the end, so a failed conversion leaves no half file.
    """
    path = os.fspath(path)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise FileNotFoundError(f"the folder for --out {path} does not exist")
    shapes = {k: v.shape for k, v in tensors.items()}
    config = config_from_tensors(shapes, config)
    v, lang = config.vision, config.language
    if v.width % v.heads:
        raise ValueError(f"{v.heads} heads (--vision-heads) do not divide the CLIP width {v.width}")
    if lang.dim % (2 * lang.n_heads):
        raise ValueError(f"{lang.n_heads} heads (--llama-heads) do not split dim {lang.dim} into even heads (RoPE turns pairs)")
    with torch.device("meta"):
        model = NXTP(config)
    check_state_dict(model, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, source)
    names, item = sorted(tensors), torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": metadata(config)}, 0
    for name in names:
        size = math.prod(shapes[name]) * item
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + size]
        }
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # safetensors keeps the data 8-byte aligned
    partial = path + ".partial"
    bar = tqdm(total=offset, unit="B", unit_scale=True, desc=f"writing {os.path.basename(path)}")
    with open(partial, "wb") as f, bar:
        f.write(struct.pack("<Q", len(head)) + head)  # safetensors: u64 header length, JSON header, data
        for name in names:
            t = tensors[name].read().detach().to(dtype).contiguous()
            if t.shape != shapes[name]:
                raise RuntimeError(f"{name}: read {list(t.shape)}, announced {list(shapes[name])}")  # a converter bug
            f.write(t.view(-1).view(torch.uint8).numpy().data)
            bar.update(t.numel() * item)
    os.replace(partial, path)
    return config


# --- the two conversions ---


def convert_nxtp(checkpoint, clip, out, dtype=torch.float16, vision_heads=None, llama_heads=None, max_seq_len=512):
    """A released NXTP model: the official checkpoint merged over CLIP's frozen vision weights."""
    trained = nxtp_checkpoint(checkpoint)
    clip_tensors, vision_heads = read_clip(clip, vision_heads)
    tensors = merge(clip_tensors, trained, clip, checkpoint)
    dim = need_tensor(tensors, "language_decoder.tok_embeddings.weight", checkpoint).shape[1]
    hidden = need_tensor(tensors, "language_decoder.layers.0.feed_forward.w1.weight", checkpoint).shape[0]
    language = LanguageConfig(
        n_heads=llama_heads or heads(dim, 128, "--llama-heads"),
        multiple_of=multiple_of(dim, hidden),
        max_seq_len=max_seq_len,
    )
    config = NXTPConfig(VisionConfig(heads=vision_heads), language)
    return write(out, tensors, config, dtype, f"{checkpoint} merged over {clip}")


def convert_llama(
    llama, clip, out, layers=6, dtype=torch.float16, vision_heads=None, llama_heads=None, max_seq_len=512, seed=0
):
    """An untrained NXTP: LLaMA cut to `layers` blocks (NXTP step 5) + CLIP + new rows and projection."""
    source, language = read_llama(llama, llama_heads)
    available = blocks(source)
    if not 1 <= layers <= available:
        raise ValueError(f"--layers {layers}: the LLaMA in {llama} has {available} blocks; keep 1 to {available}")
    decoder = truncate(source, layers)
    for name in ("tok_embeddings.weight", "output.weight"):
        need_tensor(decoder, name, llama)
    config = NXTPConfig(language=language)
    generator = torch.Generator().manual_seed(seed)
    grow_tables(decoder, len(config.special_tokens), generator)
    clip_tensors, config.vision.heads = read_clip(clip, vision_heads)
    config.language.max_seq_len = max_seq_len
    width, dim = clip_tensors["vision_encoder.conv1.weight"].shape[0], decoder["tok_embeddings.weight"].shape[1]
    tensors = {**clip_tensors, **{f"language_decoder.{k}": v for k, v in decoder.items()}}
    tensors["vision_encoder.proj.weight"] = new_projection(width, dim, generator)
    return write(out, tensors, config, dtype, f"{llama} with {clip}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nxtp_minimal convert",
        description="Convert official weights into one NXTP safetensors file (see weights/README.md).",
    )
    sub = p.add_subparsers(dest="source", required=True)
    nxtp = sub.add_parser("nxtp", help="a released NXTP checkpoint (kaiyuyue/nxtp) + CLIP")
    nxtp.add_argument("--checkpoint", required=True, help="ckpt_epoch_03_iter_*.pth")
    llama = sub.add_parser("llama", help="an untrained NXTP from LLaMA-2 + CLIP (the start of training)")
    llama.add_argument(
        "--llama", required=True, help="folder: consolidated.00.pth + params.json, or HF config.json + *.safetensors"
    )
    llama.add_argument("--layers", type=int, default=6, help="decoder blocks to keep (released: 6)")
    llama.add_argument("--seed", type=int, default=0, help="seed for the new rows and the projection")
    for q in (nxtp, llama):
        q.add_argument(
            "--clip", required=True, help="ViT-L-14.pt (OpenAI), its state dict as .safetensors, or a HF CLIP folder"
        )
        q.add_argument("--out", required=True, help="the NXTP .safetensors file to write")
        q.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="default: float16, as trained")
        q.add_argument("--vision-heads", type=int, help="CLIP heads (default: width / 64, or HF config.json)")
        q.add_argument("--llama-heads", type=int, help="LLaMA heads (default: params.json, config.json or dim / 128)")
        q.add_argument("--max-seq-len", type=int, default=512, help="written to the config (official: 512)")
    return p


def main(argv) -> None:
    args = parser().parse_args(argv)
    for flag in ("vision_heads", "llama_heads", "max_seq_len"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive number")
    common = dict(dtype=DTYPES[args.dtype], vision_heads=args.vision_heads, llama_heads=args.llama_heads,
                  max_seq_len=args.max_seq_len)
    if args.source == "nxtp":
        config = convert_nxtp(args.checkpoint, args.clip, args.out, **common)
    else:
        config = convert_llama(args.llama, args.clip, args.out, layers=args.layers, seed=args.seed, **common)
    v, lang = config.vision, config.language
    print(
        f"wrote {args.out}: ViT {v.layers} blocks width {v.width} heads {v.heads}, LLaMA {lang.n_layers} blocks "
        f"dim {lang.dim} heads {lang.n_heads}, vocabulary {lang.vocab_size}, {args.dtype}"
    )
