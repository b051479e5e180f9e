"""`python -m nxtp_minimal ablate mask|depth`: the experiments of lessons 10 and 11, trained and measured.

mask: the demo recipe twice, same seed and budget, with the official non-causal label mask and with a
plain causal mask over the same shuffled label lists. depth: NXTP's truncation in miniature: a demo
model with a 6-block decoder, then its first 1, 2 and 3 blocks (plus final norm and output layer)
fine-tuned for a short budget, against models of the same depth trained from scratch with that budget.
--seeds K trains the runs a lesson compares (mask: both masks; depth: the depth-1 pair) with seeds
0 .. K-1, so that a difference can be set against the spread between seeds; --steps N sets their budget.

Every run uses the demo tokenizer (no prompt augmentation, as the shipped demo model) and gets a row in
OUT/results.json measured on held-out scenes, and OUT/<name>.json with its training log (the held-out
checks the train command printed) and its recall scene by scene. Seed 0 is also stored in float16 as
OUT/<name>.safetensors, for the lessons to load and re-measure; the other seeds keep their numbers only,
so that weights/ stays small. A run already stored with its row is kept, so an interrupted command picks
up where it stopped, and two commands (mask and depth) can run side by side.
"""

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, replace
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
    seed: int = 0


SHORT = dict(steps=300, warmup=30)  # the depth experiment's fine-tuning budget, from scratch too
EXPERIMENTS = {
    "mask": [Run("mask_label", "label", 2, None), Run("mask_causal", "causal", 2, None)],
    "depth": [Run("depth6", "label", 6, None)]
    + [Run(f"depth{n}_truncated", "label", n, "depth6", **SHORT) for n in (1, 2, 3)]
    + [Run(f"depth{n}_scratch", "label", n, None, **SHORT) for n in (1, 2, 3)],
}
# The runs --seeds and --steps apply to. depth6 is the truncated runs' common start (one seed, 2200 steps);
# one depth is enough to set the truncated-vs-scratch gap against the seeds.
COMPARED = {"mask": ("mask_label", "mask_causal"), "depth": ("depth1_truncated", "depth1_scratch")}
CHECK = re.compile(r"step (\d+): loss ([0-9.]+), held-out top-N recall ([0-9.]+) \((\d+) scenes\)")


def plan(experiment: str, seeds: int = 1, steps: Optional[int] = None) -> list:
    """The runs of one command: every run of the experiment at seed 0, then the compared runs at seeds 1 .. K-1.

    A compared run at another budget than its default is named <name>_<steps>steps (warmup a tenth of it,
    as the depth experiment's), and each extra seed <name>_seed<s>, so every stored run keeps its name.
    """
    runs = []
    for run in EXPERIMENTS[experiment]:
        if run.name in COMPARED[experiment] and steps not in (None, run.steps):
            run = replace(run, name=f"{run.name}_{steps}steps", steps=steps, warmup=max(1, steps // 10))
        runs.append(run)
    compared = [r for base, r in zip(EXPERIMENTS[experiment], runs) if base.name in COMPARED[experiment]]
    return runs + [replace(r, name=f"{r.name}_seed{s}", seed=s) for s in range(1, seeds) for r in compared]


class Tee(io.TextIOBase):
    """Passes everything through to `stream` and keeps it: the train command's held-out checks become the log."""

    def __init__(self, stream):
        self.stream, self.text = stream, io.StringIO()

    def write(self, s):
        self.text.write(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()


def train_run(run: Run, out_dir: str, work_dir: str, demo_tokenizer: bytes):
    """Train one run with the train command; returns the trained model in float32 and its training log,
    the held-out check (200 scenes) of every sixth of the budget."""
    work = os.path.join(work_dir, run.name)
    argv = ["--out-dir", work, "--no-prompt-augmentation", "--mask", run.mask, "--layers", str(run.blocks),
            "--steps", str(run.steps), "--warmup", str(run.warmup), "--seed", str(run.seed),
            "--eval-every", str(max(1, run.steps // 6))]
    if run.init is not None:
        argv += ["--init", os.path.join(out_dir, f"{run.init}.safetensors")]
    printed = Tee(sys.stderr)
    with contextlib.redirect_stderr(printed):
        model = train.main(argv)
    log = [{"step": int(s), "loss": float(loss), "held_out_top_n_recall": float(r), "scenes": int(n)}
           for s, loss, r, n in CHECK.findall(printed.text.getvalue())]
    if not log or log[-1]["step"] != run.steps:
        raise RuntimeError(f"run {run.name}: the train command's held-out checks were not found in its output")
    with open(os.path.join(work, "demo_tokenizer.model"), "rb") as f:
        if f.read() != demo_tokenizer:
            raise UserError(f"run {run.name} trained a tokenizer other than the demo model's")
    return model, log


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nxtp_minimal ablate", description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--seeds", type=int, default=1, help="train the compared runs with seeds 0 .. N-1 "
                                                        "(mask: both masks; depth: the depth-1 pair)")
    p.add_argument("--steps", type=int, help="the compared runs' budget (default: mask 2200, depth 300)")
    p.add_argument("--out-dir", default="weights/ablations", help="where the float16 models and results.json go")
    p.add_argument("--work-dir", default="runs/ablations", help="where the training runs write their checkpoints")
    p.add_argument("--scenes", type=int, default=500, help="held-out scenes each row is measured on")
    args = p.parse_args(argv)
    if min(args.scenes, args.seeds, 1 if args.steps is None else args.steps) < 1:
        raise ValueError("--scenes, --seeds and --steps must be at least 1")
    os.makedirs(args.out_dir, exist_ok=True)
    results_path = os.path.join(args.out_dir, "results.json")

    def stored_rows():  # read again before every write: the other experiment's command may have added rows
        return json.load(open(results_path)) if os.path.isfile(results_path) else []

    with open(load_demo().tokenizer.path, "rb") as f:
        demo_tokenizer = f.read()
    for run in plan(args.experiment, args.seeds, args.steps):
        path, record_path = (os.path.join(args.out_dir, f"{run.name}.{ext}") for ext in ("safetensors", "json"))
        stored = os.path.isfile(path) or os.path.isfile(record_path)
        if stored and any(r["name"] == run.name for r in stored_rows()):
            print(f"{run.name}: kept from an earlier run (delete its files in {args.out_dir} to train again)",
                  file=sys.stderr)
            continue
        start = time.perf_counter()
        model, log = train_run(run, args.out_dir, args.work_dir, demo_tokenizer)
        seconds = time.perf_counter() - start
        # measure what ships: float16 weights computed in float32; an extra seed's stay in the work folder
        weights = path if run.seed == 0 else os.path.join(args.work_dir, run.name, "float16.safetensors")
        save(weights, model.half())
        model = load(weights, model.tokenizer)
        predicted, reference = evaluate.predict_scenes(model, evaluate.HELD_OUT_SEED, args.scenes)
        per_scene = [round(evaluate.top_n_recall(p, r), 6) for p, r in zip(predicted, reference)]
        train.write_json(record_path, {"name": run.name, "seed": run.seed, "steps": run.steps,
                                       "train_seconds": round(seconds), "log": log,
                                       "per_scene_top_n_recall": per_scene})
        row = {"name": run.name, "mask": run.mask, "blocks": run.blocks, "init": run.init, "steps": run.steps,
               "seed": run.seed} | evaluate.ablation_row(model, args.scenes)
        train.write_json(results_path, [r for r in stored_rows() if r["name"] != run.name] + [row])
        print(f"{run.name}: {json.dumps(row)} ({seconds:.0f} s training)", file=sys.stderr)
