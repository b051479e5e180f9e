"""`python -m nxtp_minimal bench`: the cached sampler against the official recompute-everything loop.

Models are built from random weights at three sizes, or are the demo model shipped in weights/, so the
benchmark needs no download. Both loops run on the same inputs, B images at a time, for a fixed number
of decode steps (no branch is allowed to finish early). `--engine onnx` also exports the model
(onnx_engine.py) and times the cached loop in onnxruntime on the same inputs.
"""

import argparse
import json
import multiprocessing
import os
import tempfile
import threading
import time

import torch

from .. import inference, sampling
from ..config import LanguageConfig, NXTPConfig, VisionConfig, released
from ..model import NXTP
from ..weights.format import load_demo
from . import onnx_engine
from .errors import UserError

PRESETS = {
    "tiny": lambda: NXTPConfig(
        VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2),
        LanguageConfig(dim=32, n_layers=2, n_heads=4, multiple_of=32, max_seq_len=64),
    ),
    "small": lambda: NXTPConfig(
        VisionConfig(image_size=224, patch_size=16, width=256, layers=4, heads=4),
        LanguageConfig(dim=512, n_layers=4, n_heads=4),
    ),
    "full": released,
    "demo": None,  # the shipped weights
}
PROMPT_IDS = [32000, 1, 450, 3618, 297, 278, 1967, 526]  # LLaMA ids of the official prompt
NEVER = -1  # a delimiter id no branch can write, so every run decodes exactly --steps steps


def build(preset: str, device, dtype) -> NXTP:
    """A model of the preset's shapes with random N(0, 0.02) weights, allocated once, in place."""
    if preset == "demo":
        return load_demo(device, dtype)
    with torch.device("meta"):
        model = NXTP(PRESETS[preset]())
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    return model.to(dtype).eval()


