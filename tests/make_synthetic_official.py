"""Write NXTP weights back out in the official formats, to test and measure the converters.

An NXTP state dict is split the way the official files hold it:
- the training checkpoint: `torch.save({"model": ..., "optimizer": ..., ...})` whose "model" holds only
  the trained parameters (kaiyuyue/nxtp src/utils.py `save_checkpoint`), named `module.*` (DDP): the
  projection, the last vision blocks, `ln_post` and the whole decoder;
- OpenAI's CLIP state dict: `visual.*` with CLIP's own `visual.proj`, the text tower and
  `logit_scale`, saved as a TorchScript archive (like ViT-L-14.pt) or as safetensors. Its copies of
  the trained tensors hold other values (CLIP before NXTP's fine-tuning), so a converter that takes
  them instead of the checkpoint's is caught.

As a script it writes random float16 tensors with the released 1.78B shapes, for measuring a full-size
conversion (weights/README.md):

    python tests/make_synthetic_official.py /tmp/nxtp_synthetic [--clip-format pt|safetensors] [--llama]

(--llama adds a Hugging Face LLaMA-2 7B folder, 13.5 GB, for measuring `convert llama`.)
"""

import argparse
import json
import os
import warnings

import torch
import torch.nn as nn
from safetensors.torch import save_file

RELEASED_TRAINED_VISION_BLOCKS = 6  # official config: CLIP blocks 18-23 of 24 are fine-tuned


def is_trained(name: str, vision_layers: int, trained_blocks: int) -> bool:
    """The parameters the official config_g3m/g70m `optim_filter` trains."""
    if name.startswith("language_decoder.") or name.startswith(("vision_encoder.proj.", "vision_encoder.ln_post.")):
        return True
    prefix = "vision_encoder.transformer.resblocks."
    return name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) >= vision_layers - trained_blocks


def text_tower(width: int, layers: int, embed_dim: int, vocab: int, dtype, generator) -> dict:
    """OpenAI CLIP's text-tower keys (ignored by the converter), small or ViT-L/14 sized."""
    def r(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    sd = {"token_embedding.weight": r(vocab, width), "positional_embedding": r(77, width)}
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        sd.update({
            b + "attn.in_proj_weight": r(3 * width, width), b + "attn.in_proj_bias": r(3 * width),
            b + "attn.out_proj.weight": r(width, width), b + "attn.out_proj.bias": r(width),
            b + "ln_1.weight": r(width), b + "ln_1.bias": r(width), b + "ln_2.weight": r(width), b + "ln_2.bias": r(width),
            b + "mlp.c_fc.weight": r(4 * width, width), b + "mlp.c_fc.bias": r(4 * width),
            b + "mlp.c_proj.weight": r(width, 4 * width), b + "mlp.c_proj.bias": r(width),
        })
    sd.update({"ln_final.weight": r(width), "ln_final.bias": r(width), "text_projection": r(width, embed_dim)})
    sd["logit_scale"] = torch.tensor(4.6052, dtype=dtype)
    return sd


def split(nxtp: dict, vision_layers: int, trained_blocks: int, text=(16, 1, 16, 100), seed=0):
    """NXTP tensors -> (official checkpoint dict, OpenAI CLIP state dict).

    text: the CLIP text tower's (width, layers, embed_dim, vocabulary); ViT-L/14's is (768, 12, 768, 49408).
    """
    g = torch.Generator().manual_seed(seed)
    trained = {k: v for k, v in nxtp.items() if is_trained(k, vision_layers, trained_blocks)}
    checkpoint = {
        "epoch": 3,
        "global_step": 21360,
        "model": {"module." + k: v for k, v in trained.items()},
        "optimizer": {"state": {0: {"step": torch.tensor(21360.0), "exp_avg": torch.zeros(4)}},
                      "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.98), "eps": 1e-6, "params": [0]}]},
        "scheduler": {"T_max": 21360, "eta_min": 0.0, "last_epoch": 21360, "_last_lr": [0.0]},
    }
    clip = {}
    for k, v in nxtp.items():
        if k.startswith("vision_encoder.") and k != "vision_encoder.proj.weight":
            # CLIP's copy of a fine-tuned tensor holds its pre-fine-tuning values: different numbers
            clip["visual." + k[len("vision_encoder."):]] = torch.randn(v.shape, generator=g).to(v.dtype) if k in trained else v
    width, dtype = nxtp["vision_encoder.conv1.weight"].shape[0], nxtp["vision_encoder.conv1.weight"].dtype
    clip["visual.proj"] = torch.randn(width, text[2], generator=g).to(dtype)  # CLIP's own, unused by NXTP
    clip.update(text_tower(*text, dtype=dtype, generator=g))
    for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        clip[name] = torch.tensor(value)
    return checkpoint, clip


def save_torchscript(state_dict: dict, path) -> None:
    """A TorchScript archive whose state_dict() has exactly these names, as OpenAI's ViT-L-14.pt does."""
    root = nn.Module()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)
    with warnings.catch_warnings():
        # deliberately TorchScript: OpenAI's format, which torch now calls deprecated
        warnings.filterwarnings("ignore", r"`torch\.jit\.(script|save)` is deprecated", DeprecationWarning)
        torch.jit.save(torch.jit.script(root), os.fspath(path))


def save_clip(state_dict: dict, path) -> None:
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    else:
        save_torchscript(state_dict, path)


def save_hf_clip(state_dict: dict, folder, heads: int) -> None:
    """OpenAI's CLIP state dict as a Hugging Face CLIPModel folder (openai/clip-vit-large-patch14's layout:
    config.json + model.safetensors), renamed here key by key. Only the vision tower and the projections."""
    os.makedirs(folder, exist_ok=True)
    blocks = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    top = {"class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
           "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
           "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
           "ln_post.bias": "post_layernorm.bias"}
    hf = {"visual_projection.weight": state_dict["visual.proj"].t(),
          "text_projection.weight": state_dict["text_projection"].t(), "logit_scale": state_dict["logit_scale"]}
    for key, t in state_dict.items():
        if not key.startswith("visual.") or key == "visual.proj":
            continue
        key = key[len("visual."):]
        if key in top:
            hf["vision_model." + top[key]] = t
            continue
        _, _, i, rest = key.split(".", 3)  # transformer.resblocks.i.rest
        module, param = rest.rsplit(".", 1)
        layer = f"vision_model.encoder.layers.{i}."
        if module == "attn" and param.startswith("in_proj_"):
            for w, part in zip("qkv", t.chunk(3)):
                hf[f"{layer}self_attn.{w}_proj.{param[len('in_proj_'):]}"] = part
        else:
            hf[f"{layer}{blocks[module]}.{param}"] = t
    width = state_dict["visual.conv1.weight"].shape[0]
    vision = {"hidden_size": width, "num_attention_heads": heads, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
              "num_hidden_layers": sum(k.endswith("attn.in_proj_weight") for k in state_dict if k.startswith("visual."))}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["CLIPModel"], "model_type": "clip", "vision_config": vision}, f)
    save_file({k: v.contiguous() for k, v in hf.items()}, os.path.join(folder, "model.safetensors"))


