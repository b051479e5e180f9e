"""Training: the schedule, a short run that learns, and two DDP processes that stay in step."""

import random
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from nxtp_minimal import NXTP, Tokenizer, load
from nxtp_minimal.config import PROMPTS
from nxtp_minimal.llama import truncate
from nxtp_minimal.tools.errors import UserError
from nxtp_minimal.training import train
from nxtp_minimal.training.evaluate import HELD_OUT_SEED
from nxtp_minimal.training.scenes import LABELS, Scenes, scene, train_tokenizer


def test_learning_rate_schedule():
    peak, total, warmup = 1e-3, 100, 10
    lrs = [train.lr_at(s, total, warmup, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[warmup] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # cosine decays monotonically
    assert train.lr_at(total, total, warmup, peak) == pytest.approx(0.1 * peak)


def test_presets_fit_four_labels(tmp_path):
    tok_words = 140
    for name in ("demo", "tiny"):
        config = train.preset(name, tok_words)
        assert config.language.max_seq_len - config.vision.n_patches == train.TEXT_LENGTH
    with pytest.raises(ValueError, match="unknown preset"):
        train.preset("huge", tok_words)
    # the longest training text, with the longest prompt, fits (eos may be cut: its target is ignored)
    train_tokenizer(tmp_path / "t.model", prompts=PROMPTS)
    tok = Tokenizer(tmp_path / "t.model")
    longest = max(PROMPTS, key=lambda p: len(tok.encode(p)))
    text = tok.encode("<|image|>" + longest + " " + ", ".join(sorted(LABELS, key=len)[-4:]), bos=True)
    assert len(text) <= train.text_length(max(len(tok.encode(p)) for p in PROMPTS))


class Recorder(torch.nn.Module):
    """Stands in for the objective: records the prompt of every call."""

    def __init__(self):
        super().__init__()
        self.w, self.prompts = torch.nn.Parameter(torch.zeros(1)), []

    def forward(self, pixels, labels, prompt):
        self.prompts.append(prompt)
        return (self.w * 0).sum()


def test_prompt_augmentation_draws_one_prompt_per_batch():
    # as kaiyuyue/nxtp src/encoding.py construct_text_inputs: one random.choice for the whole batch
    objective = Recorder()
    optimizer = torch.optim.AdamW(objective.parameters())
    rng = random.Random(0)
    for _ in range(40):
        train.train_step(objective, optimizer, None, [["a", "b"], ["c"]], 1e-3, 1.0, rng, PROMPTS)
    assert all(isinstance(p, str) for p in objective.prompts) and set(objective.prompts) == set(PROMPTS)
    # without augmentation: the inference prompt and no draw for it, so the label shuffles take the numbers
    # they took when the shipped demo model was trained
    objective, rng, expected = Recorder(), random.Random(1), random.Random(1)
    train.train_step(objective, torch.optim.AdamW(objective.parameters()), None, [["a", "b", "c"]], 1e-3, 1.0, rng)
    expected.sample(["a", "b", "c"], 3)
    assert objective.prompts == [PROMPTS[0]] and rng.random() == expected.random()


def test_init_keeps_the_first_blocks(tmp_path):
    common = ["--preset", "tiny", "--steps", "2", "--batch-size", "4", "--warmup", "1", "--eval-every", "2",
              "--eval-scenes", "2", "--no-prompt-augmentation"]
    deep = train.main(common + ["--out-dir", str(tmp_path / "deep"), "--layers", "3"])
    args = train.parser().parse_args(common + ["--out-dir", str(tmp_path / "cut"), "--layers", "2",
                                               "--init", str(tmp_path / "deep" / "demo.safetensors")])
    tok = Tokenizer(tmp_path / "deep" / "demo_tokenizer.model")
    cut = train.initial_model(args, tok, train.TEXT_LENGTH)
    kept = truncate(deep.language_decoder.state_dict(), 2)
    assert cut.config.language.n_layers == 2 and kept.keys() == cut.language_decoder.state_dict().keys()
    for name, t in cut.language_decoder.state_dict().items():
        assert torch.equal(t, kept[name]), name
    for name, t in cut.vision_encoder.state_dict().items():
        assert torch.equal(t, deep.vision_encoder.state_dict()[name]), name
    args.layers = 4
    with pytest.raises(UserError, match="has only 3 decoder blocks"):
        train.initial_model(args, tok, train.TEXT_LENGTH)


def fixed_batch(size):
    data = Scenes(HELD_OUT_SEED, 16, size)
    items = [data[i] for i in range(16)]
    return torch.stack([p for p, _ in items]), [labels for _, labels in items]


def test_short_run_lowers_loss(tmp_path):
    torch.manual_seed(0)
    args = ["--preset", "tiny", "--out-dir", str(tmp_path), "--steps", "40", "--batch-size", "16",
            "--lr", "3e-3", "--warmup", "5", "--eval-every", "40", "--eval-scenes", "4"]
    trained = train.main(args)
    tok = Tokenizer(tmp_path / "demo_tokenizer.model")
    torch.manual_seed(0)  # train.main seeds the same way, so this is the model it started from
    initial = NXTP(train.preset("tiny", tok.n_words), tok)
    pixels, labels = fixed_batch(32)
    with torch.no_grad():
        before, after = initial.loss(pixels, labels).item(), trained.loss(pixels, labels).item()
    assert after < 0.5 * before, (before, after)
    # the checkpoint is the trained model in the NXTP format
    reloaded = load(tmp_path / "demo.safetensors", tmp_path / "demo_tokenizer.model")
    with torch.no_grad():
        assert reloaded.loss(pixels, labels).item() == pytest.approx(after, rel=1e-6)


def _rank(rank, world, port, out_dir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    model = train.main(["--preset", "tiny", "--out-dir", out_dir, "--steps", "4", "--batch-size", "4",
                        "--lr", "1e-2", "--warmup", "1", "--eval-every", "100", "--eval-scenes", "2"])
    save_file(model.state_dict(), f"{out_dir}/rank{rank}.safetensors")


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    tok = Tokenizer(tmp_path / "demo_tokenizer.model")
    torch.manual_seed(0)
    initial = NXTP(train.preset("tiny", tok.n_words), tok).state_dict()
    assert ranks[0].keys() == ranks[1].keys() == initial.keys()
    for name in initial:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert any(not torch.equal(ranks[0][n], initial[n]) for n in initial)  # it did train


def data_set(folder, n=64):
    """n generated scenes as two WebDataset shards (png + json labels); returns the brace pattern."""
    import io

    import webdataset as wds

    folder.mkdir()
    for s in range(2):
        with wds.TarWriter(str(folder / f"{s:06d}.tar")) as sink:
            for i in range(s * n // 2, (s + 1) * n // 2):
                image, labels = scene(0, i, 32)
                png = io.BytesIO()
                image.save(png, format="PNG")
                sink.write({"__key__": f"{i:06d}", "png": png.getvalue(), "json": {"labels": labels}})
    return str(folder / "{000000..000001}.tar")


def test_kill_9_and_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    pattern = data_set(tmp_path / "shards")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def command(out, *extra):
        return [sys.executable, "-m", "nxtp_minimal", "train", "--data", pattern, "--preset", "tiny", "--steps", "60",
                "--batch-size", "16", "--workers", "2", "--save-every", "4", "--eval-every", "3",
                "--out-dir", str(tmp_path / out), *extra]

    subprocess.run(command("whole"), env=env, check=True, capture_output=True)
    killed = subprocess.Popen(command("killed"), env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    while not checkpoint.exists() and killed.poll() is None:
        time.sleep(0.005)
    os.killpg(killed.pid, signal.SIGKILL)  # the trainer and its DataLoader workers, as kill -9 of the job
    assert killed.wait() == -signal.SIGKILL
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert step < 60, "the run ended before it could be killed"
    weights = tmp_path / "killed" / "model.safetensors"
    if weights.exists():  # written every 3 steps, never left truncated under its name
        load_file(weights)
    subprocess.run(command("killed", "--resume"), env=env, check=True, capture_output=True)
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(weights)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def _resume_rank(rank, world, port, out_dir, pattern, steps, resume):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # all steps inside the warmup, where the learning rate does not depend on --steps
    train.main(["--data", pattern, "--preset", "tiny", "--out-dir", out_dir, "--steps", str(steps), "--batch-size", "4",
                "--warmup", "10", "--workers", "0", "--save-every", "4"] + ["--resume"] * resume)


def test_two_process_resume_matches_an_uninterrupted_run(tmp_path):
    pattern = data_set(tmp_path / "shards", 32)
    runs = {"whole": [(8, False)], "resumed": [(4, False), (8, True)]}
    for name, parts in runs.items():
        for steps, resume in parts:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(_resume_rank, args=(2, port, str(tmp_path / name), pattern, steps, resume), nprocs=2,
                               start_method="spawn")
    whole, resumed = (load_file(tmp_path / name / "model.safetensors") for name in runs)
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-5, atol=1e-6)
