"""Official references on a device: the official NXTP code run for the fixture models and cases.

The committed fixtures (tests/fixtures/README.md) hold what kaiyuyue/nxtp at 11cf60c computes in float32 on
a CPU. This script runs the same code, with its CUDA paths unchanged (its modules, `torch.autocast`), on a
device and in three regimes, and writes one safetensors file per regime, in the layout `cpu_fixture_set`
gives the CPU fixtures (tests/test_gpu_official.py compares the port with them):

    float32            float32 weights, no autocast: what the CPU fixtures hold
    autocast-bfloat16  float32 weights under torch.autocast(bfloat16); the port's --autocast bfloat16
    official-float16   the published regime: src/infer.py runs under torch.autocast(cfg.ptdtype), and
                       src/functions.py `load_llama`/`load_clip` build the models under
                       torch.set_default_tensor_type(cfg.fpdtype); configs/config_g3m.py and config_g70m.py
                       set dtype "float16" with force_to_use_fp16, so src/utils.py `set_dtype` gives float16
                       weights under float16 autocast; the port's --dtype float16 --autocast float16

Contents: the ViT's hidden states and tokens, the decoder's block outputs and logits under the causal, prefix
and label masks, the tiny model end to end (decoder input, first-step logits, every branch's tokens and
probabilities, ranked labels and scores; the batched case too) and the training loss. The official code is
never committed here: it is read from folders that `--export-sources` fills from the fetched repositories.

    python tests/make_gpu_official.py --export-sources .gpu_check        # official src/ and CLIP's clip/
    python tests/make_gpu_official.py --official .gpu_check/nxtp/src --clip .gpu_check/clip \\
        --device cuda --out tests/fixtures/gpu
    python tests/make_gpu_official.py ... --device cpu --regimes float32 --out /tmp/x   # must equal the fixtures

Each run prints, per regime, the largest difference of every output from the CPU fixtures.
"""

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_COMMIT = "11cf60c86249dcc655a6d828501abe971664c8ba"  # kaiyuyue/nxtp, the fixtures' commit
CLIP_COMMIT = "d05afc436d78f1c48dc0dbf8e5980a9d471f35f6"  # openai/CLIP; NXTP uses its LayerNorm and QuickGELU
MIRRORS = {"nxtp": "/work/.mirror/kaiyuyue+nxtp/repo", "clip": "/work/.mirror/openai+CLIP/repo"}
# regime: (official dtype name of the weights, autocast dtype or None)
REGIMES = {
    "float32": ("float32", None),
    "autocast-bfloat16": ("float32", torch.bfloat16),
    "official-float16": ("float16", torch.float16),
}
DELIMITER = 29892  # "," as src/infer.py and src/decoding.py hard-code it


def file_name(regime: str) -> str:
    return f"official.{regime}.safetensors"


def export_sources(folder) -> None:
    """The official src/ and CLIP's clip/ at the pinned commits, from the fetched mirrors, into folder
    (an ignored one: .gitignore names .gpu_check/)."""
    folder = Path(folder)
    for name, commit, path, into in (("nxtp", OFFICIAL_COMMIT, "src", folder / "nxtp"),
                                     ("clip", CLIP_COMMIT, "clip", folder)):
        into.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", f"--git-dir={MIRRORS[name]}", "archive", commit, path],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    print(f"official sources in {folder}/nxtp/src and {folder}/clip")


# --- the official modules ---

