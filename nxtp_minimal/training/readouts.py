"""Which attention read-out is about the label? Maps from one uncached pass, scored against the scene's boxes.

Lesson 09 found that the attention of a label's last token peaks in the named object's box no more often
than in another object's box of the same scene. This module computes other read-outs of the same model,
from one pass of image tokens + prompt + label + delimiter under `masks.prefix_mask` (`inference.label_pass`:
one row per label, the labels of a batch of scenes side by side), and scores each the same way. A read-out
is a map [P] over the image patches per (scene, label):

- `attention_maps(record, "first" | "last" | "delimiter")`: the attention row of the label's first token,
  its last token (the row that predicts the delimiter; `inference.attention_maps` today) or the delimiter
  written after it, image columns renormalised, [N, blocks, heads, P]; average blocks and heads, or keep
  one block or one head;
- `contrastive(maps, image_of)`: a label's map minus the mean of the other labels' maps of its image;
- `gradient_weighted(record)` (`inference.gradient_weighted`): Chefer et al.'s generic attention
  explainability (ICCV 2021, "Generic Attention-model Explainability for Interpreting Bi-Modal and
  Encoder-Decoder Transformers"):
  per block, the attention times the gradient of the label's log-probability with respect to it, clipped
  at 0 per head and averaged over heads, rolled out over the blocks (R = I, R += Ā R), read at the rows
  that predict the label's tokens and the delimiter.

`named_vs_other(maps, inside, image_of)` is the score: per scene with two objects or more, how often a
label's peak falls in its own object's box, against in another object's box of the same scene (every
ordered pair once); `compare` runs every read-out on held-out scenes, with a paired interval over scenes.
"""

import os

import torch

from .. import inference
from ..model import NXTP
from ..weights.format import load, load_demo
from . import evaluate, scenes, stats, train

ROWS = ("first", "last", "delimiter")
# the shipped demo model, lesson 11's 6-block run, and untrained models of the demo's configuration (controls)
MODELS = ("demo", "depth6", "untrained_seed0", "untrained_seed1", "untrained_seed2")
RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "weights", "ablations", "readouts.json")


def load_model(name: str):
    """"demo", a stored ablation run such as "depth6" (with the demo tokenizer), or "untrained_seed<s>": the demo's
    configuration with random weights, seeded like `train.py`."""
    demo = load_demo()
    if name == "demo":
        return demo
    if name.startswith("untrained_seed"):
        torch.manual_seed(int(name.removeprefix("untrained_seed")))
        return NXTP(demo.config, demo.tokenizer).eval()
    return load(os.path.join(os.path.dirname(RESULTS), f"{name}.safetensors"), demo.tokenizer)


Record, record = inference.LabelPass, inference.label_pass  # one uncached pass with the gradients: inference.py
gradient_weighted = inference.gradient_weighted  # Chefer's rule, also `inference.attention_maps(readout="gradient")`


def attention_maps(rec: Record, which: str = "last") -> torch.Tensor:
    """[N, blocks, heads, P]: the attention of each label's `which` row (first, last, delimiter) to the image
    patches, renormalised over the patches (for "last", what `inference.attention_maps` returns)."""
    if which not in ROWS:
        raise ValueError(f"which must be one of {ROWS}, got {which!r}")
    rows = rec.rows(which)
    a = torch.stack([p[torch.arange(len(rows)), :, rows, : rec.n_image] for p in rec.attention], dim=1)
    return a / a.sum(-1, keepdim=True)


def contrastive(maps: torch.Tensor, image_of: torch.Tensor) -> torch.Tensor:
    """maps [N, P] -> each label's map minus the mean of the other labels' maps of the same image (a label
    alone in its image keeps its map)."""
    same = (image_of[:, None] == image_of[None]).float()  # [N, N]
    others = same - torch.eye(len(maps))
    count = others.sum(1, keepdim=True)
    return torch.where(count > 0, maps - others @ maps / count.clamp(min=1), maps)


def inside_boxes(boxes: list, grid: int, patch: int) -> torch.Tensor:
    """[len(boxes), grid * grid] bool: the patches whose centre lies in each pixel box (x0, y0, x1, y1),
    x1 and y1 exclusive (lesson 09's pointing game)."""
    centre = torch.arange(grid) * patch + patch / 2
    out = []
    for x0, y0, x1, y1 in boxes:
        rows, cols = (y0 <= centre) & (centre < y1), (x0 <= centre) & (centre < x1)
        out.append((rows[:, None] & cols[None, :]).flatten())
    return torch.stack(out)


def named_vs_other(maps: torch.Tensor, inside: torch.Tensor, image_of: torch.Tensor):
    """Per image with two labels or more: (named, other), two lists of rates.

    named: the share of the image's labels whose map [P] peaks in their own box; other: over every ordered
    pair (label a, another label b of the image), the share where a's peak lies in b's box. A map that is the
    same for every label of an image scores named = other.
    """
    peak = maps.argmax(-1)  # [N]
    named, other = [], []
    for b in image_of.unique().tolist():
        rows = (image_of == b).nonzero()[:, 0]
        if len(rows) < 2:
            continue
        hit = inside[rows][:, peak[rows]]  # [n, n]: hit[j, i] = label i's peak in label j's box
        n = len(rows)
        named.append(hit.diagonal().float().mean().item())
        other.append(((hit.sum() - hit.diagonal().sum()) / (n * (n - 1))).item())
    return named, other


