"""Training with the official objective (NXTP step 3): `python -m nxtp_minimal train`.

On synthetic scenes by default, or with --data on your own labelled images (JSON lines or WebDataset
shards, `training.data`; docs/training.md). One CPU process by default; under `torchrun` every rank reads
its own share of the data and DistributedDataParallel averages the gradients (gloo on CPU, nccl on GPU).
On scenes the run writes the demo tokenizer and weights into --out-dir, so
`nxtp_minimal.load(OUT/demo.safetensors, OUT/demo_tokenizer.model)` loads the result; with --data,
OUT/model.safetensors and OUT/tokenizer.model, and the held-out metrics in OUT/metrics.json.
Every --save-every steps OUT/checkpoint.pt holds all a run needs to go on (--resume).
The ablations of lessons 10 and 11 change one thing: the mask (--mask causal), or the decoder's depth
and where it starts (--layers, --init: the truncation of a trained decoder, as NXTP truncates LLaMA).
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from ..config import PROMPT, PROMPTS, LanguageConfig, NXTPConfig, VisionConfig
from ..llama import truncate
from ..model import NXTP
from ..prompt import training_ids
from ..tokenizer import Tokenizer
from ..tools.dist import distributed
from ..tools.errors import UserError, check_device, check_exists
from ..weights.format import load, read_config, save
from . import data, evaluate, scenes

# What the state dict, the optimizer state and every rank's RNG states depend on: a checkpoint goes on
# only under the same options. --steps may change (the schedule is a function of the step and --steps).
RESUME_OPTIONS = ("data", "val", "val_fraction", "preset", "batch_size", "seed", "mask", "layers", "init",
                  "prompt_augmentation", "workers", "lr", "warmup", "weight_decay", "clip")


def text_length(prompt_pieces: int) -> int:
    """Text after the image tokens: <|image|>, bos, the prompt, then up to 4 labels of at most two pieces
    each with 3 delimiters; eos may be cut off (its target is ignored anyway)."""
    return 2 + prompt_pieces + 4 * 2 + 3


TEXT_LENGTH = text_length(6)  # the inference prompt in the demo tokenizer: one piece per word


def data_text_length(tokenizer: Tokenizer, prompts: tuple, label_lists: list) -> int:
    """Text after the image tokens for the longest prompt and label list of the data, eos left out (its
    target is ignored, as in text_length)."""
    longest = max(prompts, key=lambda p: len(tokenizer.encode(p)))
    return max(len(training_ids(tokenizer, longest, labels, sys.maxsize)) for labels in label_lists) - 1


def preset(name: str, vocab_size: int, text: int = TEXT_LENGTH) -> NXTPConfig:
    """demo: the shipped model (64 px scenes). tiny: a fraction of a second per step, for the tests."""
    if name == "demo":
        vision = VisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=2)
        language = dict(dim=128, n_layers=2, n_heads=4)
    elif name == "tiny":
        vision = VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2)
        language = dict(dim=32, n_layers=1, n_heads=2)
    else:
        raise ValueError(f"unknown preset {name!r}: choose demo or tiny")
    return NXTPConfig(vision, LanguageConfig(
        **language, multiple_of=32, max_seq_len=vision.n_patches + text, vocab_size=vocab_size))


class Objective(nn.Module):
    """model.loss as a forward pass, so DistributedDataParallel can hook the backward."""

    def __init__(self, model: NXTP, mask: str = "label"):
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, pixels, labels, prompt):
        return self.model.loss(pixels, labels, prompt, self.mask)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak`, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_step(objective, optimizer, pixels, labels, lr: float, clip: float, rng: random.Random,
               prompts=(PROMPT,)) -> float:
    """One AdamW step on the objective at learning rate `lr`; returns the loss.

    Like the official construct_text_inputs, one prompt drawn from `prompts` serves the whole batch.
    """
    prompt = rng.choice(prompts) if len(prompts) > 1 else prompts[0]
    # the official training shuffles each sample's labels every time it is seen
    labels = [rng.sample(ls, len(ls)) for ls in labels]
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = objective(pixels, labels, prompt)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip)
    optimizer.step()
    return loss.item()


def parameter_groups(model: nn.Module, weight_decay: float) -> list:
    # nanoGPT's rule: decay matrices and embeddings, not norms, biases or the class/positional vectors
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "positional" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "positional" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def parser():
    p = argparse.ArgumentParser(prog="python -m nxtp_minimal train",
                                description="Train NXTP on synthetic scenes (the demo model) or on your labelled images.")
    p.add_argument("--out-dir", default="runs/demo", help="where the weights, tokenizer, metrics and checkpoint go")
    p.add_argument("--data", help="your labelled images: a JSON-lines file or shards 'DIR/{000000..000009}.tar' "
                                  "(docs/training.md); default: synthetic scenes")
    p.add_argument("--val", help="held-out data for --data, in either format; evaluated every --eval-every steps")
    p.add_argument("--val-fraction", type=float, help="hold out this fraction of a JSON-lines --data (a fixed split)")
    p.add_argument("--tokenizer", help="with --data: reuse this SentencePiece model (needed with --init); default: "
                                       "train one on the training labels")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad samples (listed in OUT/skipped.jsonl) "
                                                           "instead of stopping at the first")
    p.add_argument("--max-pixels", type=int, help="largest image in pixels (default: Pillow's limit; 0: none)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes decoding --data (0: none)")
    p.add_argument("--save-every", type=int, default=550, help="write OUT/checkpoint.pt every N steps (for --resume)")
    p.add_argument("--resume", action="store_true", help="go on from OUT/checkpoint.pt, written by the same command")
    p.add_argument("--preset", default="demo", choices=["demo", "tiny"], help="model size")
    p.add_argument("--steps", type=int, default=2200)
    p.add_argument("--batch-size", type=int, default=64, help="scenes per step on each rank")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--seed", type=int, default=0, help="init and label-order seed; rank r draws scene stream seed + r")
    p.add_argument("--eval-every", type=int, default=550, help="held-out evaluation and weights-file period (steps)")
    p.add_argument("--eval-scenes", type=int, default=200,
                   help="held-out scenes (or --val images) per evaluation during the run; the last one uses all of --val")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--prompt-augmentation", action=argparse.BooleanOptionalAction, default=True,
                   help="draw each step's prompt from the ten official templates, as the released models were "
                        "trained (the shipped demo model used --no-prompt-augmentation)")
    p.add_argument("--mask", choices=["label", "causal"], default="label",
                   help="label: the official non-causal label mask; causal: a plain language model (lesson 10)")
    p.add_argument("--layers", type=int, help="decoder blocks (default: the preset's, or all of --init's)")
    p.add_argument("--init", help="start from this NXTP checkpoint (trained with the same tokenizer), its "
                                  "decoder cut to its first --layers blocks (lesson 11)")
    return p


def initial_model(args, tokenizer: Tokenizer, text: int) -> NXTP:
    """The preset with random weights (seeded by --seed), or --init truncated to --layers blocks."""
    if args.init is None:
        torch.manual_seed(args.seed)  # same initial weights on every rank
        config = preset(args.preset, tokenizer.n_words, text)
        config.language.n_layers = args.layers or config.language.n_layers
        return NXTP(config, tokenizer)
    rows = read_config(args.init).language.vocab_size
    if rows != tokenizer.n_words:
        hint = (f"pass --tokenizer with the SentencePiece model {args.init} was trained with"
                if args.data else "use the --prompt-augmentation setting of that run")
        raise UserError(f"--init {args.init} was trained with another tokenizer than this run's ({rows} token rows, "
                        f"{tokenizer.path} gives {tokenizer.n_words} ids): {hint}")
    source = load(args.init, tokenizer)
    config, have = source.config, source.config.language.n_layers
    layers = args.layers or have
    if layers > have:
        raise UserError(f"--layers {layers}: {args.init} has only {have} decoder blocks to keep")
    config.language.n_layers = layers
    # the rotary table is rebuilt from max_seq_len, so a longer text than --init's costs nothing
    config.language.max_seq_len = max(config.language.max_seq_len, config.vision.n_patches + text)
    model = NXTP(config, tokenizer)
    state = {f"language_decoder.{k}": v for k, v in truncate(source.language_decoder.state_dict(), layers).items()}
    model.load_state_dict(state | {f"vision_encoder.{k}": v for k, v in source.vision_encoder.state_dict().items()})
    return model


def atomic(path, write) -> None:
    """write(temporary path), then rename it to `path`: a kill while writing leaves the old file or none,
    never a truncated one under the final name (os.replace is atomic on one filesystem)."""
    temporary = f"{path}.tmp"
    write(temporary)
    os.replace(temporary, path)


def check_options(args) -> None:
    if min(args.steps, args.batch_size, args.warmup, args.eval_every, args.eval_scenes, args.save_every,
           args.layers or 1) < 1:
        raise ValueError("--steps, --batch-size, --warmup, --eval-every, --eval-scenes, --save-every and --layers "
                         "must be at least 1")
    if args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")
    if args.data is None:
        given = [f"--{n.replace('_', '-')}" for n in ("val", "val_fraction", "tokenizer", "skip_bad") if getattr(args, n)]
        if given:
            raise UserError(f"{', '.join(given)}: only for training on your own images; add --data FILE.jsonl or "
                            "'SHARDS/{000000..000009}.tar', or leave it out to train on scenes")
        return
    if args.val and args.val_fraction:
        raise UserError("give --val or --val-fraction, not both")
    if args.val_fraction and data.is_shards(args.data):
        raise UserError("--val-fraction splits a JSON-lines file; for shards, give held-out shards with --val")
    if args.init and not args.tokenizer:
        raise UserError(f"--init {args.init} needs --tokenizer: the SentencePiece model it was trained with "
                        "(weights/demo_tokenizer.model for the demo model)")


def data_sources(args) -> tuple:
    """(training source, held-out source or None, rows of the samples the quick pass left out)."""
    sources, skipped = [], []
    for spec in (args.data, args.val):
        if spec is None or data.is_shards(spec):
            sources.append(spec and data.shard_paths(spec) and spec)  # the pattern, once its files are checked
            continue
        records, problems = data.read_jsonl(spec, args.max_pixels)
        if problems and not args.skip_bad:
            raise data.first_problem(problems)
        skipped += [p.row() for p in problems]
        if not records:
            raise ValueError(f"{spec} holds no usable samples: write one JSON object per line, e.g. {data.EXAMPLE}")
        sources.append(records)
    train_source, val_source = sources
    if args.val_fraction:
        train_source, val_source = data.split(train_source, args.val_fraction)
    return train_source, val_source, skipped


def data_tokenizer(args, out_dir: str, labels: list, prompts: tuple, rank: int, world: int) -> Tokenizer:
    """--tokenizer, copied beside the weights, or one trained on the training labels (kept on --resume)."""
    path = os.path.join(out_dir, "tokenizer.model")
    if rank == 0:
        if args.tokenizer:
            check_exists(args.tokenizer, "tokenizer file", "Give the SentencePiece model to reuse, or leave --tokenizer out")
            if not (os.path.exists(path) and os.path.samefile(args.tokenizer, path)):
                shutil.copyfile(args.tokenizer, path)
        elif not (args.resume and os.path.exists(path)):
            data.train_tokenizer(path, labels, prompts)
    if world > 1:
        dist.barrier()  # the other ranks read the tokenizer rank 0 wrote
    return Tokenizer(path)


def rank_state(rng: random.Random, skipped: list, device: str) -> dict:
    """What only this rank knows: its label-shuffle and torch RNG states and the samples it skipped."""
    state = {"shuffle": rng.getstate(), "torch": torch.get_rng_state(), "skipped": skipped}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path, model, optimizer, step: int, history: list, rank_states: list, args) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "history": history,
             # every rank has read exactly `step` batches: that is the data position
             "data_position": step, "ranks": rank_states,
             "options": {name: getattr(args, name) for name in RESUME_OPTIONS}}
    atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, args, world: int) -> dict:
    check_exists(path, "checkpoint", "Run the command without --resume to start")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, value in state["options"].items():
        if getattr(args, name) != value:
            option = "--" + name.replace("_", "-")
            raise UserError(f"{path} was written with {option} {value}, this command has {getattr(args, name)}: "
                            "resume with the options of the run that wrote it")
    if len(state["ranks"]) != world:
        raise UserError(f"{path} was written by {len(state['ranks'])} process(es), this run has {world}: resume with as many")
    return state


def gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def held_out(model, source, args, limit=None) -> tuple:
    """Loss and scores on the held-out data (all of it, or its first `limit` images), and its skipped rows."""
    predicted, reference, loss, skipped = evaluate.predict_data(
        model, source, 5, args.batch_size, limit, args.max_pixels, args.skip_bad)
    result = {k: v for k, v in evaluate.scores(predicted, reference, 5).items() if k != "scenes"}
    return {"images": len(reference), "loss": loss} | result, skipped


def write_json(path, obj, lines: bool = False) -> None:
    """`obj` as JSON, or each of its items as one JSON line, written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in obj) if lines else json.dump(obj, f, indent=1)
    atomic(path, write)