def import_official(official, clip):
    """The official modules, imported from their source folders as the official scripts import them."""
    # src/utils.py imports nltk and fairscale at load time, for caption parsing and model parallelism in
    # training, which nothing here calls; the GPU machine has neither, so empty stand-ins take their names
    stand_ins = {"nltk": {}, "nltk.corpus": {"words": None}, "nltk.stem": {"WordNetLemmatizer": None},
                 "fairscale": {}, "fairscale.nn": {}, "fairscale.nn.model_parallel": {},
                 "fairscale.nn.model_parallel.initialize": {"initialize_model_parallel": None}}
    missing = {top for top in ("nltk", "fairscale") if importlib.util.find_spec(top) is None}
    for name, attributes in stand_ins.items():
        if name.split(".")[0] in missing:
            sys.modules[name] = types.SimpleNamespace(**attributes)
    # only CLIP's layer classes (clip/model.py): its package __init__ also loads the BPE tokenizer, whose
    # ftfy NXTP never uses and the GPU machine lacks
    package = types.ModuleType("clip")
    package.__path__ = [str(Path(clip).resolve())]
    sys.modules["clip"] = package
    package.model = importlib.import_module("clip.model")
    sys.path.insert(0, str(Path(official).resolve()))
    names = ("models.clip", "models.lang", "models.classifier", "decoding", "encoding", "functions", "utils")
    return types.SimpleNamespace(**{n.split(".")[-1]: importlib.import_module(n) for n in names})


def regime_cfg(o, regime: str):
    """A config as src/utils.py `set_dtype` completes it, for the regime's weights (fpdtype) and autocast."""
    weights, autocast = REGIMES[regime]
    cfg = o.utils.set_dtype(types.SimpleNamespace(dtype=weights, force_to_use_fp16=True))
    cfg.autocast = autocast
    return cfg


@contextmanager
def default_tensor_type(fpdtype):
    """How src/functions.py `load_llama`/`load_clip` build the models: in the regime's dtype, then back.
    torch deprecates the call (since 2.1) but still honours it, and it is what the official code does."""
    warnings.filterwarnings("ignore", r"torch\.set_default_tensor_type\(\) is deprecated")
    torch.set_default_tensor_type(fpdtype)
    try:
        yield
    finally:
        torch.set_default_tensor_type(torch.FloatTensor)


def autocast(cfg, device):
    """src/infer.py and src/train.py: `torch.amp.autocast(device_type="cuda", dtype=cfg.ptdtype)`."""
    return torch.amp.autocast(device_type=torch.device(device).type, dtype=cfg.autocast,
                              enabled=cfg.autocast is not None)


def build_vit(o, cfg, vision: dict, embed_dim: int, weights: dict, device):
    """src/models/clip.py `build_clip_model`'s vision tower: CLIPViT with its projection replaced by the NXTP
    linear one. That function also casts CLIP's layers to float16 (clip.model.convert_weights) before the
    checkpoint loads; in the official regime all is float16 already, and in a float32 regime that cast would
    make the float32 forward fail, so the same modules are built here without it."""
    with default_tensor_type(cfg.fpdtype):
        vit = o.clip.CLIPViT(vision["image_size"], vision["patch_size"], vision["width"], vision["layers"],
                             vision["heads"], embed_dim)
        del vit.proj
        vit.proj = nn.Linear(vision["width"], embed_dim, bias=False)
    vit.load_state_dict({k[len("vision_encoder."):]: v for k, v in weights.items() if k.startswith("vision_encoder.")})
    return vit.to(device).eval()


def build_llama(o, cfg, language: dict, vocab_size: int, keep: int, weights: dict, device):
    """src/models/lang.py LLaMATransformer as src/functions.py `load_llama` builds it, truncated to `keep`
    blocks (`shave_language_decoder_at`)."""
    args = o.lang.ModelArgs(dim=language["dim"], n_layers=language["n_layers"], n_heads=language["n_heads"],
                            multiple_of=language["multiple_of"], norm_eps=language["norm_eps"],
                            max_seq_len=language["max_seq_len"], vocab_size=vocab_size)
    args.shave_language_decoder_at = keep
    with default_tensor_type(cfg.fpdtype):
        llama = o.lang.LLaMATransformer(args)
    llama.load_state_dict({k[len("language_decoder."):]: v for k, v in weights.items()
                           if k.startswith("language_decoder.")})
    return llama.to(device).eval()


# --- the cases ---

