"""Official files -> one NXTP safetensors file (REFERENCE.md, "Checkpoints"; weights/README.md).

    python -m nxtp_minimal convert nxtp  --checkpoint CKPT.pth --clip CLIP --out OUT.safetensors
    python -m nxtp_minimal convert llama --llama DIR --clip CLIP --layers 6 --out OUT.safetensors

One reader per foreign format, each with its name mapping in one visible place. Readers hand back
`Lazy` tensors (the shape now, the data when written) over memory-mapped files, and `write` streams
them to disk one at a time, so converting the 1.78B model holds about one tensor in memory at once.
"""

import argparse
import glob
import json
import math
import os
import pickle
import re
import struct
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .errors import DTYPES, UserError
from .config import LanguageConfig, NXTPConfig, VisionConfig
from .llama import truncate
from .model import NXTP
from .weights import FORMAT, check_state_dict, config_from_tensors


class Lazy(NamedTuple):
    """A tensor known by its shape now and read (or computed) only when it is written."""

    shape: torch.Size
    read: Callable[[], torch.Tensor]


def _now(t: torch.Tensor) -> Lazy:
    return Lazy(t.shape, lambda: t)


# --- reading files ---


def _need(path, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path} (see weights/README.md for where to get it)")
    return path


def _load_pth(path):
    """A torch.save file, memory-mapped; weights_only refuses to run code hidden in a pickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = f"it refers to {found.group(1)}" if found else _first_sentence(e)
        raise ValueError(
            f"{path} holds Python objects other than tensors, which torch.load(weights_only=True) refuses to "
            f"unpickle ({reason}). Only if you trust the file, keep its tensors: python -c \"import torch; "
            f"c = torch.load('{path}', weights_only=False, map_location='cpu'); "
            f"torch.save({{'model': c['model']}}, 'model_only.pth')\" and convert model_only.pth"
        ) from None
    except RuntimeError as e:
        raise ValueError(
            f"{path} is not a PyTorch checkpoint that can be memory-mapped ({_first_sentence(e)}); "
            "expected a torch.save file (zip format, PyTorch >= 1.6)"
        ) from None


def _first_sentence(e: Exception) -> str:
    return str(e).strip().split("\n")[0].split(". ")[0]


def _load_safetensors(paths) -> dict:
    tensors = {}
    for path in paths:
        try:
            f = safe_open(path, framework="pt")
        except SafetensorError as e:
            raise ValueError(f"{path} is not a safetensors file ({e})") from None
        for key in f.keys():
            tensors[key] = Lazy(torch.Size(f.get_slice(key).get_shape()), lambda f=f, key=key: f.get_tensor(key))
    return tensors


def _read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _heads(width: int, head_dim: int, flag: str) -> int:
    if width % head_dim:
        raise ValueError(
            f"cannot tell the number of heads of width {width} (not a multiple of the usual head size "
            f"{head_dim}); pass {flag}"
        )
    return width // head_dim


def _shape(tensors: dict, name: str, source) -> torch.Size:
    if name not in tensors:
        raise KeyError(f"{source} has no tensor {name!r}")
    return tensors[name].shape


# --- CLIP: OpenAI's archive (or its state dict as safetensors) and Hugging Face's folder ---


def openai_clip_name(key: str):
    """OpenAI CLIP -> NXTP: the visual tower keeps its names under `vision_encoder.`.

    `visual.proj` is CLIP's own class-token projection, which NXTP replaces with its `proj`
    (REFERENCE.md); the text tower and `logit_scale` are not used.
    """
    if key.startswith("visual.") and key != "visual.proj":
        return "vision_encoder." + key[len("visual."):]
    return None


def openai_clip(path, heads=None):
    """OpenAI's TorchScript archive (ViT-L-14.pt), or the same state dict saved as safetensors."""
    if path.endswith(".safetensors"):
        state = _load_safetensors([path])
    else:
        try:
            state = {k: _now(v) for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
        except RuntimeError as e:
            raise ValueError(
                f"{path} is not a TorchScript archive ({_first_sentence(e)}); --clip takes OpenAI's "
                "ViT-L-14.pt, its state dict as .safetensors, or a Hugging Face CLIP folder"
            ) from None
    tensors = {openai_clip_name(k): v for k, v in state.items() if openai_clip_name(k)}
    width = _shape(tensors, "vision_encoder.conv1.weight", f"the CLIP file {path}")[0]
    return tensors, heads or _heads(width, 64, "--vision-heads")


HF_CLIP_NAMES = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm": "ln_pre",  # sic: Hugging Face's spelling
    "post_layernorm": "ln_post",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def hf_clip_name(key: str):
    """Hugging Face CLIP vision key (after `vision_model.`) -> (NXTP name, slot), or None if unused.

    slot is 0, 1, 2 for q, k, v: OpenAI packs them into one `in_proj` (nn.MultiheadAttention's layout).
    """
    block = ""
    if key.startswith("encoder.layers."):
        i, key = key[len("encoder.layers."):].split(".", 1)
        block = f"transformer.resblocks.{i}."
    module, _, param = key.rpartition(".")
    if module in QKV:
        return f"vision_encoder.{block}attn.in_proj_{param}", QKV.index(module)
    if key in HF_CLIP_NAMES:
        return f"vision_encoder.{HF_CLIP_NAMES[key]}", None
    if module in HF_CLIP_NAMES:
        return f"vision_encoder.{block}{HF_CLIP_NAMES[module]}.{param}", None
    return None


def hf_clip(folder, heads=None):
    """A Hugging Face CLIP folder (openai/clip-vit-large-patch14): config.json + *.safetensors."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files or not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face CLIP folder: it needs config.json and model.safetensors "
            "(hf download openai/clip-vit-large-patch14 config.json model.safetensors --local-dir FOLDER)"
        )
    config = _read_json(os.path.join(folder, "config.json"))
    config = config.get("vision_config", config)
    if config.get("hidden_act", "quick_gelu") != "quick_gelu" or config.get("layer_norm_eps", 1e-5) != 1e-5:
        raise ValueError(
            f"{folder}: this CLIP uses hidden_act={config.get('hidden_act')!r}, layer_norm_eps="
            f"{config.get('layer_norm_eps')}; the port's vision encoder is OpenAI's (quick_gelu, 1e-5)"
        )
    state = _load_safetensors(files)
    # CLIPModel files prefix the tower with `vision_model.`; CLIPVisionModel files may not
    anchor = "embeddings.patch_embedding.weight"
    prefix = next((k[: -len(anchor)] for k in state if k.endswith(anchor)), None)
    if prefix is None:
        raise KeyError(f"{folder} holds no CLIP vision tower (no tensor ending in {anchor!r})")
    tensors, packed = {}, {}
    for key, t in state.items():
        target = key.startswith(prefix) and hf_clip_name(key[len(prefix):])
        if not target:
            continue
        name, slot = target
        if slot is None:
            tensors[name] = t
        else:
            packed.setdefault(name, [None] * 3)[slot] = t
    for name, (q, k, v) in packed.items():
        if None in (q, k, v):
            raise KeyError(f"{folder}: q, k or v missing for {name}")
        shape = torch.Size([q.shape[0] + k.shape[0] + v.shape[0], *q.shape[1:]])
        tensors[name] = Lazy(shape, lambda q=q, k=k, v=v: torch.cat([q.read(), k.read(), v.read()]))
    width = _shape(tensors, "vision_encoder.conv1.weight", folder)[0]
    return tensors, heads or config.get("num_attention_heads") or _heads(width, 64, "--vision-heads")


def read_clip(path, heads=None):
    """CLIP's vision tower in NXTP names, and its number of heads."""
    path = _need(path, "CLIP weights")
    return hf_clip(path, heads) if os.path.isdir(path) else openai_clip(path, heads)


# --- LLaMA: Meta's folder and Hugging Face's folder, both read into Meta's names ---


def _blocks(names) -> int:
    return len({k.split(".")[1] for k in names if k.startswith("layers.")})


def meta_llama(folder):
    """Meta's LLaMA-2 folder: consolidated.00.pth + params.json. Meta names are the port's names."""
    shards = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not shards or not os.path.isfile(os.path.join(folder, "params.json")):
        raise FileNotFoundError(f"{folder} is not a Meta LLaMA folder (consolidated.00.pth + params.json)")
    if len(shards) > 1:
        raise ValueError(f"{folder} holds {len(shards)} model-parallel shards; NXTP starts from LLaMA-2 7B (one)")
    params = _read_json(os.path.join(folder, "params.json"))
    if params.get("n_kv_heads", params["n_heads"]) != params["n_heads"]:
        raise ValueError(f"{folder}: grouped-query attention (n_kv_heads) is not supported by the port")
    state = _load_pth(shards[0])
    tensors = {k: _now(v) for k, v in state.items() if k != "rope.freqs"}  # rope.freqs: recomputed
    config = LanguageConfig(
        n_heads=params["n_heads"],
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
    )
    return tensors, config


HF_LLAMA_NAMES = {
    "model.embed_tokens": "tok_embeddings",
    "model.norm": "norm",
    "lm_head": "output",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def hf_llama_name(key: str):
    """Hugging Face LLaMA -> Meta name, or None if unused."""
    block = ""
    if key.startswith("model.layers."):
        i, key = key[len("model.layers."):].split(".", 1)
        block = f"layers.{i}."
    module, _, param = key.rpartition(".")
    return f"{block}{HF_LLAMA_NAMES[module]}.{param}" if module in HF_LLAMA_NAMES else None


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face q/k rows -> Meta's. Rotate-half RoPE turns row pairs (j, j + hd/2) of each head,
    Meta's turns (2j, 2j + 1), so HF's converter moved each head's even rows first, odd rows after.
    Put them back: row j -> 2j, row hd/2 + j -> 2j + 1."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_llama(folder, heads=None):
    """A Hugging Face LLaMA folder (meta-llama/Llama-2-7b-hf): config.json + *.safetensors shards."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder} has config.json but no *.safetensors weights")
    config = _read_json(os.path.join(folder, "config.json"))
    n_heads = heads or config["num_attention_heads"]
    if config.get("num_key_value_heads", n_heads) != n_heads:
        raise ValueError(f"{folder}: grouped-query attention (num_key_value_heads) is not supported by the port")
    if config.get("rope_scaling"):
        raise ValueError(f"{folder}: rope_scaling {config['rope_scaling']} is not supported by the port")
    tensors = {}
    for key, t in _load_safetensors(files).items():
        name = hf_llama_name(key)
        if name and name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = Lazy(t.shape, lambda t=t: unpermute(t.read(), n_heads))
        if name:
            tensors[name] = t
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return tensors, LanguageConfig(
        n_heads=n_heads,
        multiple_of=_multiple_of(dim, hidden),
        norm_eps=config.get("rms_norm_eps", 1e-6),  # Hugging Face's default; LLaMA-2's files say 1e-5
        rope_theta=rope_theta,
    )


def _multiple_of(dim: int, hidden: int) -> int:
    """Meta sizes SwiGLU as int(8 * dim / 3) rounded up to a multiple_of; find the one giving `hidden`."""
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if LanguageConfig(dim=dim, multiple_of=m).hidden_dim == hidden:
            return m
    raise ValueError(f"feed-forward width {hidden} is not Meta's SwiGLU sizing for dim {dim} (any multiple_of)")


def read_llama(folder, heads=None):
    """LLaMA in Meta's names with Meta's q/k layout, and the configuration its files state."""
    folder = _need(folder, "LLaMA folder")
    if os.path.isfile(os.path.join(folder, "params.json")):
        tensors, config = meta_llama(folder)
        config.n_heads = heads or config.n_heads
        return tensors, config
    if os.path.isfile(os.path.join(folder, "config.json")):
        return hf_llama(folder, heads)
    raise FileNotFoundError(
        f"{folder} is neither a Meta LLaMA folder (consolidated.00.pth + params.json) nor a Hugging Face one "
        "(config.json + *.safetensors)"
    )


# --- the official NXTP training checkpoint ---


def nxtp_checkpoint(path) -> dict:
    """`torch.save` dict whose "model" holds the trained parameters (REFERENCE.md, "Checkpoints")."""
    if not os.path.isfile(_need(path, "NXTP checkpoint")):
        raise ValueError(f"--checkpoint {path} is a folder; pass the .pth file itself")
    ckpt = _load_pth(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise KeyError(
            f"{path} has no \"model\" entry (found {found}); expected an NXTP training checkpoint such as "
            "ckpt_epoch_03_iter_0021360.pth from huggingface.co/kaiyuyue/nxtp"
        )
    # DDP saved the names with a `module.` prefix (official load_checkpoint strips it the same way)
    return {k.removeprefix("module."): _now(v) for k, v in ckpt["model"].items()}


def merge(clip: dict, trained: dict, clip_path, ckpt_path) -> dict:
    """The checkpoint's trained tensors over CLIP's frozen ones, which must be the same network."""
    width = clip["vision_encoder.conv1.weight"].shape[0]
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
    return _now(width**-0.5 * torch.randn(dim, width, generator=generator))


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
    header, offset = {"__metadata__": {"format": FORMAT, "config": json.dumps(config.to_dict())}}, 0
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
    dim = _shape(tensors, "language_decoder.tok_embeddings.weight", checkpoint)[1]
    hidden = _shape(tensors, "language_decoder.layers.0.feed_forward.w1.weight", checkpoint)[0]
    language = LanguageConfig(
        n_heads=llama_heads or _heads(dim, 128, "--llama-heads"),
        multiple_of=_multiple_of(dim, hidden),
        max_seq_len=max_seq_len,
    )
    config = NXTPConfig(VisionConfig(heads=vision_heads), language)
    return write(out, tensors, config, dtype, f"{checkpoint} merged over {clip}")


def convert_llama(
    llama, clip, out, layers=6, dtype=torch.float16, vision_heads=None, llama_heads=None, max_seq_len=512, seed=0
):
    """An untrained NXTP: LLaMA cut to `layers` blocks (NXTP step 5) + CLIP + new rows and projection."""
    source, language = read_llama(llama, llama_heads)
    available = _blocks(source)
    if not 1 <= layers <= available:
        raise ValueError(f"--layers {layers}: the LLaMA in {llama} has {available} blocks; keep 1 to {available}")
    decoder = truncate(source, layers)
    for name in ("tok_embeddings.weight", "output.weight"):
        _shape(decoder, name, llama)
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
