"""`python -m nxtp_minimal download g70m|g3m [--dir weights]`: the released model, from zero to `predict`.

With `huggingface_hub` (the optional extra `[download]`) it fetches LLaMA's tokenizer first (a gated
repository: a missing login fails before gigabytes are downloaded), then the NXTP checkpoint and CLIP
ViT-L/14 in Hugging Face's layout; checks the md5 sums; converts (`convert.convert_nxtp`); and prints
the `predict` command. Downloads stay in the Hugging Face cache, so a second run downloads nothing;
`--dir` receives the converted model and a copy of the tokenizer.
"""

import argparse
import hashlib
import os
import shlex
import shutil
import sys

from ..tools.errors import UserError
from .convert import convert_nxtp

CHECKPOINTS = {"g70m": "ckpt_epoch_03_iter_1656549.pth", "g3m": "ckpt_epoch_03_iter_0021360.pth"}
NXTP_REPO = "kaiyuyue/nxtp"
CLIP_REPO, CLIP_FILES = "openai/clip-vit-large-patch14", ("config.json", "model.safetensors")
LLAMA_REPO, TOKENIZER = "meta-llama/Llama-2-7b-hf", "tokenizer.model"
# The checkpoints' md5 prefixes are the official README's (kaiyuyue/nxtp README.md, the checkpoint
# table); the tokenizer's is the md5 of LLaMA's tokenizer.model as Meta distributes it.
MD5 = {
    CHECKPOINTS["g70m"]: "e177c7",
    CHECKPOINTS["g3m"]: "b2a69b",
    TOKENIZER: "eeec4125e9c7560836b4873b6f8e3025",
}


def fetch(repo: str, filename: str) -> str:
    """The path of `filename` of the Hugging Face repo `repo`, downloaded into the cache if needed."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise UserError(
            "the download command needs huggingface_hub: pip install huggingface_hub (the extra [download])"
        ) from None
    print(f"fetching {filename} from huggingface.co/{repo}", file=sys.stderr)
    try:
        return hf_hub_download(repo, filename)
    except LocalEntryNotFoundError:
        raise UserError(
            f"{filename} of huggingface.co/{repo} is not in the Hugging Face cache and cannot be downloaded "
            "now: check the network connection, and that HF_HUB_OFFLINE is not set"
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, GatedRepoError) or status in (401, 403):
            raise UserError(
                f"huggingface.co/{repo} is gated and this machine may not download from it yet: log in with "
                f"`hf auth login` and accept the license at https://huggingface.co/{repo}, then run this again"
            ) from None
        reason = str(e).partition("\n")[0]
        raise UserError(f"downloading {filename} from huggingface.co/{repo} failed: {reason}") from None


def check_md5(path: str, filename: str) -> None:
    """Compare the file's md5 with the published one (a prefix for the checkpoints)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    expected = MD5[filename]
    if not digest.hexdigest().startswith(expected):
        raise UserError(
            f"{filename} has md5 {digest.hexdigest()}, not the published {expected}...: the download is damaged or "
            f"not the released file; delete {os.path.realpath(path)} and run the download again"
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nxtp_minimal download",
        description="Download the released NXTP model, CLIP ViT-L/14 and LLaMA's tokenizer, check and convert them.",
    )
    p.add_argument("checkpoint", choices=sorted(CHECKPOINTS), help="trained on 70M (g70m) or 3M (g3m) image-text pairs")
    p.add_argument("--dir", default="weights", help="where the converted model and the tokenizer go (default: weights)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    tokenizer = fetch(LLAMA_REPO, TOKENIZER)
    check_md5(tokenizer, TOKENIZER)
    checkpoint = fetch(NXTP_REPO, CHECKPOINTS[args.checkpoint])
    check_md5(checkpoint, CHECKPOINTS[args.checkpoint])
    clip_files = [fetch(CLIP_REPO, name) for name in CLIP_FILES]
    clip = os.path.dirname(clip_files[0])  # the snapshot folder holds both: a Hugging Face CLIP folder
    os.makedirs(args.dir, exist_ok=True)
    out = os.path.join(args.dir, f"nxtp_{args.checkpoint}.safetensors")
    convert_nxtp(checkpoint, clip, out)
    tokenizer_copy = os.path.join(args.dir, TOKENIZER)
    shutil.copyfile(tokenizer, tokenizer_copy)
    print(f"wrote {out} and {tokenizer_copy}; label an image with:")
    command = ["python", "-m", "nxtp_minimal", "predict", "IMAGE", "--weights", out, "--tokenizer", tokenizer_copy]
    print(shlex.join([*command, "--top-k", "20"]))