@torch.inference_mode()
def pieces(o, regime, device) -> dict:
    """vit.safetensors and llama.safetensors: the ViT, and the decoder under each mask."""
    out = {}
    t, meta = read(FIXTURES / "vit.safetensors")
    cfg = regime_cfg(o, regime)
    vit = build_vit(o, cfg, meta["vision"], meta["embed_dim"], t, device)
    pixels = t["input.pixels"].to(device)
    with autocast(cfg, device):
        out["vit.output.hidden"] = vit(pixels, skip_projection=True)
        out["vit.output.tokens"] = vit(pixels)

    t, meta = read(FIXTURES / "llama.safetensors")
    language = meta["language"] | {"n_layers": 4}  # the fixture's model: 4 blocks built, 2 kept
    llama = build_llama(o, cfg, language, meta["vocab_size"], meta["language"]["n_layers"], t, device)
    blocks = []
    hooks = [layer.register_forward_hook(lambda m, i, h: blocks.append(h)) for layer in llama.layers]
    n_image = meta["n_image_tokens"]
    dtype = llama.tok_embeddings.weight.dtype  # embeddings enter in the weights' dtype, as Wte[tokens] do
    with autocast(cfg, device):
        out["llama.causal.logits"] = llama(t["causal.tokens"].to(device), start_pos=0, is_train=True)
        for hook in hooks:
            hook.remove()
        out |= {f"llama.causal.layer_output.{i}": h for i, h in enumerate(blocks)}
        # the inference flags of src/configs/config_g3m.py: prefix_image_tok_embeds, decouple_label_tok_embeds
        out["llama.prefix.logits_last"] = llama(
            t["prefix.embeds"].to(device, dtype), dummy_token_index=0, offset=n_image,
            input_tokens=t["prefix.input_tokens"].to(device), prefix_image_tok_embeds=True,
            decouple_label_tok_embeds=True, is_train=False)
        out["llama.train.logits"] = llama(
            t["train.embeds"].to(device, dtype), dummy_token_index=0, offset=n_image,
            input_tokens=t["train.input_tokens"].to(device), prefix_image_tok_embeds=True,
            decouple_label_tok_embeds=True, is_train=True)
    return out


