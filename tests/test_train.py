"""Training: the schedule, a short run that learns, and two DDP processes that stay in step."""

import random
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from nxtp_minimal import NXTP, Tokenizer, load
from nxtp_minimal.training import train
from nxtp_minimal.config import PROMPTS
from nxtp_minimal.tools.errors import UserError
from nxtp_minimal.training.evaluate import HELD_OUT_SEED
from nxtp_minimal.llama import truncate
from nxtp_minimal.training.scenes import LABELS, Scenes, train_tokenizer


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
