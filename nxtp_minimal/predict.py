"""`python -m nxtp_minimal predict`: label image files, laid out like the official script or as JSON."""

import argparse
import json
import sys

from tqdm import tqdm

from .errors import DTYPES, UserError, check_device


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nxtp_minimal predict", description="Label images with NXTP.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--weights", help="NXTP safetensors file (default: the demo model in weights/)")
    p.add_argument("--tokenizer", help="SentencePiece model that goes with --weights")
    p.add_argument("--top-k", type=int, default=10, help="number of branches, i.e. labels asked for")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON array instead of the table")
    return p


def main(argv=None) -> None:
    from . import weights
    from .preprocess import load_image

    args = parser().parse_args(argv)
    device = check_device(args.device)
    if args.weights is None:
        print("no --weights given: using the demo model shipped in weights/", file=sys.stderr)
        model = weights.load_demo(device=device, dtype=DTYPES[args.dtype])
    else:
        model = weights.load(args.weights, args.tokenizer, device=device, dtype=DTYPES[args.dtype])
    if model.tokenizer is None:
        raise UserError("--weights needs --tokenizer (the SentencePiece model, see weights/README.md)")
    vocab = model.config.language.vocab_size
    if not 1 <= args.top_k <= vocab:
        raise UserError(f"--top-k must be between 1 and the vocabulary size {vocab}, got {args.top_k}")
    images = [load_image(path) for path in args.images]  # every path is checked before any work
    results = []
    for path, image in zip(args.images, tqdm(images, disable=len(images) < 2, desc="images")):
        labels = model.predict(image, k=args.top_k)[0]
        results.append({"image": path, "labels": [{"label": lab, "prob": p} for lab, p in labels]})
    if args.json:
        print(json.dumps(results))
        return
    for r in results:
        print(f"{r['image']}: top-{args.top_k} predictions:")  # the official script's layout
        for item in r["labels"]:
            print(f"| prob: {item['prob']:.5f} - {item['label']}")