def tiny_model(o, cfg, device, tokenizer_path):
    """The tiny model as src/infer.py assembles it: `load_llama` (tokenizer and special tokens included),
    the CLIP tower, LangClassifier, then the checkpoint's weights."""
    weights, meta = load_file(FIXTURES / "tiny_nxtp.safetensors"), read_metadata(FIXTURES / "tiny_nxtp.safetensors")
    config = json.loads(meta["config"])
    language = config["language"]
    with tempfile.TemporaryDirectory() as llama_dir:
        params = {k: language[k] for k in ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps")}
        Path(llama_dir, "params.json").write_text(json.dumps(params))
        fields = dict(llama_dir=llama_dir, tokenizer_path=tokenizer_path, special_tokens=("<|image|>",),
                      max_seq_len=language["max_seq_len"], shave_language_decoder_at=language["n_layers"],
                      inference_mode=True)
        for key, value in fields.items():
            setattr(cfg, key, value)
        llama, tokenizer, _ = o.functions.load_llama(cfg, device)
    vit = build_vit(o, cfg, config["vision"], language["dim"], weights, device)
    model = o.classifier.LangClassifier(vision_encoder=vit, language_decoder=llama)
    model.load_state_dict(weights)
    # the inference and training settings of src/configs/config_g3m.py; the prompt augmentation off, so that
    # every text uses the first template, as the fixtures do
    cfg.prefix_image_tok_embeds = cfg.decouple_label_tok_embeds = True
    cfg.enable_prompt_augmentation, cfg.label_contains_number, cfg.rm_eos_token_for_objs = False, False, True
    return model.to(device).eval(), tokenizer


@torch.inference_mode()
def recognise(o, cfg, model, tokenizer, pixels, k, device):
    """One call of src/infer.py `main`'s recognition, for a batch: its steps in its order, with the
    official functions; returns what it computes on the way (the script itself prints only image 0)."""
    with autocast(cfg, device):
        z = model.decode_images(model.encode_images(pixels.to(device)))
        images = z[:, 1:]  # the class token dropped
        bs, n = images.shape[:2]
        tokens_caps, tokens_objs, _, _, index_cap, index_obj = o.encoding.construct_text_inputs(
            cfg, [""] * bs, tokenizer, offset=n, is_train=False)
        wte = model.language_decoder.tok_embeddings.weight
        tokens_caps, tokens_objs = tokens_caps.to(device), tokens_objs.to(device)
        _, embeds, input_tokens = o.encoding.construct_embd_inputs(
            images, wte[tokens_caps], wte[tokens_objs], index_cap, index_obj, tokens_caps, tokens_objs, tokenizer)
        end = torch.where(tokens_objs == tokenizer.pad_id)[1][0]  # padding shaved
        input_tokens, x = input_tokens[:, : end + n], embeds[:, : end + n]
        decoder = o.decoding.OneShotDecoder(k=k)
        decoder.reset()
        tokens, sum_logprobs = tokens_objs[:, :end], torch.zeros(bs, device=device)

        def forward(x):
            return model.language_decoder.forward(
                x, start_pos=0, dummy_token_index=index_obj, offset=n, input_tokens=input_tokens,
                prefix_image_tok_embeds=cfg.prefix_image_tok_embeds,
                decouple_label_tok_embeds=cfg.decouple_label_tok_embeds, is_train=False)

        first = forward(x)
        tokens, completed = decoder.update(tokens, first, sum_logprobs)
        prompt_ids, steps = tokens_objs[0, :end].tolist(), 1
        while not completed:  # no key/value cache: every branch re-runs the whole sequence
            newest = tokens[:, -1:].long()
            x = x.repeat_interleave(newest.shape[0] // x.shape[0], dim=0)
            x = torch.cat([x, wte[newest]], dim=1)
            tokens, completed = decoder.update(tokens, forward(x), sum_logprobs)
            steps += 1
        branch_tokens, branch_probs = tokens, decoder.prob_next_tokens
        labels, probs = decoder.finalize(tokens, sum_logprobs)
    return dict(input_embeds=embeds[:, : end + n], first_logits=first, branch_tokens=branch_tokens,
                branch_probs=branch_probs, prompt_ids=prompt_ids, steps=steps,
                ranked=[rank(tokenizer, t, p, device) for t, p in zip(labels, probs)])


def rank(tokenizer, tokens, probs, device):
    """src/infer.py `main`'s ranking of one image: the finalised tokens cut after every delimiter, a label's
    score the product of its probabilities (delimiter included), labels of the same text summed, highest
    first, "," removed from the text. Returns (labels, scores, token ids of each label's first cut)."""
    scores, ids, cut = {}, {}, []
    for token, prob in zip(tokens, probs):
        cut.append((token, prob))
        if token == DELIMITER:
            text = tokenizer.decode([t for t, _ in cut])
            score = torch.tensor([p for _, p in cut], device=device).prod()
            scores[text] = scores.get(text, 0) + score
            ids.setdefault(text, [t for t, _ in cut])
            cut = []
    order = sorted(scores, key=lambda text: scores[text].item(), reverse=True)
    return [text.replace(",", "") for text in order], [scores[t].item() for t in order], [ids[t] for t in order]


def end_to_end(o, regime, device, tokenizer_path) -> tuple:
    """Every case of cases.json `tiny_nxtp`: tensors and, for the metadata, the cases as cases.json has them."""
    cfg = regime_cfg(o, regime)
    model, tokenizer = tiny_model(o, cfg, device, tokenizer_path)
    cases_t = load_file(FIXTURES / "tiny_nxtp_cases.safetensors")
    out, cases = {}, []
    for case in json.loads((FIXTURES / "cases.json").read_text())["tiny_nxtp"]["cases"]:
        names = case.get("images") or [case["image"]]
        keys = [image_key(name) for name in names]
        pixels = torch.cat([cases_t[f"{key}.pixels"] for key in keys])
        r = recognise(o, cfg, model, tokenizer, pixels, case["k"], device)
        prefix = f"tiny.{keys[0]}" if len(keys) == 1 else "tiny.batch"
        out[f"{prefix}.input_embeds"], out[f"{prefix}.first_logits"] = r["input_embeds"], r["first_logits"]
        out[f"{prefix}.k{case['k']}.branch_tokens"] = r["branch_tokens"]
        out[f"{prefix}.k{case['k']}.branch_probs"] = r["branch_probs"]
        ranked = [dict(labels=labels, probs=probs, label_token_ids=ids) for labels, probs, ids in r["ranked"]]
        common = dict(k=case["k"], prompt_token_ids=r["prompt_ids"], decode_steps=r["steps"])
        cases.append(common | ({"images": names, "batched": ranked} if len(keys) > 1 else {"image": names[0]} | ranked[0]))
    return out, cases


@torch.inference_mode()
def training_loss(o, regime, device, tokenizer_path) -> tuple:
    """cases.json `train`: src/train.py's objects loss (the caption loss has weight 0 in the configs) for
    the fixture's label lists, in the fixture's order."""
    cfg = regime_cfg(o, regime)
    model, tokenizer = tiny_model(o, cfg, device, tokenizer_path)
    train = json.loads((FIXTURES / "cases.json").read_text())["train"]
    pixels = load_file(FIXTURES / "train_case.safetensors")["pixels"].to(device)
    shuffle = o.encoding.shuffle
    o.encoding.shuffle = lambda labels: None  # the fixture's order instead of src/encoding.py's shuffle
    try:
        with autocast(cfg, device):
            images = model.decode_images(model.encode_images(pixels))[:, 1:]
            n = images.shape[1]
            tokens_caps, tokens_objs, _, targets, index_cap, index_obj = o.encoding.construct_text_inputs(
                cfg, train["label_lists_in_shuffled_order"], tokenizer, offset=n, is_train=True,
                skip_extract_nouns=True)
            tokens_caps, tokens_objs, targets = tokens_caps.to(device), tokens_objs.to(device), targets.to(device)
            wte = model.language_decoder.tok_embeddings.weight
            _, embeds, input_tokens = o.encoding.construct_embd_inputs(
                images, wte[tokens_caps], wte[tokens_objs], index_cap, index_obj, tokens_caps, tokens_objs, tokenizer)
            logits = model.language_decoder.forward(
                embeds, dummy_token_index=index_obj, offset=n, input_tokens=input_tokens,
                prefix_image_tok_embeds=cfg.prefix_image_tok_embeds,
                decouple_label_tok_embeds=cfg.decouple_label_tok_embeds, is_train=True)
            loss = F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), targets[..., 1:].reshape(-1),
                                   ignore_index=tokenizer.pad_id)
    finally:
        o.encoding.shuffle = shuffle
    return {"train.tokens_objs": tokens_objs, "train.target_objs": targets}, loss.item()


