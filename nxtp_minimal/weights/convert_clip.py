"""CLIP's vision tower in NXTP names, from OpenAI's TorchScript archive (ViT-L-14.pt), OpenAI's state
dict saved as safetensors, or a Hugging Face CLIP folder (openai/clip-vit-large-patch14).

The official code keeps only the archive's weights, `torch.jit.load(...).state_dict()` (kaiyuyue/nxtp
src/functions.py `load_clip`), but torch.jit.load runs the archive's TorchScript. The port reads the same
tensors with an unpickler that can rebuild tensors and nothing else: no code from the file runs.
"""

import collections
import os
import pickle
import sys
import zipfile
from typing import NamedTuple

import torch

from .format import need_tensor
from .readers import Lazy, heads, load_safetensors, need, read_json, safetensors_in

# --- OpenAI's TorchScript archive: a zip of NAME/data.pkl (the modules' attributes) + NAME/data/KEY ---

STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class ScriptModule:
    """A module of the archive: its attributes (tensors, submodules, flags), never its code."""

    state = None

    def __setstate__(self, state):
        self.state = state


class Storage(NamedTuple):
    """One tensor record of the archive, read only when a tensor viewing it is written."""

    path: str
    record: str
    dtype: torch.dtype
    numel: int
    swap: bool  # written on a machine of the other byte order

    def read(self) -> torch.Tensor:
        try:
            with zipfile.ZipFile(self.path) as z:
                raw = bytearray(z.read(self.record))
        except KeyError:
            raw = None
        size = torch.empty((), dtype=self.dtype).element_size()
        if raw is None or len(raw) != self.numel * size:
            raise ValueError(f"{self.path}: the record {self.record} is missing or not {self.numel} x {size} bytes; "
                             "the archive is damaged")
        data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        if self.swap:
            data = data.view(-1, size).flip(1).reshape(-1)
        return data.view(self.dtype)


def rebuild_tensor(storage: Storage, offset, size, stride, *_) -> Lazy:
    """torch._utils._rebuild_tensor_v2's view of a storage; requires_grad and hooks do not matter here."""
    return Lazy(torch.Size(size), lambda: storage.read().as_strided(size, stride, offset))


class ArchiveUnpickler(pickle.Unpickler):
    """data.pkl of a TorchScript archive, allowed to build tensor views of the records under `prefix`."""

    def __init__(self, file, path: str, prefix: str, swap: bool):
        super().__init__(file)
        self.path, self.prefix, self.swap = path, prefix, swap

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptModule  # the archive's own module classes, whose code is not needed
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict  # the (empty) backward hooks of a rebuilt tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise ValueError(
            f"{self.path} refers to {module}.{name}, which rebuilding CLIP's tensors does not need, so it is not "
            "loaded; --clip takes OpenAI's ViT-L-14.pt, its state dict as .safetensors, or a Hugging Face CLIP folder"
        )

    def persistent_load(self, pid):
        # ("storage", storage type, record key, location, number of elements), as TorchScript writes it
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise ValueError(f"{self.path}: data.pkl holds a reference {pid!r} that is not a tensor storage")
        _, dtype, key, _, numel = pid
        return Storage(self.path, f"{self.prefix}data/{key}", dtype, numel, self.swap)


def read_torchscript(path) -> dict:
    """The tensors of a TorchScript archive by attribute path (`visual.conv1.weight`), as Lazy tensors:
    what `torch.jit.load(path).state_dict()` gives for a traced model such as OpenAI's."""
    not_archive = f"{path} is not a TorchScript archive"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise ValueError(f"{not_archive} (it has no NAME/data.pkl record)")
            prefix = pickles[0][: -len("data.pkl")]
            order = z.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
            root = ArchiveUnpickler(z.open(pickles[0]), path, prefix, swap=order != sys.byteorder).load()
    except zipfile.BadZipFile as e:
        raise ValueError(f"{not_archive} ({e})") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: its data.pkl cannot be read ({e}); the archive is damaged") from None
    if not isinstance(root, ScriptModule):
        raise ValueError(f"{not_archive} (its data.pkl holds a {type(root).__name__}, not a module)")
    return dict(_tensors(root, ""))


def _tensors(module: ScriptModule, prefix: str):
    attributes = module.state if isinstance(module.state, dict) else {}
    for name, value in attributes.items():
        if isinstance(value, ScriptModule):
            yield from _tensors(value, f"{prefix}{name}.")
        elif isinstance(value, Lazy):
            yield prefix + name, value


def openai_clip_name(key: str):
    """OpenAI CLIP -> NXTP: the visual tower keeps its names under `vision_encoder.`.

    `visual.proj` is CLIP's own class-token projection, which NXTP replaces with a bias-free Linear
    (kaiyuyue/nxtp src/models/clip.py `build_clip_model`); the text tower and `logit_scale` are not used.
    """
    if key.startswith("visual.") and key != "visual.proj":
        return "vision_encoder." + key[len("visual."):]
    return None


def openai_clip(path, n_heads=None):
    """OpenAI's TorchScript archive (ViT-L-14.pt), or the same state dict saved as safetensors."""
    state = load_safetensors([path]) if path.endswith(".safetensors") else read_torchscript(path)
    tensors = {openai_clip_name(k): v for k, v in state.items() if openai_clip_name(k)}
    width = need_tensor(tensors, "vision_encoder.conv1.weight", f"the CLIP file {path}").shape[0]
    return tensors, n_heads or heads(width, 64, "--vision-heads")


# --- Hugging Face's CLIP folder ---

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


def hf_clip(folder, n_heads=None):
    """A Hugging Face CLIP folder (openai/clip-vit-large-patch14): config.json + *.safetensors."""
    files = safetensors_in(folder)
    if not files or not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face CLIP folder: it needs config.json and model.safetensors "
            "(hf download openai/clip-vit-large-patch14 config.json model.safetensors --local-dir FOLDER)"
        )
    config = read_json(os.path.join(folder, "config.json"))
    config = config.get("vision_config", config)
    if config.get("hidden_act", "quick_gelu") != "quick_gelu" or config.get("layer_norm_eps", 1e-5) != 1e-5:
        raise ValueError(
            f"{folder}: this CLIP uses hidden_act={config.get('hidden_act')!r}, layer_norm_eps="
            f"{config.get('layer_norm_eps')}; the port's vision encoder is OpenAI's (quick_gelu, 1e-5)"
        )
    state = load_safetensors(files)
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
    width = need_tensor(tensors, "vision_encoder.conv1.weight", folder).shape[0]
    return tensors, n_heads or config.get("num_attention_heads") or heads(width, 64, "--vision-heads")


def read_clip(path, n_heads=None):
    """CLIP's vision tower in NXTP names, and its number of heads."""
    path = need(path, "CLIP weights")
    return hf_clip(path, n_heads) if os.path.isdir(path) else openai_clip(path, n_heads)
