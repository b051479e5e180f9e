"""CLIP's image preprocessing, written with PIL and numpy (no torchvision).

Official order: the inference script converts first, `Image.open(path).convert("RGB")` (kaiyuyue/nxtp
src/infer.py), then applies the loader's transform (src/loader.py `build_preprocess`): Resize(size,
bicubic) on the shorter side, CenterCrop(size), RGB (a no-op by then), ToTensor, Normalize(CLIP mean,
std). Converting first matters for every mode but RGB and L: Pillow resizes palette and bilevel images
nearest-neighbour, RGBA and LA premultiplied by alpha, CMYK in its own space, and clips 16-bit, 32-bit
and float values to 0..255 when it converts them.
"""

import threading

import numpy as np
import torch
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# Pillow's own default (Image.MAX_IMAGE_PIXELS, about 256 MiB as 24-bit RGB): photographs up to ~89
# megapixels pass, the model only ever sees 224 x 224, and a larger file must be asked for by name.
MAX_PIXELS = 89_478_485
_PILLOW_LIMIT = threading.Lock()


def resize_and_crop(image: Image.Image, size: int = 224) -> Image.Image:
    """The official crop as a PIL RGB image: to RGB, shorter side to `size` (bicubic, antialiased),
    then the centre `size` x `size`."""
    try:
        image = image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert a {image.mode} image to RGB ({e}); save it as RGB first") from None
    w, h = image.size
    # torchvision's Resize(int): the long side is truncated, not rounded
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """Any PIL image -> float32 [3, size, size], normalised with CLIP's mean and std."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess expects a PIL image, got {type(image).__name__}; open files with load_image")
    crop = np.asarray(resize_and_crop(image, size), dtype=np.float32) / 255.0  # [S, S, 3]
    x = (crop - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def load_image(path, max_pixels=None) -> Image.Image:
    """Open and decode an image file, with a clear error for a missing, undecodable or too large file.

    max_pixels: None for MAX_PIXELS, 0 for no limit. The size is read from the file's header, so a
    decompression bomb is refused before it is decoded.
    """
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if limit < 0:
        raise ValueError(f"--max-pixels must be 0 (no limit) or a number of pixels, got {limit}")
    # Pillow's own check reads the global Image.MAX_IMAGE_PIXELS (a warning above it, an error above
    # twice it) and has no per-call setting; it is off while this opens and decodes, so `limit` decides
    # (the lock orders calls of load_image; other Pillow users in other threads skip the check meanwhile).
    with _PILLOW_LIMIT:
        pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return _open(path, limit)
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit


def _open(path, limit: int) -> Image.Image:
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    w, h = image.size
    if limit and w * h > limit:
        image.close()
        raise ValueError(
            f"{path} is {w} x {h} = {w * h} pixels, more than the limit of {limit} pixels (a guard against "
            "decompression bombs); if you trust the file, pass --max-pixels N to raise it"
        )
    try:
        image.load()
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    return image


def _unreadable(path, e: Exception) -> ValueError:
    return ValueError(f"cannot read {path} as an image ({e}); give a JPEG, PNG or other format PIL opens")