# --- files ---

def read_metadata(path) -> dict:
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def read(path):
    """A fixture's tensors and its JSON `meta`."""
    return load_file(path), json.loads(read_metadata(path)["meta"])


def image_key(name: str) -> str:
    return "image" + name.split("image")[-1].split(".")[0]


def cpu_fixture_set() -> tuple:
    """The committed CPU fixtures in this script's layout: (tensors, {"cases": ..., "train_loss": ...})."""
    out = {}
    vit, llama = load_file(FIXTURES / "vit.safetensors"), load_file(FIXTURES / "llama.safetensors")
    out |= {f"vit.{k}": v for k, v in vit.items() if k.startswith("output.")}
    out |= {f"llama.{k}": v for k, v in llama.items()
            if k.startswith("causal.layer_output.") or k in ("causal.logits", "prefix.logits_last", "train.logits")}
    out |= {f"tiny.{k}": v for k, v in load_file(FIXTURES / "tiny_nxtp_cases.safetensors").items()
            if not k.endswith(".pixels")}
    train = load_file(FIXTURES / "train_case.safetensors")
    out |= {"train.tokens_objs": train["tokens_objs"], "train.target_objs": train["target_objs"]}
    cases = json.loads((FIXTURES / "cases.json").read_text())
    return out, {"cases": cases["tiny_nxtp"]["cases"], "train_loss": cases["train"]["loss"]}


def read_set(path) -> tuple:
    """A file this script wrote: (tensors, metadata with `cases` and `train_loss` decoded)."""
    meta = read_metadata(path)
    return load_file(path), meta | {"cases": json.loads(meta["cases"]), "train_loss": float(meta["train_loss"])}


