"""CLIP's image preprocessing, written with PIL and numpy (no torchvision).

Official transform: Resize(size, bicubic) on the shorter side, CenterCrop(size), RGB, ToTensor,
Normalize(CLIP mean, std).
"""

import numpy as np
import torch
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def resize_and_crop(image: Image.Image, size: int = 224) -> Image.Image:
    """Shorter side to `size` (bicubic, antialiased), then the centre `size` x `size`, as RGB."""
    w, h = image.size
    # torchvision's Resize(int): the long side is truncated, not rounded
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    # the official pipeline converts to RGB after cropping, so grey images are resized as grey
    return image.crop((left, top, left + size, top + size)).convert("RGB")


def preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """Any PIL image -> float32 [3, size, size], normalised with CLIP's mean and std."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess expects a PIL image, got {type(image).__name__}; open files with load_image")
    crop = np.asarray(resize_and_crop(image, size), dtype=np.float32) / 255.0  # [S, S, 3]
    x = (crop - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def load_image(path) -> Image.Image:
    """Open an image file, with a clear error for a missing or undecodable file."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as an image ({e}); give a JPEG, PNG or other format PIL opens") from None
    return image
