"""CLIP vision encoder against the official outputs (fixtures/vit.safetensors)."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import FIXTURES, fixture_tensors
from nxtp_minimal.config import VisionConfig
from nxtp_minimal.vit import VisionEncoder


def build(device, dtype):
    with safe_open(FIXTURES / "vit.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    t = fixture_tensors("vit.safetensors")
    encoder = VisionEncoder(VisionConfig(**meta["vision"]), meta["embed_dim"])
    weights = {k[len("vision_encoder.") :]: v for k, v in t.items() if k.startswith("vision_encoder.")}
    encoder.load_state_dict(weights)  # strict: the official key names load as they are
    return encoder.to(device, dtype), t


@pytest.mark.parametrize(
    # bfloat16 keeps 8 bits of mantissa (~0.4% relative); through 3 blocks and LayerNorms of O(1)
    # activations the error stays below 0.1 absolute.
    "dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-1)], ids=["float32", "bfloat16"]
)
def test_vit_matches_official(device, dtype, tol):
    encoder, t = build(device, dtype)
    pixels = t["input.pixels"].to(device, dtype)
    with torch.no_grad():
        hidden = encoder.hidden(pixels).float().cpu()
        tokens = encoder(pixels).float().cpu()
    torch.testing.assert_close(hidden, t["output.hidden"], rtol=tol, atol=tol)
    torch.testing.assert_close(tokens, t["output.tokens"], rtol=tol, atol=tol)