def machine(device) -> dict:
    """Where the references were computed, for the metadata."""
    info = {"device": str(device), "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.device(device).type == "cuda":
        info["card"], info["driver"] = torch.cuda.get_device_name(device), "unknown"
        if shutil.which("nvidia-smi"):  # torch does not tell the driver's version
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, check=False)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "unknown"
    else:
        info["card"], info["driver"] = "cpu", "none"
    return info


def differences(tensors: dict, cases: list, loss: float) -> list:
    """Lines: each output's largest difference from the CPU fixtures."""
    ref, ref_meta = cpu_fixture_set()
    lines = []
    for key in sorted(ref):
        if key not in tensors:
            continue
        a, b = tensors[key].cpu(), ref[key]
        if a.shape != b.shape:
            lines.append(f"{key}: shape {list(a.shape)} against {list(b.shape)}")
        elif a.is_floating_point():
            lines.append(f"{key}: max abs difference {(a.float() - b.float()).abs().max().item():.3g}")
        else:
            lines.append(f"{key}: {'equal' if torch.equal(a, b) else 'DIFFERENT'}")
    for ours, theirs in zip(cases, ref_meta["cases"]):
        got = ours.get("batched") or [ours]
        expected = theirs.get("batched") or [theirs]
        for g, e in zip(got, expected):
            same = g["labels"] == e["labels"]
            worst = max(abs(x - y) for x, y in zip(g["probs"], e["probs"])) if same else float("nan")
            lines.append(f"case {theirs.get('image') or 'batch'} k={theirs['k']}: labels "
                         f"{'equal' if same else 'DIFFERENT'}, max score difference {worst:.3g}")
    lines.append(f"train loss: {loss:.7f} against {ref_meta['train_loss']:.7f}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export-sources", metavar="DIR", help="copy the official sources into DIR and stop")
    p.add_argument("--official", help="the official repository's src/ folder")
    p.add_argument("--clip", help="OpenAI CLIP's clip/ package folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), default=list(REGIMES))
    p.add_argument("--out", default=str(FIXTURES / "gpu"))
    p.add_argument("--tokenizer", default=os.environ.get("NXTP_LLAMA_TOKENIZER"),
                   help="LLaMA's tokenizer.model (default: $NXTP_LLAMA_TOKENIZER)")
    args = p.parse_args(argv)
    if args.export_sources:
        return export_sources(args.export_sources)
    if not (args.official and args.clip and args.tokenizer):
        p.error("--official, --clip and --tokenizer (or NXTP_LLAMA_TOKENIZER) are needed")
    if "official-float16" in args.regimes and torch.device(args.device).type != "cuda":
        # CUDA's autocast runs LayerNorm in float32, float16 weights included; the CPU's does not, and the
        # official CLIP LayerNorm then meets float16 weights with float32 input
        p.error("the official-float16 regime runs on CUDA only")
    o = import_official(args.official, args.clip)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    os.makedirs(args.out, exist_ok=True)
    for regime in args.regimes:
        tensors = pieces(o, regime, args.device)
        e2e, cases = end_to_end(o, regime, args.device, args.tokenizer)
        train, loss = training_loss(o, regime, args.device, args.tokenizer)
        tensors = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
                   for k, v in (tensors | e2e | train).items()}
        weights, cast = REGIMES[regime]
        meta = machine(args.device) | {
            "regime": regime, "weights_dtype": weights, "autocast": str(cast).replace("torch.", ""),
            "official_commit": f"kaiyuyue/nxtp@{OFFICIAL_COMMIT}", "clip_commit": f"openai/CLIP@{CLIP_COMMIT}",
            "cases": json.dumps(cases), "train_loss": repr(loss)}
        path = Path(args.out) / file_name(regime)
        save_file(tensors, path, metadata=meta)
        print(f"== {regime}: {path} ({meta['card']}, torch {meta['torch']}, CUDA {meta['cuda']})")
        print("\n".join("   " + line for line in differences(tensors, cases, loss)))


if __name__ == "__main__":
    main()
