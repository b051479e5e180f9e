"""`python -m nxtp_minimal ablate mask|depth`: the experiments of lessons 10 and 11, trained and measured.

mask: the demo recipe twice, same seed and budget, with the official non-causal label mask and with a
plain causal mask over the same shuffled label lists. depth: NXTP's truncation in miniature: a demo
model with a 6-block decoder, then its first 1, 2 and 3 blocks (plus final norm and output layer)
fine-tuned for a short budget, against models of the same depth trained from scratch with that budget.

Every run uses the demo tokenizer (no prompt augmentation, as the shipped demo model), is stored in
float16 as OUT/<name>.safetensors, and gets a row in OUT/results.json measured on held-out scenes.
A run already stored with its row is kept, so an interrupted command picks up where it stopped.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from ..tools.errors import UserError
from ..weights.format import load, load_demo, save
from . import evaluate, train


@dataclass
class Run:
    name: str
    mask: str
    blocks: int
    init: Optional[str]  # the run whose decoder is truncated, or None: from scratch
    steps: int = 2200  # the shipped demo model's budget and warmup
    warmup: int = 100


SHORT = dict(steps=300, warmup=30)  # the depth experiment's fine-tuning budget, from scratch too
EXPERIMENTS = {
    "mask": [Run("mask_label", "label", 2, None), Run("mask_causal", "causal", 2, None)],
    "depth": [Run("depth6", "label", 6, None)]
    + [Run(f"depth{n}_truncated", "label", n, "depth6", **SHORT) for n in (1, 2, 3)]
    + [Run(f"depth{n}_scratch", "label", n, None, **SHORT) for n in (1, 2, 3)],
}


def train_run(run: Run, out_dir: str, work_dir: str, demo_tokenizer: bytes):
    """Train one run with the train command; returns the trained model in float32."""
    work = os.path.join(work_dir, run.name)
    argv = ["--out-dir", work, "--no-prompt-augmentation", "--mask", run.mask, "--layers", str(run.blocks),
            "--steps", str(run.steps), "--warmup", str(run.warmup)]
    if run.init is not None:
        argv += ["--init", os.path.join(out_dir, f"{run.init}.safetensors")]
    model = train.main(argv)
    with open(os.path.join(work, "demo_tokenizer.model"), "rb") as f:
        if f.read() != demo_tokenizer:
            raise UserError(f"run {run.name} trained a tokenizer other than the demo model's")
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nxtp_minimal ablate", description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--out-dir", default="weights/ablations", help="where the float16 models and results.json go")
    p.add_argument("--work-dir", default="runs/ablations", help="where the training runs write their checkpoints")
    p.add_argument("--scenes", type=int, default=500, help="held-out scenes each row is measured on")
    args = p.parse_args(argv)
    if args.scenes < 1:
        raise ValueError("--scenes must be at least 1")
    os.makedirs(args.out_dir, exist_ok=True)
    results_path = os.path.join(args.out_dir, "results.json")
    rows = json.load(open(results_path)) if os.path.isfile(results_path) else []
    with open(load_demo().tokenizer.path, "rb") as f:
        demo_tokenizer = f.read()
    for run in EXPERIMENTS[args.experiment]:
        path = os.path.join(args.out_dir, f"{run.name}.safetensors")
        if os.path.isfile(path) and any(r["name"] == run.name for r in rows):
            print(f"{run.name}: kept from an earlier run ({path}; delete it to train again)", file=sys.stderr)
            continue
        start = time.perf_counter()
        model = train_run(run, args.out_dir, args.work_dir, demo_tokenizer)
        save(path, model.half())
        model = load(path, model.tokenizer)  # measure what ships: float16 weights computed in float32
        row = {"name": run.name, "mask": run.mask, "blocks": run.blocks, "init": run.init, "steps": run.steps}
        row |= evaluate.ablation_row(model, args.scenes)
        rows = [r for r in rows if r["name"] != run.name] + [row]
        with open(results_path, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"{run.name}: {json.dumps(row)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
