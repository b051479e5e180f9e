"""CLIP preprocessing against torchvision's official transform outputs (fixtures/preprocess.safetensors)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import FIXTURES, fixture_tensors
from nxtp_minimal import load_image, preprocess
from nxtp_minimal.preprocess import resize_and_crop

T = fixture_tensors("preprocess.safetensors")
with safe_open(FIXTURES / "preprocess.safetensors", "pt") as _f:
    META = json.loads(_f.metadata()["meta"])


def image(array):
    array = array.numpy()
    return Image.fromarray(array[..., 0], "L") if array.shape[2] == 1 else Image.fromarray(array, "RGB")


@pytest.mark.parametrize("info", META["images"], ids=lambda i: f"{i['width']}x{i['height']}-{i['mode']}")
def test_crop_is_exact(info):
    i = info["index"]
    crop = np.asarray(resize_and_crop(image(T[f"image.{i}"]), info["size"]))
    np.testing.assert_array_equal(crop, T[f"crop.{i}"].numpy())


@pytest.mark.parametrize("info", META["small"], ids=lambda i: f"{i['width']}x{i['height']}")
def test_pixels_match(info):
    i = info["index"]
    img = image(T[f"image_small.{i}"])
    np.testing.assert_array_equal(np.asarray(resize_and_crop(img, info["size"])), T[f"crop_small.{i}"].numpy())
    pixels = preprocess(img, size=info["size"])
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, T[f"pixels_small.{i}"], rtol=1e-6, atol=1e-6)


def test_undecodable_image(tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match="cannot read .*photo.jpg as an image"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "missing.png")
