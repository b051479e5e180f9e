"""Truncated LLaMA decoder against the official outputs (fixtures/llama.safetensors)."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import FIXTURES, fixture_tensors
from nxtp_minimal import masks
from nxtp_minimal.config import LanguageConfig
from nxtp_minimal.llama import Decoder, RMSNorm, apply_rope, rope_table, truncate

T = fixture_tensors("llama.safetensors")
with safe_open(FIXTURES / "llama.safetensors", "pt") as _f:
    META = json.loads(_f.metadata()["meta"])
# bfloat16: ~3 significant digits per op, through 2 blocks and logits of O(1) magnitude.
DTYPES = pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-1)], ids=["float32", "bfloat16"]
)


def decoder(device, dtype):
    config = LanguageConfig(**META["language"], vocab_size=META["vocab_size"])
    model = Decoder(config)
    model.load_state_dict({k[len("language_decoder.") :]: v for k, v in T.items() if k.startswith("language_decoder.")})
    return model.to(device, dtype).eval()


def test_rmsnorm():
    norm = RMSNorm(META["language"]["dim"], META["language"]["norm_eps"])
    norm.weight.data = T["language_decoder.layers.0.attention_norm.weight"]
    torch.testing.assert_close(norm(T["rmsnorm.input"]), T["rmsnorm.output"], rtol=1e-4, atol=1e-4)


def test_rope_table_and_rotation():
    cos, sin = rope_table(16, 128)
    torch.testing.assert_close(torch.stack([cos, sin], -1), T["rope.freqs_cos_sin"], rtol=1e-5, atol=1e-5)
    cos, sin = cos[:7], sin[:7]
    torch.testing.assert_close(apply_rope(T["rope.q"], cos, sin), T["rope.q_rotated"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(apply_rope(T["rope.k"], cos, sin), T["rope.k_rotated"], rtol=1e-4, atol=1e-4)


def test_rope_table_is_built_once_in_float32_on_the_weights_device(device):
    # the decoder indexes its own table by position (no table per call): it must be the official one,
    # stay float32 when the weights are cast, and follow the weights to the device
    model = decoder(device, torch.float32).to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and model.rope_cos.device == model.output.weight.device
    assert model.rope_cos.shape[0] == 2 * model.config.max_seq_len
    table = torch.stack([model.rope_cos[:128], model.rope_sin[:128]], -1).cpu()
    torch.testing.assert_close(table, T["rope.freqs_cos_sin"], rtol=1e-5, atol=1e-5)
    assert "rope_cos" not in model.state_dict()  # computed from the config, never read from a file


@DTYPES
def test_causal_blocks_and_logits(device, dtype, tol):
    model = decoder(device, dtype)
    tokens = T["causal.tokens"].to(device)
    mask = masks.causal_mask(tokens.shape[1], device)
    bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, float("-inf"))
    with torch.no_grad():
        h = model.tok_embeddings(tokens)
        cos, sin = rope_table(16, tokens.shape[1], device=device)
        for i, layer in enumerate(model.layers):
            h, _ = layer(h, cos, sin, bias)
            torch.testing.assert_close(h.float().cpu(), T[f"causal.layer_output.{i}"], rtol=tol, atol=tol)
        logits = model(tokens, mask)
    torch.testing.assert_close(logits.float().cpu(), T["causal.logits"], rtol=tol, atol=tol)


@DTYPES
def test_prefix_and_training_layouts(device, dtype, tol):
    """The decoder under the inference and training masks built by masks.py (issue 3)."""
    model = decoder(device, dtype)
    n_image, delim, answer = META["n_image_tokens"], META["delimiter_id"], META["answer_id"]
    S = T["prefix.embeds"].shape[1]
    with torch.no_grad():
        last = model(T["prefix.embeds"].to(device, dtype), masks.prefix_mask(S, n_image).to(device), last_only=True)
        mask = masks.label_mask(T["train.input_tokens"], n_image, answer, delim).to(device)
        logits = model(T["train.embeds"].to(device, dtype), mask)
    torch.testing.assert_close(last.float().cpu(), T["prefix.logits_last"], rtol=tol, atol=tol)
    torch.testing.assert_close(logits.float().cpu(), T["train.logits"], rtol=tol, atol=tol)


def test_truncate_keeps_first_blocks():
    full = Decoder(LanguageConfig(dim=64, n_layers=4, n_heads=4, multiple_of=32, vocab_size=128)).state_dict()
    kept = truncate(full, 2)
    assert set(kept) == set(decoder("cpu", torch.float32).state_dict())
    assert all(kept[k] is full[k] for k in kept)
    with pytest.raises(ValueError, match="cannot keep 5 blocks: the state dict has 4"):
        truncate(full, 5)
