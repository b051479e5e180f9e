"""Synthetic scenes for the demo model: clip-art objects drawn with PIL, each image with its labels.

A scene is fully determined by (seed, index), so a training stream, a held-out set and a test can
each name the images they use. Objects are drawn at 3x the image size and downsampled, so edges are
antialiased; each gets a dark outline so it stays visible on any background. Like real objects, most
kinds keep a colour family (cones are orange, trees green, stars blue) varied in hue, saturation and
brightness; house walls and ice-cream scoops take any colour, so shape must tell those apart.
"""

import colorsys
import functools
import io
import itertools
import math
import random
import sys

import torch
from PIL import Image, ImageDraw

from ..config import PROMPT
from ..preprocess import preprocess

SUPERSAMPLE = 3
MAX_OBJECTS = 4
OUTLINE = (30, 30, 30, 255)


def _rgb(h, s, v):
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v)) + (255,)


def _any_hue(rng):
    return _rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))


def _near(rng, hue, spread=0.05):
    """A colour around `hue`, any saturation and brightness from vivid to muted."""
    return _rgb(hue + rng.uniform(-spread, spread), rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))


def _poly(points, s):
    return [(x * s, y * s) for x, y in points]


def _box(x0, y0, x1, y1, s):
    return (x0 * s, y0 * s, x1 * s, y1 * s)


def _regular(n, r, cx=0.5, cy=0.5, phase=0.0, inner=None):
    """Vertices of a regular polygon, or of a star when `inner` (radius of the inner points) is given."""
    points = []
    for i in range(n * (2 if inner else 1)):
        radius = inner if inner and i % 2 else r
        a = phase + math.pi * i / (n if inner else n / 2) - math.pi / 2
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


# Each drawer paints one object into an s x s RGBA canvas (transparent elsewhere), width w outlines.


def sun(d, s, w, rng):
    color = _rgb(rng.uniform(0.09, 0.16), rng.uniform(0.7, 1.0), 1.0)
    n = rng.randint(8, 12)
    for i in range(n):
        a = 2 * math.pi * i / n
        d.line(_poly([(0.5 + 0.3 * math.cos(a), 0.5 + 0.3 * math.sin(a)),
                      (0.5 + 0.48 * math.cos(a), 0.5 + 0.48 * math.sin(a))], s), fill=color, width=2 * w)
    d.ellipse(_box(0.22, 0.22, 0.78, 0.78, s), fill=color, outline=OUTLINE, width=w)


def moon(d, s, w, rng):
    # a crescent: the outer circle's arc outside a bite circle, then the bite's arc back
    r1, r2, dist, phi = 0.42, 0.36, 0.25, -0.7
    alpha = math.acos((r1**2 + dist**2 - r2**2) / (2 * r1 * dist))
    gamma = math.acos((r1**2 - dist**2 - r2**2) / (2 * dist * r2))
    bx, by = 0.5 + dist * math.cos(phi), 0.5 + dist * math.sin(phi)
    points = [(0.5 + r1 * math.cos(a), 0.5 + r1 * math.sin(a))
              for a in (phi + alpha + (2 * math.pi - 2 * alpha) * i / 40 for i in range(41))]
    points += [(bx + r2 * math.cos(a), by + r2 * math.sin(a))
               for a in (phi + 2 * math.pi - gamma - (2 * math.pi - 2 * gamma) * i / 40 for i in range(41))]
    d.polygon(_poly(points, s), fill=_rgb(rng.uniform(0.1, 0.17), rng.uniform(0.3, 0.6), 1.0), outline=OUTLINE, width=w)


def star(d, s, w, rng):
    d.polygon(_poly(_regular(5, 0.5, inner=0.21), s), fill=_near(rng, 0.6), outline=OUTLINE, width=w)


def heart(d, s, w, rng):
    points = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((0.5 + x / 34, 0.45 - y / 34))
    d.polygon(_poly(points, s), fill=_near(rng, 0.95), outline=OUTLINE, width=w)


