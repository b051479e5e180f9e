"""The NXTP safetensors format: load, save, reload, and clear errors for bad files."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nxtp_minimal
from conftest import FIXTURES
from nxtp_minimal import NXTP, released

TINY = FIXTURES / "tiny_nxtp.safetensors"


def test_released_preset_counts_1_78b():
    with torch.device("meta"):
        model = NXTP(released())
    n = sum(p.numel() for p in model.parameters())
    assert 1.775e9 <= n <= 1.790e9, n


def test_config_comes_from_shapes_and_metadata():
    model = nxtp_minimal.load(TINY)
    c = model.config
    assert (c.vision.image_size, c.vision.patch_size, c.vision.width, c.vision.layers, c.vision.heads) == (32, 8, 32, 2, 2)
    assert (c.language.dim, c.language.n_layers, c.language.n_heads, c.language.vocab_size) == (32, 2, 4, 32002)
    assert model.vision_encoder is not None and model.language_decoder is not None


def test_float16_on_disk_computes_in_float32():
    model = nxtp_minimal.load(TINY, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    stored = load_file(TINY)
    for name, p in model.state_dict().items():
        assert torch.equal(p, stored[name].float()), name


def test_save_and_reload_bit_identical(tmp_path):
    half = nxtp_minimal.load(TINY, dtype=torch.float16)
    nxtp_minimal.save(tmp_path / "half.safetensors", half)
    stored, resaved = load_file(TINY), load_file(tmp_path / "half.safetensors")
    assert stored.keys() == resaved.keys()
    assert all(torch.equal(stored[k], resaved[k]) and stored[k].dtype == resaved[k].dtype for k in stored)
    with safe_open(TINY, "pt") as a, safe_open(tmp_path / "half.safetensors", "pt") as b:
        assert a.metadata() == b.metadata()

    full = nxtp_minimal.load(TINY)
    nxtp_minimal.save(tmp_path / "full.safetensors", full)
    again = nxtp_minimal.load(tmp_path / "full.safetensors")
    assert again.config == full.config
    for (name, a), (_, b) in zip(full.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found: .*nothing.safetensors"):
        nxtp_minimal.load(tmp_path / "nothing.safetensors")


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"PK\x03\x04 a zip, maybe a .pth renamed")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        nxtp_minimal.load(bad)
    with pytest.raises(ValueError, match=f"{tmp_path} is not a safetensors file"):
        nxtp_minimal.load(tmp_path)  # a folder


def test_safetensors_without_nxtp_metadata(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(TINY), plain)
    with pytest.raises(ValueError, match="not in the NXTP format"):
        nxtp_minimal.load(plain)


def rewrite(tmp_path, change, change_meta=lambda meta: None):
    tensors = load_file(TINY)
    with safe_open(TINY, "pt") as f:
        meta = f.metadata()
    change(tensors)
    change_meta(meta)
    path = tmp_path / "changed.safetensors"
    save_file(tensors, path, metadata=meta)
    return path


def test_config_that_is_not_json_names_the_file(tmp_path):
    path = rewrite(tmp_path, lambda t: None, lambda meta: meta.update(config=meta["config"].replace('"', "'")))
    with pytest.raises(ValueError) as e:
        nxtp_minimal.load(path)
    message = str(e.value)
    assert message.startswith(f'{path}: its "config" metadata is not valid JSON (Expecting property name')
    assert message.endswith("write it again (python -m nxtp_minimal convert, or nxtp_minimal.save)")


def test_config_that_is_json_but_not_a_configuration(tmp_path):
    path = rewrite(tmp_path, lambda t: None, lambda meta: meta.update(config='{"vision": {}}'))
    with pytest.raises(ValueError, match=f"{path}: its \"config\" metadata is not an NXTP configuration .KeyError"):
        nxtp_minimal.load(path)


def test_missing_tensor_is_named(tmp_path):
    path = rewrite(tmp_path, lambda t: t.pop("language_decoder.layers.1.ffn_norm.weight"))
    with pytest.raises(KeyError, match=r"missing \['language_decoder.layers.1.ffn_norm.weight'\]"):
        nxtp_minimal.load(path)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    key = "language_decoder.layers.1.attention.wq.weight"
    path = rewrite(tmp_path, lambda t: t.__setitem__(key, torch.zeros(32, 16, dtype=torch.float16)))
    with pytest.raises(ValueError, match=rf"{key} has shape \[32, 16\], the model expects \[32, 32\]"):
        nxtp_minimal.load(path)


def test_tokenizer_that_does_not_fit(small_tokenizer):
    with pytest.raises(ValueError, match="do not fit together: the weights have 32002 token rows"):
        nxtp_minimal.load(TINY, tokenizer=small_tokenizer)