def released_tensors(dtype=torch.float16, seed=0) -> dict:
    """Random tensors with the shapes of the released 1.78B model, in NXTP names."""
    from nxtp_minimal import NXTP, released

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in NXTP(released()).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {k: (0.02 * torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()}


def write_hf_llama(folder, layers=32, dim=4096, hidden=11008, heads=32, vocab=32000, per_shard=4, seed=0) -> None:
    """A Hugging Face LLaMA folder with LLaMA-2 7B's shapes (random float16), one shard at a time."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (0.02 * torch.randn(*shape, generator=g)).half()

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim, "intermediate_size": hidden,
              "num_attention_heads": heads, "num_key_value_heads": heads, "num_hidden_layers": layers,
              "rms_norm_eps": 1e-5, "vocab_size": vocab, "tie_word_embeddings": False, "torch_dtype": "float16"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    n_shards = (layers + per_shard - 1) // per_shard
    for s in range(n_shards):
        shard = {"model.embed_tokens.weight": r(vocab, dim)} if s == 0 else {}
        for i in range(s * per_shard, min(layers, (s + 1) * per_shard)):
            b = f"model.layers.{i}."
            shard |= {b + f"self_attn.{w}_proj.weight": r(dim, dim) for w in "qkvo"}
            shard |= {b + "mlp.gate_proj.weight": r(hidden, dim), b + "mlp.up_proj.weight": r(hidden, dim),
                      b + "mlp.down_proj.weight": r(dim, hidden), b + "input_layernorm.weight": r(dim),
                      b + "post_attention_layernorm.weight": r(dim)}
        if s == n_shards - 1:
            shard |= {"model.norm.weight": r(dim), "lm_head.weight": r(vocab, dim)}
        save_file(shard, os.path.join(folder, f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--clip-format", choices=["pt", "safetensors"], default="pt")
    p.add_argument("--llama", action="store_true", help="also a Hugging Face LLaMA-2 7B folder (13.5 GB)")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.llama:
        write_hf_llama(os.path.join(args.out_dir, "llama-2-7b-hf"))
    nxtp = released_tensors()
    checkpoint, clip = split(nxtp, 24, RELEASED_TRAINED_VISION_BLOCKS, text=(768, 12, 768, 49408))
    del nxtp
    ckpt_path = os.path.join(args.out_dir, "ckpt_synthetic_1.78b.pth")
    clip_path = os.path.join(args.out_dir, f"ViT-L-14.{args.clip_format}")
    torch.save(checkpoint, ckpt_path)
    save_clip(clip, clip_path)
    for path in (ckpt_path, clip_path):
        print(f"{path}: {os.path.getsize(path) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