def tree(d, s, w, rng):
    d.rectangle(_box(0.42, 0.6, 0.58, 0.98, s), fill=_rgb(0.07, 0.6, rng.uniform(0.35, 0.55)), outline=OUTLINE, width=w)
    green = _rgb(rng.uniform(0.24, 0.4), rng.uniform(0.6, 0.9), rng.uniform(0.45, 0.8))
    if rng.random() < 0.5:
        d.ellipse(_box(0.12, 0.02, 0.88, 0.72, s), fill=green, outline=OUTLINE, width=w)
    else:  # a pine: stacked triangles
        for top, bottom, half in ((0.02, 0.4, 0.25), (0.18, 0.58, 0.33), (0.34, 0.75, 0.42)):
            d.polygon(_poly([(0.5, top), (0.5 + half, bottom), (0.5 - half, bottom)], s), fill=green,
                      outline=OUTLINE, width=w)


def house(d, s, w, rng):
    d.rectangle(_box(0.15, 0.45, 0.85, 0.97, s), fill=_any_hue(rng), outline=OUTLINE, width=w)
    roof = _rgb(rng.uniform(-0.03, 0.06), 0.75, rng.uniform(0.4, 0.65))  # tiles, never green like a pine
    d.polygon(_poly([(0.5, 0.05), (0.97, 0.47), (0.03, 0.47)], s), fill=roof, outline=OUTLINE, width=w)
    d.rectangle(_box(0.42, 0.68, 0.58, 0.97, s), fill=(70, 45, 30, 255), outline=OUTLINE, width=w)
    d.rectangle(_box(0.22, 0.55, 0.36, 0.68, s), fill=(180, 220, 255, 255), outline=OUTLINE, width=w)


def car(d, s, w, rng):
    body = _near(rng, 0.63)
    d.polygon(_poly([(0.22, 0.42), (0.32, 0.14), (0.7, 0.14), (0.8, 0.42)], s), fill=body, outline=OUTLINE, width=w)
    d.polygon(_poly([(0.3, 0.4), (0.36, 0.21), (0.49, 0.21), (0.49, 0.4)], s), fill=(180, 220, 255, 255))
    d.polygon(_poly([(0.53, 0.4), (0.53, 0.21), (0.66, 0.21), (0.73, 0.4)], s), fill=(180, 220, 255, 255))
    d.rounded_rectangle(_box(0.03, 0.4, 0.97, 0.74, s), radius=0.06 * s, fill=body, outline=OUTLINE, width=w)
    for cx in (0.26, 0.74):
        d.ellipse(_box(cx - 0.14, 0.6, cx + 0.14, 0.88, s), fill=(25, 25, 25, 255), outline=OUTLINE, width=w)
        d.ellipse(_box(cx - 0.06, 0.68, cx + 0.06, 0.8, s), fill=(170, 170, 170, 255))


def fish(d, s, w, rng):
    color = _near(rng, 0.46)
    d.polygon(_poly([(0.62, 0.5), (0.97, 0.22), (0.97, 0.78)], s), fill=color, outline=OUTLINE, width=w)
    d.ellipse(_box(0.03, 0.25, 0.75, 0.75, s), fill=color, outline=OUTLINE, width=w)
    d.ellipse(_box(0.17, 0.38, 0.27, 0.48, s), fill=(20, 20, 20, 255))


def umbrella(d, s, w, rng):
    d.line(_poly([(0.5, 0.45), (0.5, 0.85)], s), fill=(40, 40, 40, 255), width=2 * w)
    d.arc(_box(0.5, 0.75, 0.7, 0.95, s), 0, 180, fill=(40, 40, 40, 255), width=2 * w)
    d.pieslice(_box(0.03, 0.1, 0.97, 0.9, s), 180, 360, fill=_near(rng, 0.76), outline=OUTLINE, width=w)
    for x in (0.27, 0.5, 0.73):
        d.line(_poly([(0.5, 0.11), (x, 0.5)], s), fill=OUTLINE, width=w)


