"""Training: the schedule, a short run that learns, and two DDP processes that stay in step."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from nxtp_minimal import NXTP, Tokenizer, load, train
from nxtp_minimal.evaluate import HELD_OUT_SEED
from nxtp_minimal.scenes import Scenes


def test_learning_rate_schedule():
    peak, total, warmup = 1e-3, 100, 10
    lrs = [train.lr_at(s, total, warmup, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[warmup] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # cosine decays monotonically
    assert train.lr_at(total, total, warmup, peak) == pytest.approx(0.1 * peak)


def test_presets_fit_four_labels():
    tok_words = 140
    for name in ("demo", "tiny"):
        config = train.preset(name, tok_words)
        assert config.language.max_seq_len - config.vision.n_patches == train.TEXT_LENGTH
    with pytest.raises(ValueError, match="unknown preset"):
        train.preset("huge", tok_words)


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
