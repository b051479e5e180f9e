"""Training on synthetic scenes with the official objective (NXTP step 3): `python -m nxtp_minimal train`.

One CPU process by default; under `torchrun` every rank draws its own scene stream and
DistributedDataParallel averages the gradients (gloo on CPU, nccl on GPU). The run writes the demo
tokenizer and checkpoints in the NXTP safetensors format into --out-dir, so
`nxtp_minimal.load(OUT/demo.safetensors, OUT/demo_tokenizer.model)` loads the result.
The ablations of lessons 10 and 11 change one thing: the mask (--mask causal), or the decoder's depth
and where it starts (--layers, --init: the truncation of a trained decoder, as NXTP truncates LLaMA).
"""

import argparse
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from ..config import PROMPT, PROMPTS, LanguageConfig, NXTPConfig, VisionConfig
from ..llama import truncate
from ..model import NXTP
from ..tokenizer import Tokenizer
from ..tools.dist import distributed
from ..tools.errors import UserError, check_device
from ..weights.format import load, read_config, save
from . import evaluate, scenes


def text_length(prompt_pieces: int) -> int:
    """Text after the image tokens: <|image|>, bos, the prompt, then up to 4 labels of at most two pieces
    each with 3 delimiters; eos may be cut off (its target is ignored anyway)."""
    return 2 + prompt_pieces + 4 * 2 + 3


TEXT_LENGTH = text_length(6)  # the inference prompt in the demo tokenizer: one piece per word


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
                                description="Train NXTP from scratch on synthetic scenes (the demo model).")
    p.add_argument("--out-dir", default="runs/demo", help="where demo.safetensors and demo_tokenizer.model go")
    p.add_argument("--preset", default="demo", choices=["demo", "tiny"], help="model size")
    p.add_argument("--steps", type=int, default=2200)
    p.add_argument("--batch-size", type=int, default=64, help="scenes per step on each rank")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--seed", type=int, default=0, help="init and label-order seed; rank r draws scene stream seed + r")
    p.add_argument("--eval-every", type=int, default=550, help="held-out evaluation and checkpoint period (steps)")
    p.add_argument("--eval-scenes", type=int, default=200, help="held-out scenes per evaluation")
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
    if read_config(args.init).language.vocab_size != tokenizer.n_words:
        raise UserError(f"--init {args.init} was trained with another tokenizer than this run's ({tokenizer.n_words} "
                        "ids): use the --prompt-augmentation setting of that run")
    source = load(args.init, tokenizer)
    config, have = source.config, source.config.language.n_layers
    layers = args.layers or have
    if layers > have:
        raise UserError(f"--layers {layers}: {args.init} has only {have} decoder blocks to keep")
    config.language.n_layers = layers
    model = NXTP(config, tokenizer)
    state = {f"language_decoder.{k}": v for k, v in truncate(source.language_decoder.state_dict(), layers).items()}
    model.load_state_dict(state | {f"vision_encoder.{k}": v for k, v in source.vision_encoder.state_dict().items()})
    return model


def main(argv=None) -> NXTP:
    args = parser().parse_args(argv)
    if min(args.steps, args.batch_size, args.warmup, args.eval_every, args.eval_scenes, args.layers or 1) < 1:
        raise ValueError("--steps, --batch-size, --warmup, --eval-every, --eval-scenes and --layers must be at least 1")
    rank, world, device = distributed(check_device(args.device))
    if args.seed <= evaluate.HELD_OUT_SEED < args.seed + world:
        raise ValueError(f"scene stream {evaluate.HELD_OUT_SEED} is the held-out set; choose another --seed")
    os.makedirs(args.out_dir, exist_ok=True)
    tokenizer_path = os.path.join(args.out_dir, "demo_tokenizer.model")
    prompts = PROMPTS if args.prompt_augmentation else (PROMPT,)
    if rank == 0:
        scenes.train_tokenizer(tokenizer_path, prompts=prompts)
    if world > 1:
        dist.barrier()  # the other ranks read the tokenizer rank 0 wrote
    tokenizer = Tokenizer(tokenizer_path)
    text = text_length(max(len(tokenizer.encode(p)) for p in prompts))
    model = initial_model(args, tokenizer, text).to(device)
    objective = Objective(model, args.mask)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(objective)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    data = scenes.batches(args.seed + rank, args.batch_size, model.config.vision.image_size)
    shuffle = random.Random(args.seed + rank)
    checkpoint = os.path.join(args.out_dir, "demo.safetensors")
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"{args.preset} model, {n / 1e6:.2f}M parameters, {world} process(es) on {device}", file=sys.stderr)

    bar = tqdm(range(1, args.steps + 1), disable=rank != 0, file=sys.stderr)
    for step in bar:
        start = time.perf_counter()
        pixels, labels = next(data)
        lr = lr_at(step - 1, args.steps, args.warmup, args.lr)
        loss = train_step(objective, optimizer, pixels.to(device), labels, lr, args.clip, shuffle, prompts)
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{world * args.batch_size / (time.perf_counter() - start):.0f}")
        if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            predicted, reference = evaluate.predict_scenes(model, evaluate.HELD_OUT_SEED, args.eval_scenes)
            recall = sum(map(evaluate.top_n_recall, predicted, reference)) / len(reference)
            save(checkpoint, model)
            bar.write(f"step {step}: loss {loss:.4f}, held-out top-N recall {recall:.4f} "
                      f"({args.eval_scenes} scenes), saved {checkpoint}", file=sys.stderr)
    if world > 1:
        dist.destroy_process_group()
    return model.eval()