def mushroom(d, s, w, rng):
    d.rounded_rectangle(_box(0.36, 0.45, 0.64, 0.95, s), radius=0.08 * s, fill=(240, 230, 210, 255),
                        outline=OUTLINE, width=w)
    cap = _rgb(rng.uniform(-0.05, 0.1), 0.85, rng.uniform(0.6, 0.95))
    d.pieslice(_box(0.04, 0.08, 0.96, 0.9, s), 180, 360, fill=cap, outline=OUTLINE, width=w)
    for x, y in ((0.3, 0.3), (0.55, 0.2), (0.72, 0.38), (0.45, 0.4)):
        d.ellipse(_box(x - 0.06, y - 0.06, x + 0.06, y + 0.06, s), fill=(255, 255, 255, 255))


def balloon(d, s, w, rng):
    d.line(_poly([(0.5, 0.72), (0.44, 0.82), (0.56, 0.9), (0.5, 0.99)], s), fill=(40, 40, 40, 255), width=w)
    color = _near(rng, 0.85)
    d.polygon(_poly([(0.5, 0.66), (0.56, 0.74), (0.44, 0.74)], s), fill=color, outline=OUTLINE, width=w)
    d.ellipse(_box(0.24, 0.02, 0.76, 0.7, s), fill=color, outline=OUTLINE, width=w)
    d.ellipse(_box(0.34, 0.12, 0.42, 0.24, s), fill=(255, 255, 255, 200))


def cloud(d, s, w, rng):
    color = _rgb(0.6, rng.uniform(0.0, 0.08), rng.uniform(0.92, 1.0))
    puffs = [(0.08, 0.4, 0.42, 0.74), (0.25, 0.22, 0.6, 0.57), (0.48, 0.28, 0.8, 0.6), (0.6, 0.42, 0.94, 0.74),
             (0.2, 0.45, 0.8, 0.76)]
    for box in puffs:  # outlines first, then fills, so only the outer rim stays dark
        d.ellipse(_box(*box, s), fill=OUTLINE)
    for x0, y0, x1, y1 in puffs:
        d.ellipse(_box(x0 + w / s, y0 + w / s, x1 - w / s, y1 - w / s, s), fill=color)


def traffic_cone(d, s, w, rng):
    orange = _rgb(rng.uniform(0.03, 0.08), 0.95, rng.uniform(0.9, 1.0))
    d.polygon(_poly([(0.42, 0.05), (0.58, 0.05), (0.8, 0.85), (0.2, 0.85)], s), fill=orange, outline=OUTLINE, width=w)
    for top, bottom in ((0.3, 0.42), (0.56, 0.68)):
        dx0, dx1 = 0.08 + 0.275 * top, 0.08 + 0.275 * bottom
        d.polygon(_poly([(0.5 - dx0, top), (0.5 + dx0, top), (0.5 + dx1, bottom), (0.5 - dx1, bottom)], s),
                  fill=(250, 250, 250, 255))
    d.rectangle(_box(0.08, 0.85, 0.92, 0.97, s), fill=orange, outline=OUTLINE, width=w)


def ice_cream(d, s, w, rng):
    d.polygon(_poly([(0.25, 0.45), (0.75, 0.45), (0.5, 0.99)], s), fill=(225, 175, 105, 255), outline=OUTLINE, width=w)
    for t in (0.25, 0.45, 0.65):  # waffle pattern
        d.line(_poly([(0.25 + 0.5 * t, 0.45), (0.5 + 0.25 * t, 0.45 + 0.54 * (1 - t))], s),
               fill=(160, 110, 60, 255), width=w)
    scoops = 1 + (rng.random() < 0.5)
    for i in range(scoops):
        y = 0.33 - 0.15 * i
        d.ellipse(_box(0.2, y - 0.17, 0.8, y + 0.2, s), fill=_rgb(rng.random(), rng.uniform(0.2, 0.6), 1.0),
                  outline=OUTLINE, width=w)