def collect(model, indices, seed: int = evaluate.HELD_OUT_SEED, batch_size: int = 50) -> dict:
    """The read-outs of held-out scenes `indices`: name -> [N, ...] maps, plus "inside" [N, P] and
    "image_of" [N] (the position of each label's scene in `indices`).

    Names: "first", "last", "delimiter" ([N, blocks, heads, P], to average or pick from), "contrastive"
    (of the last token's map, blocks and heads averaged), "gradient" (rolled out) and "gradient, no rollout".
    """
    v = model.config.vision
    indices = list(indices)
    out = {k: [] for k in ("first", "last", "delimiter", "contrastive", "gradient", "gradient, no rollout",
                           "inside", "image_of")}
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        drawn = [scenes.scene(seed, i, v.image_size) for i in chunk]
        pixels = inference.pixels(model, [image for image, _ in drawn])
        rec = record(model, pixels, [labels for _, labels in drawn])
        for which in ROWS:
            out[which].append(attention_maps(rec, which))
        out["contrastive"].append(contrastive(out["last"][-1].mean((1, 2)), rec.image_of))
        out["gradient"].append(gradient_weighted(rec))
        out["gradient, no rollout"].append(gradient_weighted(rec, rollout=False))
        out["inside"] += [inside_boxes(scenes.scene_boxes(seed, i, v.image_size), v.grid, v.patch_size) for i in chunk]
        out["image_of"].append(rec.image_of + start)
    return {k: torch.cat(maps) for k, maps in out.items()}


def best_head(maps: torch.Tensor, inside: torch.Tensor, image_of: torch.Tensor) -> tuple:
    """(block, head) whose map alone (maps [N, blocks, heads, P]) has the largest named − other rate."""
    _, blocks, heads, _ = maps.shape
    gap = torch.tensor([[sum(n - o for n, o in zip(*named_vs_other(maps[:, b, h], inside, image_of)))
                         for h in range(heads)] for b in range(blocks)])
    return tuple(int(i) for i in divmod(int(gap.argmax()), heads))


def readout_maps(scored: dict, head: tuple) -> dict:
    """From `collect`'s results: read-out in words -> [N, P] maps. head: the (block, head) chosen elsewhere."""
    last = scored["last"]
    out = {"last token (today)": last.mean((1, 2)), "first token": scored["first"].mean((1, 2)),
           "delimiter row": scored["delimiter"].mean((1, 2))}
    for b in range(last.shape[1]):
        out[f"last token, block {b} only"] = last[:, b].mean(1)
    out[f"best head (block {head[0]}, head {head[1]}), chosen on other scenes"] = last[:, head[0], head[1]]
    out["contrastive (minus the other labels' mean)"] = scored["contrastive"]
    out["gradient-weighted, rolled out (Chefer)"] = scored["gradient"]
    out["gradient-weighted, blocks summed"] = scored["gradient, no rollout"]
    return out


def compare(model, scored=range(300), selection=range(300, 450), seed: int = evaluate.HELD_OUT_SEED) -> dict:
    """Every read-out on held-out scenes `scored` (the head is chosen on `selection`, other scenes of the same
    stream): read-out -> {"named", "other": mean rates, "difference", "error": the paired 95% interval over
    scenes with two objects or more, "scenes": their count, "head": the (block, head) chosen, "scene_index",
    "per_scene_named", "per_scene_other": those scenes and their rates}."""
    chosen = collect(model, selection, seed)
    head = best_head(chosen["last"], chosen["inside"], chosen["image_of"])
    results = collect(model, scored, seed)
    counts = results["image_of"].bincount()
    indices = [list(scored)[b] for b in range(len(counts)) if counts[b] >= 2]  # the scenes named_vs_other keeps
    out = {}
    for name, maps in readout_maps(results, head).items():
        named, other = named_vs_other(maps, results["inside"], results["image_of"])
        gap = stats.paired(named, other)
        out[name] = {"named": sum(named) / len(named), "other": sum(other) / len(other),
                     "difference": gap.difference, "error": gap.error, "scenes": gap.n, "head": list(head),
                     "scene_index": indices, "per_scene_named": named, "per_scene_other": other}
    return out


def main(path: str = RESULTS, scored=range(300), selection=range(300, 450)) -> dict:
    """Compare the read-outs on every model of MODELS and write the rates (per scene too) to `path`."""
    results = {"scored_scenes": [scored.start, scored.stop], "selection_scenes": [selection.start, selection.stop],
               "seed": evaluate.HELD_OUT_SEED, "models": {}}
    for name in MODELS:
        results["models"][name] = compare(load_model(name), scored, selection)
    train.write_json(path, results)
    return results


if __name__ == "__main__":
    for model_name, rows in main()["models"].items():
        for readout, r in rows.items():
            print(f"{model_name:7s} {readout:60s} named {r['named']:.3f} other {r['other']:.3f} "
                  f"difference {r['difference']:+.3f} ± {r['error']:.3f} ({r['scenes']} scenes)")
