"""`python -m nxtp_minimal download`, offline: huggingface_hub reads a cache laid out here by hand with small
files in the official formats (HF_HUB_OFFLINE=1, HF_HUB_CACHE), so the real download path runs."""

import hashlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

import nxtp_minimal
from conftest import REPO
from make_synthetic_official import save_hf_clip, split
from nxtp_minimal import NXTP, NXTPConfig
from nxtp_minimal.weights import download
from nxtp_minimal.tools.cli import main

pytest.importorskip("huggingface_hub", reason="the download command's library: pip install -r requirements-dev.txt")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHECKPOINT = download.CHECKPOINTS["g70m"]
# LLaMA's heads are inferred as dim / 128 (as for the released model), CLIP's read from config.json
CONFIG = NXTPConfig(
    nxtp_minimal.VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4),
    nxtp_minimal.LanguageConfig(dim=128, n_layers=1, n_heads=1, vocab_size=140),  # the demo tokenizer's
)


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def hub_path(cache, repo, filename):
    """Where huggingface_hub keeps `filename` of `repo` at revision main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    (folder / "snapshots" / COMMIT).mkdir(parents=True, exist_ok=True)
    return folder / "snapshots" / COMMIT / filename


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A small NXTP in float16, and a hub cache holding it as the official files: the checkpoint, OpenAI's
    CLIP in Hugging Face's layout, and a SentencePiece model standing in for LLaMA's tokenizer."""
    torch.manual_seed(0)
    with torch.no_grad():
        model = NXTP(CONFIG).half()
        for p in model.parameters():
            p.normal_(0, 0.5)  # LayerNorm and RMSNorm weights too, so a swapped tensor shows
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    checkpoint, clip = split(tensors, vision_layers=2, trained_blocks=1)
    cache = tmp_path_factory.mktemp("hub")
    torch.save(checkpoint, hub_path(cache, download.NXTP_REPO, CHECKPOINT))
    save_hf_clip(clip, hub_path(cache, download.CLIP_REPO, "config.json").parent, heads=4)
    tokenizer = hub_path(cache, download.LLAMA_REPO, download.TOKENIZER)
    tokenizer.write_bytes((REPO / "weights" / "demo_tokenizer.model").read_bytes())
    return {"tensors": tensors, "cache": cache}


def run(cache, argv, md5s, tmp_path):
    """The command in a fresh process (huggingface_hub reads HF_HUB_* when imported), with MD5 entries
    replaced by `md5s`: the test files are not the released ones."""
    code = ("import json, sys; from nxtp_minimal.weights import download; download.MD5.update(json.loads(sys.argv[1])); "
            "from nxtp_minimal.tools.cli import main; main(sys.argv[2:])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home")}
    return subprocess.run([sys.executable, "-c", code, json.dumps(md5s), "download", *argv],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def error_line(result) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_download_checks_converts_and_says_what_to_run(released, tmp_path):
    cache, snapshot = released["cache"], hub_path(released["cache"], download.NXTP_REPO, CHECKPOINT)
    tokenizer = hub_path(cache, download.LLAMA_REPO, download.TOKENIZER)
    md5s = {CHECKPOINT: md5(snapshot)[:6], download.TOKENIZER: md5(tokenizer)}  # a prefix, as published
    result = run(cache, ["g70m", "--dir", "out"], md5s, tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert result.stdout.splitlines()[-1] == (
        "python -m nxtp_minimal predict IMAGE --weights out/nxtp_g70m.safetensors --tokenizer out/tokenizer.model "
        "--top-k 20"
    )
    assert (out / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    converted = load_file(out / "nxtp_g70m.safetensors")
    assert converted.keys() == released["tensors"].keys()
    for name, t in released["tensors"].items():
        assert converted[name].dtype == torch.float16 and torch.equal(converted[name], t), name
    model = nxtp_minimal.load(out / "nxtp_g70m.safetensors", tokenizer=out / "tokenizer.model")
    assert model.config == CONFIG


def test_wrong_md5_names_the_file_and_what_to_do(released, tmp_path):
    cache = released["cache"]
    tokenizer = hub_path(cache, download.LLAMA_REPO, download.TOKENIZER)
    checkpoint = hub_path(cache, download.NXTP_REPO, CHECKPOINT)
    result = run(cache, ["g70m", "--dir", "out"], {download.TOKENIZER: md5(tokenizer)}, tmp_path)
    assert error_line(result) == (
        f"error: {CHECKPOINT} has md5 {md5(checkpoint)}, not the published e177c7...: the download is damaged or "
        f"not the released file; delete {os.path.realpath(checkpoint)} and run the download again"
    )
    assert not (tmp_path / "out" / "nxtp_g70m.safetensors").exists()


def test_file_missing_from_the_offline_cache(tmp_path):
    result = run(tmp_path / "empty_cache", ["g3m"], {}, tmp_path)
    assert error_line(result) == (
        f"error: tokenizer.model of huggingface.co/{download.LLAMA_REPO} is not in the Hugging Face cache and "
        "cannot be downloaded now: check the network connection, and that HF_HUB_OFFLINE is not set"
    )


def test_gated_tokenizer_without_login(monkeypatch, tmp_path, capsys):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    asked = []

    def refuse(repo, filename, **kwargs):
        asked.append(repo)
        response = types.SimpleNamespace(status_code=401, headers={}, request=None)
        raise GatedRepoError(f"401 Client Error. Cannot access gated repo for url {repo}/{filename}", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(SystemExit) as e:
        main(["download", "g70m", "--dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and asked == [download.LLAMA_REPO]  # the gated file first: nothing else fetched
    assert lines[-1] == (
        "error: huggingface.co/meta-llama/Llama-2-7b-hf is gated and this machine may not download from it yet: "
        "log in with `hf auth login` and accept the license at https://huggingface.co/meta-llama/Llama-2-7b-hf, "
        "then run this again"
    )