def main(argv=None) -> NXTP:
    args = parser().parse_args(argv)
    check_options(args)
    rank, world, device = distributed(check_device(args.device))
    if args.data is None and args.seed <= evaluate.HELD_OUT_SEED < args.seed + world:
        raise ValueError(f"scene stream {evaluate.HELD_OUT_SEED} is the held-out set; choose another --seed")
    os.makedirs(args.out_dir, exist_ok=True)
    prompts = PROMPTS if args.prompt_augmentation else (PROMPT,)
    skipped = []
    if args.data is None:
        tokenizer_path = os.path.join(args.out_dir, "demo_tokenizer.model")
        if rank == 0:
            scenes.train_tokenizer(tokenizer_path, prompts=prompts)
        if world > 1:
            dist.barrier()  # the other ranks read the tokenizer rank 0 wrote
        tokenizer = Tokenizer(tokenizer_path)
        text = text_length(max(len(tokenizer.encode(p)) for p in prompts))
        weights_path = os.path.join(args.out_dir, "demo.safetensors")
    else:
        train_source, val_source, skipped = data_sources(args)
        labels = data.label_lists(train_source)
        if not labels:
            raise ValueError(f"{args.data} holds no usable samples")
        tokenizer = data_tokenizer(args, args.out_dir, labels, prompts, rank, world)
        text = data_text_length(tokenizer, prompts, labels)
        weights_path = os.path.join(args.out_dir, "model.safetensors")
        skipped = skipped if rank == 0 else []  # every rank met the same quick-pass problems; list them once
    model = initial_model(args, tokenizer, text).to(device)
    objective = Objective(model, args.mask)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(objective)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    shuffle = random.Random(args.seed + rank)
    checkpoint_path = os.path.join(args.out_dir, "checkpoint.pt")
    start, history = 0, []
    if args.resume:
        state = load_checkpoint(checkpoint_path, args, world)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        mine = state["ranks"][rank]
        version, internal, gauss = mine["shuffle"]
        shuffle.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], device)
        start, history, skipped = state["data_position"], state["history"], mine["skipped"]
    if args.data is None:
        batches = ((p, ls, []) for p, ls in scenes.batches(args.seed + rank, args.batch_size,
                                                            model.config.vision.image_size, start * args.batch_size))
    else:
        stream = data.Stream(train_source, model.config.vision.image_size, args.batch_size, args.seed, rank, world,
                             start, max_pixels=args.max_pixels, skip_bad=args.skip_bad)
        batches = ready(data.loader(stream, args.workers))
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"{args.preset} model, {n / 1e6:.2f}M parameters, {world} process(es) on {device}"
              + (f", resuming after step {start}" if start else ""), file=sys.stderr)
        if args.data is not None and val_source is not None and start == 0:
            history.append({"step": 0} | held_out(model, val_source, args, args.eval_scenes)[0])

    bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, disable=rank != 0, file=sys.stderr)
    for step in bar:
        begin = time.perf_counter()
        pixels, labels, met = next(batches)
        skipped += met
        lr = lr_at(step - 1, args.steps, args.warmup, args.lr)
        loss = train_step(objective, optimizer, pixels.to(device), labels, lr, args.clip, shuffle, prompts)
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{world * args.batch_size / (time.perf_counter() - begin):.0f}")
        if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            if args.data is None:
                predicted, reference = evaluate.predict_scenes(model, evaluate.HELD_OUT_SEED, args.eval_scenes)
                recall = sum(map(evaluate.top_n_recall, predicted, reference)) / len(reference)
                report = f"held-out top-N recall {recall:.4f} ({args.eval_scenes} scenes)"
            elif val_source is not None:
                last = step == args.steps
                row, met = held_out(model, val_source, args, None if last else args.eval_scenes)
                skipped += met if last else []  # the last evaluation reads all of --val: list what it left out
                history.append({"step": step, "train_loss": loss} | row)
                report = f"held-out loss {row['loss']:.4f}, top-N recall {row['top_n_recall']:.4f} ({row['images']} images)"
            else:
                report = "no held-out data (--val, --val-fraction)"
            atomic(weights_path, lambda tmp: save(tmp, model))
            bar.write(f"step {step}: loss {loss:.4f}, {report}, saved {weights_path}", file=sys.stderr)
        if step % args.save_every == 0 or step == args.steps:
            states = gather(rank_state(shuffle, skipped, device), world)
            if rank == 0:
                save_checkpoint(checkpoint_path, model, optimizer, step, history, states, args)
    if args.data is not None:
        rows = [row for state in gather(skipped, world) for row in state]
        if rank == 0:
            rows = list({row["where"]: row for row in rows}.values())  # met again in every later pass
            if rows:
                write_json(os.path.join(args.out_dir, "skipped.jsonl"), rows, lines=True)
                print(f"skipped {len(rows)} bad sample(s), listed in {args.out_dir}/skipped.jsonl", file=sys.stderr)
            if history:
                final = history[-1] | {"skipped": len(rows), "history": history}
                write_json(os.path.join(args.out_dir, "metrics.json"), final)
    if world > 1:
        dist.destroy_process_group()
    return model.eval()


def ready(batches):
    """The Stream's items as (pixels, labels, skipped rows) training batches; its first bad sample, when not
    skipped, as the error it is."""
    pending = []
    for item in batches:
        if "error" in item:
            raise item["error"]
        pending += item["skipped"]
        if item["pixels"] is not None:
            yield item["pixels"], item["labels"], pending
            pending = []