class PeakMemory:
    """Peak memory in MB while the block runs: CUDA allocator peak, or the process RSS polled every 5 ms."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while self.running:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.cuda:
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.running = False
            self.thread.join()
            self.mb = self.peak / 2**20


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_run(model, pixels, k, steps, fast, device, prompt_ids, decode="dynamic", autocast=None):
    """(prefix seconds incl. the image encoder, mean seconds per decode step, total seconds).

    fast=False: the official loop; else the cached sampler of `decode` (see inference.sample).
    """
    with torch.autocast(torch.device(device).type, autocast, enabled=autocast is not None, cache_enabled=False):
        return _timed_run(model, pixels, k, steps, fast, device, prompt_ids, decode)


def _timed_run(model, pixels, k, steps, fast, device, prompt_ids, decode):
    sync(device)
    t0 = time.perf_counter()
    if not fast:
        sampler, loop = inference.ReferenceSampler(model, pixels, k, prompt_ids), sampling.one_shot
    elif decode == "static":
        sampler, loop = model.static_sampler(pixels, k, prompt_ids, steps), sampling.one_shot_fixed
    else:
        sampler, loop = model.sampler(pixels, k, prompt_ids, steps), sampling.one_shot
    sync(device)
    t1 = time.perf_counter()
    loop(sampler.first, sampler.step, k, NEVER, max_tokens=steps + 1)
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / steps, t2 - t0


def export(preset, dtype, directory, prompt_ids):
    onnx_engine.export(build(preset, "cpu", dtype), directory, prompt_ids)


def fast_rows(model, engine, images, ks, steps, batches, repeats, device, prompt_ids, decodes=("dynamic",),
              autocast=None):
    """The cached loop of `model` (NXTP or onnx_engine.OnnxNXTP): one dict per (decode, batch, k).

    Warm-ups are not timed: one run first (kernels, allocator, caches), and for the static sampler one
    run of each shape, which captures its graph.
    """
    rows = []
    for decode in decodes:
        timed_run(model, images[:1], min(ks), 1, True, device, prompt_ids, decode, autocast)
        for batch in batches:
            pixels = images[:batch]
            for k in ks:
                if decode == "static":
                    timed_run(model, pixels, k, steps, True, device, prompt_ids, decode, autocast)
                with PeakMemory(device) as memory:
                    runs = sorted(timed_run(model, pixels, k, steps, True, device, prompt_ids, decode, autocast)
                                  for _ in range(repeats))
                prefix, step, total = runs[len(runs) // 2]
                rows.append(dict(engine=engine, decode=decode, batch=batch, k=k, steps=steps, fast_prefix_s=prefix,
                                 fast_step_s=step, fast_s=total, images_per_s=batch / total, fast_peak_mb=memory.mb,
                                 reference_s=None, ratio=None))
    return rows


def run(preset, ks, steps, device="cpu", dtype=torch.float32, reference=True, repeats=1, batches=(1,),
        engines=("torch",), onnx_dir=None, decodes=None, autocast=None):
    """One dict per (engine, batch, k). For `full` the reference loop runs one step and is extrapolated to `steps`.

    decodes: "dynamic" and/or "static" for the PyTorch engine (default: the device's, inference.default_decode).
    engines: "torch" and/or "onnx"; onnx exports the model to onnx_dir (default: a temporary folder) after
    the PyTorch rows, and onnxruntime loads the graphs once the PyTorch model is gone.
    """
    if "onnx" in engines:
        if torch.device(device).type != "cpu":
            raise UserError("bench --engine onnx runs onnxruntime on the CPU: use --device cpu")
        for module in ("onnx", "onnxscript", "onnxruntime"):
            onnx_engine.require(module)
    model = build(preset, device, dtype)
    prompt_ids = model.prompt_ids() if model.tokenizer is not None else PROMPT_IDS
    size = model.config.vision.image_size
    images = torch.randn(max(batches), 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    if "torch" in engines:
        decodes = decodes or [inference.default_decode(device)]
        rows = fast_rows(model, "torch", images, ks, steps, batches, repeats, device, prompt_ids, decodes, autocast)
    if reference and rows:
        extrapolate = preset == "full"  # one official step at k=20 pushes 20 x 265 tokens: ~80 s here
        for row in rows:
            pixels = images[: row["batch"]]
            prefix, step, total = timed_run(model, pixels, row["k"], 1 if extrapolate else steps, False, device,
                                            prompt_ids, autocast=autocast)
            row.update(reference_prefix_s=prefix, reference_step_s=step,
                       reference_s=prefix + steps * step if extrapolate else total,
                       reference_extrapolated=extrapolate)
            row["ratio"] = row["reference_s"] / row["fast_s"]
    if "onnx" in engines:
        del model  # the full model in float32 beside its graphs in onnxruntime: 14 GB
        with tempfile.TemporaryDirectory() as temporary:
            directory = onnx_dir or temporary
            # in a child process, which builds the same model: onnxscript's rewriter keeps the last graph it
            # exported alive, weights included, for as long as the process lives
            child = multiprocessing.get_context("spawn").Process(target=export, args=(preset, dtype, directory,
                                                                                      prompt_ids))
            child.start()
            child.join()
            if child.exitcode:
                raise UserError(f"exporting the {preset} model to ONNX failed (its error is above)")
            rows += fast_rows(onnx_engine.OnnxNXTP(directory), "onnx", images, ks, steps, batches, repeats, device,
                              prompt_ids)
    return [dict(preset=preset) | row for row in rows]


def table(rows) -> str:
    head = f"{'preset':>6} {'engine':>6} {'decode':>7} {'batch':>5} {'k':>4} {'steps':>5} | {'prefix s':>9} {'step s':>8} "
    head += f"{'total s':>8} {'images/s':>9} {'peak MB':>8} | "
    head += f"{'ref prefix':>10} {'ref step':>9} {'ref total':>10} | {'ratio':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['preset']:>6} {r['engine']:>6} {r['decode']:>7} {r['batch']:>5} {r['k']:>4} {r['steps']:>5} | "
        line += f"{r['fast_prefix_s']:9.3f} {r['fast_step_s']:8.3f} {r['fast_s']:8.3f} {r['images_per_s']:9.1f} "
        line += f"{r['fast_peak_mb']:8.0f} | "
        if r["reference_s"] is None:
            line += f"{'-':>10} {'-':>9} {'-':>10} | {'-':>6}"
        else:
            mark = "*" if r["reference_extrapolated"] else " "
            line += f"{r['reference_prefix_s']:10.3f} {r['reference_step_s']:9.3f} {r['reference_s']:9.3f}{mark} | "
            line += f"{r['ratio']:6.1f}"
        lines.append(line)
    if any(r.get("reference_extrapolated") for r in rows):
        lines.append("* reference loop timed for one decode step and extrapolated to all steps")
    return "\n".join(lines)


def main(argv=None) -> None:
    from .errors import DTYPES, check_device

    p = argparse.ArgumentParser(prog="python -m nxtp_minimal bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 10, 20, 50, 100])
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="images per call (one row per batch and k)")
    p.add_argument("--steps", type=int, default=3, help="decode steps after the first token")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=1, help="runs of the fast loop per k; the median is kept")
    p.add_argument("--no-reference", action="store_true", help="time only the cached loop")
    p.add_argument("--engine", nargs="+", choices=["torch", "onnx"], default=["torch"],
                   help="run the cached loop in PyTorch and/or exported to onnxruntime (needs pip install -e .[onnx])")
    p.add_argument("--decode", nargs="+", choices=inference.DECODES,
                   help="PyTorch sampler: dynamic shapes (the CPU default) and/or static shapes, captured as a CUDA "
                        "graph on a GPU (the GPU default); one set of rows each")
    p.add_argument("--autocast", choices=["bfloat16", "float16"], help="run under torch.autocast in this dtype")
    p.add_argument("--onnx", help="keep the ONNX export in this folder (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="one JSON object per row instead of the table")
    args = p.parse_args(argv)
    if args.steps < 1 or min(args.top_k) < 1 or args.repeats < 1 or min(args.batch) < 1:
        raise ValueError("--steps, --top-k, --batch and --repeats must be at least 1")
    rows = run(args.preset, args.top_k, args.steps, check_device(args.device), DTYPES[args.dtype],
               reference=not args.no_reference, repeats=args.repeats, batches=args.batch, engines=args.engine,
               onnx_dir=args.onnx, decodes=args.decode, autocast=args.autocast and DTYPES[args.autocast])
    if args.json:
        keys = ("preset", "engine", "decode", "batch", "k", "steps", "fast_s", "images_per_s", "reference_s", "ratio",
                "fast_peak_mb")
        for r in rows:
            print(json.dumps({key: r[key] for key in keys} | {"device": args.device, "dtype": args.dtype,
                                                              "autocast": args.autocast}))
    else:
        print(f"device {args.device}, {args.dtype}{', autocast ' + args.autocast if args.autocast else ''}, peak memory = process RSS (CPU) or CUDA allocator peak")
        print(table(rows))
