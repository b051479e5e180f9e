"""CLIP preprocessing against torchvision's official transform outputs (fixtures/preprocess.safetensors,
fixtures/modes/), and the pixel limit that refuses decompression bombs."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import FIXTURES, fixture_tensors
from nxtp_minimal import load_image, preprocess
from nxtp_minimal.preprocess import MAX_PIXELS, MEAN, STD, resize_and_crop

T = fixture_tensors("preprocess.safetensors")
with safe_open(FIXTURES / "preprocess.safetensors", "pt") as _f:
    META = json.loads(_f.metadata()["meta"])
MODES = FIXTURES / "modes"
MODE_CASES = json.loads((MODES / "cases.json").read_text())


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


# --- every image mode: the official script converts to RGB before it resizes ---


@pytest.mark.parametrize("case", MODE_CASES, ids=lambda c: f"{c['file']}-{c['mode']}")
def test_every_mode_gives_the_official_crop(case):
    image = load_image(MODES / case["file"])
    assert image.mode == case["mode"]
    expected = np.load(MODES / f"{case['file']}.crop.npy")  # uint8 [224, 224, 3]
    crop = resize_and_crop(image, case["size"])
    assert crop.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(crop), expected)
    pixels = (expected / np.float32(255) - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    torch.testing.assert_close(preprocess(image, case["size"]), torch.from_numpy(pixels.transpose(2, 0, 1)),
                               rtol=1e-6, atol=1e-6)


def official_rule(image, size):
    """The official order written out: `convert("RGB")`, then torchvision's Resize(size) on the PIL image
    (shorter side to size, bicubic, longer side truncated) and CenterCrop(size)."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    scale = size / min(w, h)
    new = (size, int(h * scale)) if w <= h else (int(w * scale), size)
    array = np.asarray(rgb.resize(new, Image.BICUBIC))  # [H', W', 3]
    top, left = int(round((new[1] - size) / 2)), int(round((new[0] - size) / 2))
    return array[top: top + size, left: left + size]


def mode_images(tmp_path):
    """Modes Pillow opens with no official fixture: PA, I and F from TIFF files, YCbCr in memory."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (61, 47, 3), dtype=np.uint8))
    wide = rng.normal(128, 200, (61, 47))  # reaches below 0 and above 255: Pillow clips when it converts
    pa = rgb.convert("P").convert("PA")
    pa.putalpha(Image.fromarray(rng.integers(0, 256, (61, 47), dtype=np.uint8)))
    images = {"PA": pa, "I": Image.fromarray(wide.astype(np.int32)), "F": Image.fromarray(wide.astype(np.float32))}
    opened = {}
    for mode, image in images.items():
        image.save(tmp_path / f"{mode}.tiff")
        opened[mode] = load_image(tmp_path / f"{mode}.tiff")
    opened["YCbCr"] = rgb.convert("YCbCr")
    return opened


def test_modes_without_fixture_follow_the_official_rule(tmp_path):
    for mode, image in mode_images(tmp_path).items():
        assert image.mode == mode
        for size in (224, 32):
            np.testing.assert_array_equal(np.asarray(resize_and_crop(image, size)), official_rule(image, size), mode)


def test_mode_pillow_cannot_convert():
    with pytest.raises(ValueError, match="cannot convert a La image to RGB"):
        preprocess(Image.new("La", (8, 8)))


# --- decompression bombs: our limit, exactly, instead of Pillow's warning and error ---


def test_decompression_bomb_is_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 million pixels in about 48 kB
    assert bomb.stat().st_size < 100_000
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError) as e:
        load_image(bomb)
    assert str(e.value) == (
        f"{bomb} is 20000 x 20000 = 400000000 pixels, more than the limit of {MAX_PIXELS} pixels (a guard "
        "against decompression bombs); if you trust the file, pass --max-pixels N to raise it"
    )
    assert MAX_PIXELS == pillow_limit and Image.MAX_IMAGE_PIXELS == pillow_limit  # Pillow's default, restored


def test_the_limit_is_exact_and_pillows_is_not_used(tmp_path, monkeypatch):
    # Pillow warns above its limit and raises above twice it; make both reachable with small files
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (50, 50), "red").save(tmp_path / "2500.png")  # above twice Pillow's limit
    Image.new("RGB", (40, 40), "red").save(tmp_path / "1600.png")  # between once and twice
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail the test
        for max_pixels in (2500, 0, None):
            assert load_image(tmp_path / "2500.png", max_pixels=max_pixels).size == (50, 50)
        assert load_image(tmp_path / "1600.png", max_pixels=1600).getpixel((0, 0)) == (255, 0, 0)
        with pytest.raises(ValueError, match=r"50 x 50 = 2500 pixels, more than the limit of 2499 pixels"):
            load_image(tmp_path / "2500.png", max_pixels=2499)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(ValueError, match="--max-pixels must be 0 .no limit. or a number of pixels, got -1"):
        load_image(tmp_path / "2500.png", max_pixels=-1)
