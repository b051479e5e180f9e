"""The NXTP safetensors format: one file with `vision_encoder.*` and `language_decoder.*` tensors under
the official names, and metadata `format` = "nxtp", `config` = the model configuration as JSON.

Like OpenAI CLIP's `build_model`, sizes are read from the tensors themselves; the metadata supplies
what shapes cannot tell (heads, norm eps, RoPE theta, sequence length, prompt, special tokens).
"""

import json
import os
import sys

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import NXTPConfig
from ..model import NXTP
from ..tokenizer import Tokenizer
from ..tools.errors import DTYPES, UserError, check_exists

FORMAT = "nxtp"


def metadata(config: NXTPConfig) -> dict:
    """The safetensors metadata of an NXTP file."""
    return {"format": FORMAT, "config": json.dumps(config.to_dict())}


def need_tensor(tensors: dict, name: str, source="the weights"):
    """tensors[name], or a KeyError that names the tensor and where it was looked for."""
    if name not in tensors:
        raise KeyError(f"{source} has no tensor {name!r}")
    return tensors[name]


def open_safetensors(path):
    """A safetensors file opened for reading (memory-mapped), or one clear line if it is not one."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:  # OSError: a folder, or a file that cannot be read
        raise ValueError(f"{path} is not a safetensors file ({e})") from None


def config_from_tensors(shapes: dict, meta: NXTPConfig) -> NXTPConfig:
    """Fill `meta` with every size the tensor shapes determine. shapes: name -> torch.Size."""
    v, lang = meta.vision, meta.language
    conv = need_tensor(shapes, "vision_encoder.conv1.weight")  # [width, 3, patch, patch]
    v.width, v.patch_size = conv[0], conv[-1]
    v.image_size = v.patch_size * round((need_tensor(shapes, "vision_encoder.positional_embedding")[0] - 1) ** 0.5)
    v.layers = sum(k.endswith(".attn.in_proj_weight") for k in shapes if k.startswith("vision_encoder."))
    lang.vocab_size, lang.dim = need_tensor(shapes, "language_decoder.tok_embeddings.weight")
    lang.n_layers = sum(k.endswith(".attention.wq.weight") for k in shapes if k.startswith("language_decoder."))
    hidden = need_tensor(shapes, "language_decoder.layers.0.feed_forward.w1.weight")[0]
    if hidden != lang.hidden_dim:
        raise ValueError(
            f"feed-forward width {hidden} does not follow from the config (dim {lang.dim}, multiple_of "
            f"{lang.multiple_of}, ffn_dim_multiplier {lang.ffn_dim_multiplier} give {lang.hidden_dim})"
        )
    return meta


def _open(path):
    return open_safetensors(check_exists(path, "weights file", (
        "Use the demo weights in weights/, or download and convert the released model "
        "(python -m nxtp_minimal download, see weights/README.md)"
    )))


_REWRITE = "the file is damaged or was edited: write it again (python -m nxtp_minimal convert, or nxtp_minimal.save)"


def read_config(path) -> NXTPConfig:
    """The configuration of an NXTP weights file, sizes taken from its tensor shapes."""
    with _open(path) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(
                f"{path} is a safetensors file but not in the NXTP format (metadata format="
                f"{meta.get('format')!r}); convert official checkpoints with python -m nxtp_minimal convert"
            )
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    try:
        config = NXTPConfig.from_dict(json.loads(meta["config"]))
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: its "config" metadata is not valid JSON ({e}); {_REWRITE}') from None
    except (TypeError, KeyError) as e:
        raise ValueError(f'{path}: its "config" metadata is not an NXTP configuration ({e!r}); {_REWRITE}') from None
    return config_from_tensors(shapes, config)


def check_state_dict(model: torch.nn.Module, tensors: dict, source: str) -> None:
    """Raise a clear error if names or shapes differ from what the model expects."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{source} does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{source}: tensor {name} has shape {list(t.shape)}, the model expects {list(expected[name].shape)}"
            )


def load(weights_path, tokenizer=None, device="cpu", dtype=torch.float32) -> NXTP:
    """Build an NXTP model from an NXTP safetensors file, on `device` in `dtype`.

    tokenizer: a Tokenizer, a path to a SentencePiece model, or None (ids only; no text).
    """
    config = read_config(weights_path)
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer, config.special_tokens)
    if tokenizer is not None and tokenizer.n_words != config.language.vocab_size:
        raise ValueError(
            f"the weights and the tokenizer do not fit together: the weights have {config.language.vocab_size} "
            f"token rows, the tokenizer {tokenizer.path} gives {tokenizer.n_words} ids"
        )
    with torch.device("meta"):
        model = NXTP(config, tokenizer)
    with _open(weights_path) as f:
        # one tensor at a time, cast as it is read, so peak memory stays near the model's own size
        tensors = {k: f.get_tensor(k).to(device=device, dtype=dtype) for k in f.keys()}
    check_state_dict(model, tensors, os.fspath(weights_path))
    model.load_state_dict(tensors, assign=True)
    model.language_decoder.build_rope()  # not in the file (a buffer computed from the config): build it there
    return model.eval()


def save(path, model: NXTP) -> None:
    """Write `model` in the NXTP format, in the dtype its parameters have."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata=metadata(model.config))


# weights/ in a source checkout (and an editable install); a wheel carries the same two files inside
# the package, as nxtp_minimal/demo_model/ (pyproject.toml).
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGED = os.path.join(_PACKAGE, "demo_model")
DEMO_DIR = _PACKAGED if os.path.isdir(_PACKAGED) else os.path.join(os.path.dirname(_PACKAGE), "weights")


def load_demo(device="cpu", dtype=torch.float32) -> NXTP:
    """The small demo model this repo trains and ships in weights/ (see README, "Demo model")."""
    return load(os.path.join(DEMO_DIR, "demo.safetensors"), os.path.join(DEMO_DIR, "demo_tokenizer.model"), device, dtype)


def load_for_command(weights_path, tokenizer, device="cpu", dtype="float32", doing="using") -> NXTP:
    """The model of a command's --weights and --tokenizer (dtype by name), or the demo model when --weights
    is None, announced on stderr as "no --weights given: {doing} the demo model ..." (doing=None: silent)."""
    if weights_path is None:
        if doing is not None:
            print(f"no --weights given: {doing} the demo model shipped in weights/", file=sys.stderr)
        return load_demo(device, DTYPES[dtype])
    if tokenizer is None:
        raise UserError("--weights needs --tokenizer (the SentencePiece model that goes with it, see weights/README.md)")
    return load(weights_path, tokenizer, device, DTYPES[dtype])