def hot_dog(d, s, w, rng):
    bun = (225, 170, 90, 255)
    d.rounded_rectangle(_box(0.08, 0.42, 0.92, 0.72, s), radius=0.15 * s, fill=bun, outline=OUTLINE, width=w)
    d.rounded_rectangle(_box(0.02, 0.34, 0.98, 0.52, s), radius=0.09 * s, fill=_rgb(0.02, 0.7, rng.uniform(0.55, 0.8)),
                        outline=OUTLINE, width=w)
    d.line(_poly([(0.12 + 0.08 * i, 0.4 + 0.06 * (i % 2)) for i in range(10)], s), fill=(250, 215, 40, 255), width=w)
    d.rounded_rectangle(_box(0.08, 0.5, 0.92, 0.66, s), radius=0.08 * s, fill=bun, outline=OUTLINE, width=w)


def stop_sign(d, s, w, rng):
    d.rectangle(_box(0.46, 0.6, 0.54, 0.99, s), fill=(150, 150, 150, 255), outline=OUTLINE, width=w)
    d.polygon(_poly(_regular(8, 0.36, cy=0.38, phase=math.pi / 8), s), fill=(255, 255, 255, 255),
              outline=OUTLINE, width=w)
    d.polygon(_poly(_regular(8, 0.31, cy=0.38, phase=math.pi / 8), s), fill=_rgb(0.0, 0.9, rng.uniform(0.75, 0.95)))
    d.rectangle(_box(0.28, 0.34, 0.72, 0.42, s), fill=(255, 255, 255, 255))


KINDS = {
    "sun": sun, "moon": moon, "star": star, "heart": heart, "tree": tree, "house": house, "car": car,
    "fish": fish, "umbrella": umbrella, "mushroom": mushroom, "balloon": balloon, "cloud": cloud,
    "traffic cone": traffic_cone, "ice cream": ice_cream, "hot dog": hot_dog, "stop sign": stop_sign,
}
LABELS = tuple(KINDS)


@functools.lru_cache(maxsize=4)
def _ramp(size):
    return Image.linear_gradient("L").resize((size, size))  # 0 at the top, 255 at the bottom


def _background(rng, size):
    # muted and never white, so white clouds and pale moons stand out
    top = _rgb(rng.random(), rng.uniform(0.1, 0.45), rng.uniform(0.45, 0.9))
    bottom = _rgb(rng.random(), rng.uniform(0.1, 0.45), rng.uniform(0.45, 0.9))
    top, bottom = Image.new("RGB", (size, size), top[:3]), Image.new("RGB", (size, size), bottom[:3])
    return Image.composite(bottom, top, _ramp(size))


def _overlap(a, b):
    """Fraction of the smaller of two boxes (x, y, side) that the other covers."""
    dx = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    dy = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
    return max(dx, 0) * max(dy, 0) / min(a[2], b[2]) ** 2


