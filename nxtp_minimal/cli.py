"""Command line: `python -m nxtp_minimal {predict,convert,train,evaluate,bench} ...`.

Each command's options live with the code that does the work; this file only dispatches and turns
user errors into one line on stderr.
"""

import argparse
import importlib
import json
import sys

import torch
from tqdm import tqdm

COMMANDS = {
    "predict": "nxtp_minimal.cli",
    "convert": "nxtp_minimal.convert",
    "train": "nxtp_minimal.train",
    "evaluate": "nxtp_minimal.evaluate",
    "bench": "nxtp_minimal.bench",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, no traceback."""


def device_arg(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this PyTorch has no CUDA device; use --device cpu")
    return name


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nxtp_minimal predict", description="Label images with NXTP.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--weights", help="NXTP safetensors file (default: the demo model in weights/)")
    p.add_argument("--tokenizer", help="SentencePiece model that goes with --weights")
    p.add_argument("--top-k", type=int, default=10, help="number of branches, i.e. labels asked for")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON array instead of the table")
    return p


def predict(argv) -> None:
    from . import weights
    from .preprocess import load_image

    args = predict_parser().parse_args(argv)
    device = device_arg(args.device)
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


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m nxtp_minimal {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        sys.exit(2)
    command, rest = argv[0], argv[1:]
    run = predict if command == "predict" else importlib.import_module(COMMANDS[command]).main
    try:
        run(rest)
    except (UserError, FileNotFoundError, ValueError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
