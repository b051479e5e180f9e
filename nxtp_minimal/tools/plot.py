"""Figures shared by the lessons, `predict --attention-maps` and the demo page (matplotlib).

One convention for every mask in the series: black = may attend, white = blocked; rows are queries,
columns keys. Attention over the image is drawn as a heat map on top of the image, in one colour map.
"""

import numpy as np
import torch
from PIL import Image

from ..preprocess import resize_and_crop

HEAT = "inferno"


def show_mask(ax, mask, ticks=None, title=None, fontsize=7):
    """Draw an attention mask [S, S] (additive 0 / -inf, or boolean True = may attend) on `ax`."""
    mask = torch.as_tensor(mask)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    ax.imshow(allowed.float().cpu(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    if ticks is not None:
        ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=fontsize)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)


def heat_on_image(image: Image.Image, heat) -> np.ndarray:
    """The image as RGB float [H, W, 3] in [0, 1], blended with `heat` [grid, grid] scaled to its size."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    heat = torch.as_tensor(heat, dtype=torch.float32)
    heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-12)
    big = torch.nn.functional.interpolate(heat[None, None], size=rgb.shape[:2], mode="bilinear", align_corners=False)
    import matplotlib

    colours = matplotlib.colormaps[HEAT](big[0, 0].numpy())[..., :3]
    return 0.45 * rgb + 0.55 * colours


def attention_figure(image: Image.Image, maps: dict, probs: dict = None, size: int = 256, caption: str = None):
    """The image, then one overlay per label: its attention averaged over blocks and heads.

    maps: label -> [blocks, heads, grid, grid] (`inference.attention_maps`); probs: label -> probability;
    caption: a line under the figure (which read-out is drawn).
    """
    import matplotlib.pyplot as plt

    crop = resize_and_crop(image, size)  # the square the model sees, drawn at `size` pixels
    n = len(maps) + 1
    cols = min(n, 6)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(crop)
    axes.flat[0].set_title("image", fontsize=10)
    for ax, (label, m) in zip(axes.flat[1:], maps.items()):
        ax.imshow(heat_on_image(crop, torch.as_tensor(m).mean(dim=(0, 1))))
        title = label if probs is None else f"{label} ({probs[label]:.2f})"
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    if caption:
        fig.text(0.5, 0, caption, ha="center", va="top", fontsize=9)
    return fig