def _draw(seed: int, index: int, size: int):
    """The image, its labels in drawing order, and each object's pixel box (see `scene_boxes`)."""
    rng = random.Random(seed * 2**32 + index)
    big = size * SUPERSAMPLE
    image = _background(rng, big)
    labels = rng.sample(LABELS, rng.randint(1, MAX_OBJECTS))
    boxes, drawn = [], []
    for label in labels:
        side = rng.uniform(0.38, 0.6) * big
        # overlap is allowed but bounded (best of a few tries), so every object stays recognisable
        candidates = [(rng.uniform(-0.05, 1.05 - side / big) * big, rng.uniform(-0.05, 1.05 - side / big) * big, side)
                      for _ in range(12)]
        box = min(candidates, key=lambda c: max([_overlap(c, b) for b in boxes], default=0.0))
        boxes.append(box)
        canvas = Image.new("RGBA", (round(side),) * 2, (0, 0, 0, 0))
        KINDS[label](ImageDraw.Draw(canvas), side, max(1, round(side / 28)), rng)
        if rng.random() < 0.5:
            canvas = canvas.transpose(Image.FLIP_LEFT_RIGHT)
        canvas = canvas.rotate(rng.uniform(-30, 30), resample=Image.BILINEAR, expand=True)
        cx, cy = box[0] + side / 2, box[1] + side / 2
        left, top = round(cx - canvas.width / 2), round(cy - canvas.height / 2)
        image.paste(canvas, (left, top), canvas)
        x0, y0, x1, y1 = canvas.getchannel("A").getbbox()
        drawn.append(tuple(min(max(v, 0), size) for v in (
            (left + x0) // SUPERSAMPLE, (top + y0) // SUPERSAMPLE,
            -(-(left + x1) // SUPERSAMPLE), -(-(top + y1) // SUPERSAMPLE))))
    return image.reduce(SUPERSAMPLE), labels, drawn  # box-filter average of each 3 x 3 block


def scene(seed: int, index: int, size: int = 64):
    """The image and its labels for scene `index` of stream `seed`: 1-4 distinct objects, drawn back to front.

    Returns (PIL RGB image [size x size], list of labels in drawing order).
    """
    image, labels, _ = _draw(seed, index, size)
    return image, labels


def scene_boxes(seed: int, index: int, size: int = 64) -> list:
    """The (x0, y0, x1, y1) pixel box of each object of `scene(seed, index, size)`, in the order of its labels.

    A box bounds every pixel the object's drawing touched (x1, y1 exclusive), parts hidden behind later
    objects included, clipped to the image.
    """
    return _draw(seed, index, size)[2]


class Scenes(torch.utils.data.Dataset):
    """Scenes 0 .. length - 1 of stream `seed` as (pixels [3, size, size], labels), CLIP-normalised."""

    def __init__(self, seed: int, length: int, size: int = 64):
        self.seed, self.length, self.size = seed, length, size

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"scene {index} is outside 0 .. {self.length - 1}")
        image, labels = scene(self.seed, index, self.size)
        return preprocess(image, self.size), labels


def batches(seed: int, batch_size: int, size: int = 64, start: int = 0):
    """An endless stream of batches (pixels [B, 3, size, size], label lists): scenes start, start + 1, ..."""
    data = Scenes(seed, sys.maxsize, size)
    for index in itertools.count(start, batch_size):
        items = [data[i] for i in range(index, index + batch_size)]
        yield torch.stack([p for p, _ in items]), [labels for _, labels in items]


def train_tokenizer(path, labels=LABELS, prompts=(PROMPT,), seed: int = 0) -> None:
    """Train the demo's SentencePiece model on the prompts and the label vocabulary, write it to `path`.

    LLaMA's conventions (unk 0, bos 1, eos 2, no pad: -1), and "," as its own piece so it can be the
    delimiter; the vocabulary is large enough for every word to become one piece, so "ice cream"
    is "▁ice", "▁cream" and every prompt ends with the piece "▁are", the answer position.
    """
    import sentencepiece as spm

    rng = random.Random(seed)
    words = sorted({w for text in (*prompts, *labels) for w in text.lower().split()})
    # the sentences the model will see: a prompt followed by a few labels
    sentences = [f"{prompts[i % len(prompts)]} " + ", ".join(rng.sample(labels, rng.randint(1, MAX_OBJECTS)))
                 for i in range(2000)]
    chars = sorted({c for w in words for c in w + "".join(prompts)})
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
        # room for every merge up to whole words (an upper bound: training stops when no pair is left)
        vocab_size=len(chars) + 4 + sum(len(w) for w in words), hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=[","],
        character_coverage=1.0, normalization_rule_name="identity", num_threads=1, minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())
