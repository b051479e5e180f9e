"""LLaMA-2 in Meta's names and Meta's q/k layout, from Meta's folder (consolidated.00.pth + params.json)
or a Hugging Face folder (meta-llama/Llama-2-7b-hf: config.json + *.safetensors shards)."""

import glob
import os

import torch

from ..config import LanguageConfig
from .readers import Lazy, load_pth, load_safetensors, need, now, read_json, safetensors_in


def blocks(names) -> int:
    """The number of decoder blocks among Meta-named tensors."""
    return len({k.split(".")[1] for k in names if k.startswith("layers.")})


def meta_llama(folder):
    """Meta's LLaMA-2 folder: consolidated.00.pth + params.json. Meta names are the port's names."""
    shards = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not shards or not os.path.isfile(os.path.join(folder, "params.json")):
        raise FileNotFoundError(f"{folder} is not a Meta LLaMA folder (consolidated.00.pth + params.json)")
    if len(shards) > 1:
        raise ValueError(f"{folder} holds {len(shards)} model-parallel shards; NXTP starts from LLaMA-2 7B (one)")
    params = read_json(os.path.join(folder, "params.json"))
    if params.get("n_kv_heads", params["n_heads"]) != params["n_heads"]:
        raise ValueError(f"{folder}: grouped-query attention (n_kv_heads) is not supported by the port")
    state = load_pth(shards[0])
    tensors = {k: now(v) for k, v in state.items() if k != "rope.freqs"}  # rope.freqs: recomputed
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


def hf_llama(folder, n_heads=None):
    """A Hugging Face LLaMA folder (meta-llama/Llama-2-7b-hf): config.json + *.safetensors shards."""
    files = safetensors_in(folder)
    if not files:
        raise FileNotFoundError(f"{folder} has config.json but no *.safetensors weights")
    config = read_json(os.path.join(folder, "config.json"))
    n_heads = n_heads or config["num_attention_heads"]
    if config.get("num_key_value_heads", n_heads) != n_heads:
        raise ValueError(f"{folder}: grouped-query attention (num_key_value_heads) is not supported by the port")
    if config.get("rope_scaling"):
        raise ValueError(f"{folder}: rope_scaling {config['rope_scaling']} is not supported by the port")
    tensors = {}
    for key, t in load_safetensors(files).items():
        name = hf_llama_name(key)
        if name and name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = Lazy(t.shape, lambda t=t: unpermute(t.read(), n_heads))
        if name:
            tensors[name] = t
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return tensors, LanguageConfig(
        n_heads=n_heads,
        multiple_of=multiple_of(dim, hidden),
        norm_eps=config.get("rms_norm_eps", 1e-6),  # Hugging Face's default; LLaMA-2's files say 1e-5
        rope_theta=rope_theta,
    )


def multiple_of(dim: int, hidden: int) -> int:
    """Meta sizes SwiGLU as int(8 * dim / 3) rounded up to a multiple_of; find the one giving `hidden`."""
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if LanguageConfig(dim=dim, multiple_of=m).hidden_dim == hidden:
            return m
    raise ValueError(f"feed-forward width {hidden} is not Meta's SwiGLU sizing for dim {dim} (any multiple_of)")


def read_llama(folder, n_heads=None):
    """LLaMA in Meta's names with Meta's q/k layout, and the configuration its files state."""
    folder = need(folder, "LLaMA folder")
    if os.path.isfile(os.path.join(folder, "params.json")):
        tensors, config = meta_llama(folder)
        config.n_heads = n_heads or config.n_heads
        return tensors, config
    if os.path.isfile(os.path.join(folder, "config.json")):
        return hf_llama(folder, n_heads)
    raise FileNotFoundError(
        f"{folder} is neither a Meta LLaMA folder (consolidated.00.pth + params.json) nor a Hugging Face one "
        "(config.json + *.safetensors)"
    )
