"""Converters from the official formats, checked against Hugging Face's implementations and the fixtures.

- Hugging Face CLIP / LLaMA: small random models saved with save_pretrained, converted, then run by
  the port and by transformers on the same inputs (the LLaMA test proves the q/k un-permutation).
- Meta LLaMA: the same weights in consolidated.00.pth + params.json give the same logits.
- Official NXTP checkpoint: tiny_nxtp.safetensors split into the official files and converted back
  is the fixture, tensor for tensor, and passes the end-to-end cases.
- OpenAI's TorchScript archive: the restricted reader gives what torch.jit.load gives, tensor for tensor.
"""

import json
import math
import pickle
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import FIXTURES, REPO, fixture_tensors
from make_synthetic_official import save_clip, save_torchscript, split
from safetensors import safe_open
from safetensors.torch import load_file

import nxtp_minimal
from nxtp_minimal import inference, masks, sampling
from nxtp_minimal.tools.cli import main
from nxtp_minimal.weights import convert_llama
from nxtp_minimal.weights.convert_clip import read_torchscript

TINY = FIXTURES / "tiny_nxtp.safetensors"
CASES = json.loads((FIXTURES / "cases.json").read_text())["tiny_nxtp"]["cases"]
DELIMITER = 29892
TINY_FLAGS = ["--vision-heads", "2", "--llama-heads", "4", "--max-seq-len", "64"]
VOCAB, DIM, HEADS, HIDDEN = 128, 64, 4, 192  # HIDDEN: Meta's sizing of DIM with multiple_of 32


def run_cli(argv, capsys):
    """Run the command line in-process; return (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- Hugging Face CLIP and LLaMA, and the same LLaMA in Meta's format ---


def perturb(model, seed):
    """Random values everywhere (HF zeroes biases and sets norms to one), q/k large enough that RoPE matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                scale = 2.0 if any(s in name for s in ("q_proj", "k_proj")) else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def meta_from_hf(sd: dict, n_heads: int) -> dict:
    """Meta's names and q/k row order, built by index (independent of convert_llama.unpermute)."""
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    meta = {}
    for key, t in sd.items():
        if key in names:
            meta[names[key]] = t.clone()
            continue
        _, _, i, rest = key.split(".", 3)
        module = rest.rsplit(".", 1)[0]
        if module in ("self_attn.q_proj", "self_attn.k_proj"):
            hd = t.shape[0] // n_heads  # Meta row h*hd + 2j is HF row h*hd + j; 2j + 1 is h*hd + hd/2 + j
            t = t[[h * hd + r // 2 + (r % 2) * (hd // 2) for h in range(n_heads) for r in range(hd)]]
        meta[f"layers.{i}.{parts[module]}.weight"] = t.clone()
    return meta


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A 2-block HF CLIP (QuickGELU, as OpenAI's), a 4-block HF LLaMA, and the LLaMA in Meta's format."""
    pytest.importorskip("transformers", reason="transformers is the reference: pip install -r requirements-dev.txt")
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )).eval()
    perturb(clip, 1)
    clip.save_pretrained(root / "clip")
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=4, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False,
    )).eval()
    perturb(llama, 2)
    llama.save_pretrained(root / "llama")
    (root / "meta").mkdir()
    torch.save(meta_from_hf(llama.state_dict(), HEADS), root / "meta" / "consolidated.00.pth")
    params = {"dim": DIM, "multiple_of": 32, "n_heads": HEADS, "n_layers": 4, "norm_eps": 1e-5, "vocab_size": -1}
    (root / "meta" / "params.json").write_text(json.dumps(params))
    return {"root": root, "clip": clip, "llama": llama}


@pytest.fixture(scope="module")
def from_hf(hf, tmp_path_factory):
    """`convert llama --layers 2` of the HF LLaMA with the HF CLIP, in float32; the loaded model."""
    out = tmp_path_factory.mktemp("converted") / "hf.safetensors"
    main(["convert", "llama", "--llama", str(hf["root"] / "llama"), "--clip", str(hf["root"] / "clip"),
          "--layers", "2", "--out", str(out), "--dtype", "float32", "--max-seq-len", "64"])
    return out, nxtp_minimal.load(out)


def reference_two_blocks(llama):
    """The same HF weights run with only their first 2 blocks."""
    from transformers import LlamaForCausalLM

    config = llama.config.__class__(**{**llama.config.to_dict(), "num_hidden_layers": 2})
    ref = LlamaForCausalLM(config).eval()
    kept = {k: v for k, v in llama.state_dict().items() if not k.startswith(("model.layers.2.", "model.layers.3."))}
    ref.load_state_dict(kept)
    return ref


def test_hf_clip_hidden_states(hf, from_hf):
    _, model = from_hf
    ref = hf["clip"]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = getattr(ref, "vision_model", ref).post_layernorm(ref(pixel_values=pixels).last_hidden_state)
        got = model.vision_encoder.hidden(pixels)  # [2, 17, 64], class token first, after ln_post
    assert model.config.vision == nxtp_minimal.VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_hf_llama_logits_with_two_blocks(hf, from_hf):
    _, model = from_hf
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference_two_blocks(hf["llama"])(input_ids=ids).logits  # [2, 12, VOCAB]
        got = model.language_decoder(ids, masks.causal_mask(12))  # [2, 12, VOCAB + 2]
    lang = model.config.language
    assert (lang.n_layers, lang.dim, lang.n_heads, lang.hidden_dim, lang.vocab_size) == (2, DIM, HEADS, HIDDEN, VOCAB + 2)
    torch.testing.assert_close(got[..., :VOCAB], expected, rtol=1e-4, atol=1e-4)
    # the test can see a wrong q/k layout: HF's rows as they are give other logits
    decoder = nxtp_minimal.load(from_hf[0]).language_decoder
    with torch.no_grad():
        for i in range(2):
            for w in ("q", "k"):
                getattr(decoder.layers[i].attention, f"w{w}").weight.copy_(
                    hf["llama"].state_dict()[f"model.layers.{i}.self_attn.{w}_proj.weight"])
        wrong = decoder(ids, masks.causal_mask(12))[..., :VOCAB]
    assert (wrong - expected).abs().max() > 0.05


def test_meta_llama_gives_the_same_file(hf, from_hf, tmp_path):
    hf_file, _ = from_hf
    out = tmp_path / "meta.safetensors"
    main(["convert", "llama", "--llama", str(hf["root"] / "meta"), "--clip", str(hf["root"] / "clip"),
          "--layers", "2", "--out", str(out), "--dtype", "float32", "--max-seq-len", "64"])
    meta, ref = load_file(out), load_file(hf_file)
    assert meta.keys() == ref.keys()
    for name in ref:  # same seed, so the new rows and the projection agree too
        assert torch.equal(meta[name], ref[name]), name
    a, b = nxtp_minimal.weights.read_config(out), nxtp_minimal.weights.read_config(hf_file)
    # params.json says multiple_of 32; for HF's intermediate_size 192 the converter finds 64: same width
    assert (a.language.multiple_of, b.language.multiple_of) == (32, 64) and a.language.hidden_dim == b.language.hidden_dim
    b.language.multiple_of = 32
    assert a == b


def test_new_rows_and_projection_follow_the_official_init(hf, from_hf, tmp_path):
    path, model = from_hf
    t = load_file(path)
    sd = hf["llama"].state_dict()
    emb, out = t["language_decoder.tok_embeddings.weight"], t["language_decoder.output.weight"]
    assert torch.equal(emb[:VOCAB], sd["model.embed_tokens.weight"]) and torch.equal(out[:VOCAB], sd["lm_head.weight"])
    assert 0.6 < emb[VOCAB:].std() < 1.4  # N(0, 1)
    image, empty = out[VOCAB], out[VOCAB + 1]
    assert image.abs().max() <= DIM**-0.5 and image.abs().min() > 0  # Kaiming-uniform(a=sqrt(5)): U(+-1/sqrt(D))
    assert torch.equal(empty, torch.zeros(DIM))  # <|empty|>
    proj = t["vision_encoder.proj.weight"]
    assert proj.shape == (DIM, 64) and 0.9 < proj.std() * 64**0.5 < 1.1  # width**-0.5 * N(0, 1)
    other = tmp_path / "seed1.safetensors"
    main(["convert", "llama", "--llama", str(hf["root"] / "llama"), "--clip", str(hf["root"] / "clip"),
          "--layers", "1", "--out", str(other), "--seed", "1"])
    o = load_file(other)
    assert o["vision_encoder.proj.weight"].dtype == torch.float16  # the default dtype
    assert not torch.equal(o["vision_encoder.proj.weight"].float(), proj.half().float())
    assert nxtp_minimal.weights.read_config(other).language.n_layers == 1


# --- the official NXTP checkpoint, from the tiny fixture ---


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """tiny_nxtp split into an official checkpoint and OpenAI CLIP files (TorchScript and safetensors)."""
    root = tmp_path_factory.mktemp("official")
    checkpoint, clip = split(load_file(TINY), vision_layers=2, trained_blocks=1)
    torch.save(checkpoint, root / "ckpt.pth")
    save_clip(clip, root / "ViT-tiny.pt")
    save_clip(clip, root / "ViT-tiny.safetensors")
    return root


@pytest.fixture(scope="module")
def converted(official):
    out = official / "nxtp_from_pt.safetensors"
    main(["convert", "nxtp", "--checkpoint", str(official / "ckpt.pth"), "--clip", str(official / "ViT-tiny.pt"),
          "--out", str(out), *TINY_FLAGS])
    return out


JIT_LOAD_IS_THE_REFERENCE = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@JIT_LOAD_IS_THE_REFERENCE
def test_official_files_look_official(official):
    ckpt = torch.load(official / "ckpt.pth", weights_only=True)
    assert {"model", "optimizer"} <= ckpt.keys()
    assert all(k.startswith("module.") for k in ckpt["model"])
    assert "module.vision_encoder.transformer.resblocks.0.ln_1.weight" not in ckpt["model"]  # frozen: CLIP's
    clip = torch.jit.load(official / "ViT-tiny.pt").state_dict()
    assert {"visual.proj", "token_embedding.weight", "logit_scale", "visual.transformer.resblocks.1.ln_1.weight"} <= clip.keys()
    trained = ckpt["model"]["module.vision_encoder.transformer.resblocks.1.ln_1.weight"]
    assert not torch.equal(clip["visual.transformer.resblocks.1.ln_1.weight"], trained)  # the checkpoint must win


@pytest.mark.parametrize("clip_file", ["ViT-tiny.pt", "ViT-tiny.safetensors"])
def test_checkpoint_converts_back_to_the_fixture(official, converted, clip_file, tmp_path):
    out = converted if clip_file.endswith(".pt") else tmp_path / "nxtp.safetensors"
    if out != converted:
        main(["convert", "nxtp", "--checkpoint", str(official / "ckpt.pth"), "--clip", str(official / clip_file),
              "--out", str(out), *TINY_FLAGS])
    got, expected = load_file(out), load_file(TINY)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name
    meta, ref = safe_open(out, "pt").metadata(), safe_open(TINY, "pt").metadata()
    assert meta["format"] == "nxtp" and json.loads(meta["config"]) == json.loads(ref["config"])


def test_command_line_entry_point(official, tmp_path):
    out = tmp_path / "cli.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "nxtp_minimal", "convert", "nxtp", "--checkpoint", str(official / "ckpt.pth"),
         "--clip", str(official / "ViT-tiny.safetensors"), "--out", str(out), *TINY_FLAGS],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "writing" in result.stderr  # a summary and the progress bar
    assert nxtp_minimal.weights.read_config(out) == nxtp_minimal.weights.read_config(TINY)


@pytest.fixture(scope="module")
def converted_model(converted):
    return nxtp_minimal.load(converted)


def case_pixels(names):
    tensors = fixture_tensors("tiny_nxtp_cases.safetensors")
    return torch.cat([tensors["image" + n.split("image")[-1].split(".")[0] + ".pixels"] for n in names])


@pytest.mark.parametrize("case", CASES, ids=[f"{c.get('image', 'batch')}-k{c['k']}" for c in CASES])
def test_converted_model_passes_end_to_end_cases(converted_model, case):
    names = [case["image"]] if "image" in case else case["images"]
    expected = [case] if "image" in case else case["batched"]
    prompt_ids = CASES[0]["prompt_token_ids"]  # the same for every case
    tokens, probs, _ = inference.sample(converted_model, case_pixels(names), case["k"], prompt_ids, DELIMITER)
    if "decode_steps" in case:
        assert tokens.shape[-1] == case["decode_steps"]
    for t, p, exp in zip(tokens, probs, expected):
        branches = sorted(sampling.branch_labels(t, p, DELIMITER), key=lambda b: -b[1])
        assert [ids for ids, _ in branches] == exp["label_token_ids"]
        assert [s for _, s in branches] == pytest.approx(exp["probs"], abs=1e-5)


def test_converted_model_label_texts(converted, llama_tokenizer):
    model = nxtp_minimal.load(converted, tokenizer=llama_tokenizer)
    for case in (c for c in CASES if "image" in c):
        labels = model.predict(FIXTURES / case["image"], k=case["k"])[0]
        assert [lab for lab, _ in labels] == case["labels"]
        assert [p for _, p in labels] == pytest.approx(case["probs"], abs=1e-5)


# --- bad input: one clear line on stderr, exit status 1 ---


class NotATensor:
    pass


def test_pickle_refused_by_weights_only(official, tmp_path, capsys):
    ckpt = torch.load(official / "ckpt.pth", weights_only=True)
    torch.save({**ckpt, "args": NotATensor()}, tmp_path / "unsafe.pth")
    code, _, err = run_cli(["convert", "nxtp", "--checkpoint", str(tmp_path / "unsafe.pth"), "--clip",
                            str(official / "ViT-tiny.pt"), "--out", str(tmp_path / "o.safetensors"), *TINY_FLAGS], capsys)
    line = one_error_line(err)
    assert code == 1 and "weights_only" in line and "NotATensor" in line and "only if you trust" in line.lower()
    assert not (tmp_path / "o.safetensors").exists()


def test_checkpoint_without_model_entry(official, tmp_path, capsys):
    ckpt = torch.load(official / "ckpt.pth", weights_only=True)
    torch.save({"state_dict": ckpt["model"], "epoch": 3}, tmp_path / "nomodel.pth")
    code, _, err = run_cli(["convert", "nxtp", "--checkpoint", str(tmp_path / "nomodel.pth"), "--clip",
                            str(official / "ViT-tiny.pt"), "--out", str(tmp_path / "o.safetensors"), *TINY_FLAGS], capsys)
    line = one_error_line(err)
    assert code == 1 and 'no "model" entry' in line and "state_dict" in line


def test_checkpoint_missing_a_tensor_names_it(official, tmp_path, capsys):
    ckpt = torch.load(official / "ckpt.pth", weights_only=True)
    del ckpt["model"]["module.language_decoder.layers.1.ffn_norm.weight"]
    torch.save(ckpt, tmp_path / "partial.pth")
    code, _, err = run_cli(["convert", "nxtp", "--checkpoint", str(tmp_path / "partial.pth"), "--clip",
                            str(official / "ViT-tiny.pt"), "--out", str(tmp_path / "o.safetensors"), *TINY_FLAGS], capsys)
    assert code == 1 and "language_decoder.layers.1.ffn_norm.weight" in one_error_line(err)


@pytest.mark.parametrize("name", ["vision_encoder.ln_post.bias", "vision_encoder.transformer.resblocks.1.ln_2.weight"])
def test_checkpoint_missing_a_trained_vision_tensor_names_it(official, tmp_path, capsys, name):
    # CLIP has a copy of these, from before NXTP trained them: it must not stand in silently
    ckpt = torch.load(official / "ckpt.pth", weights_only=True)
    del ckpt["model"]["module." + name]
    torch.save(ckpt, tmp_path / "partial.pth")
    code, _, err = run_cli(["convert", "nxtp", "--checkpoint", str(tmp_path / "partial.pth"), "--clip",
                            str(official / "ViT-tiny.pt"), "--out", str(tmp_path / "o.safetensors"), *TINY_FLAGS], capsys)
    assert code == 1 and name in one_error_line(err) and "which NXTP trains" in err


def test_clip_that_disagrees_with_the_checkpoint(official, tmp_path, capsys):
    wide = {"visual." + k[len("vision_encoder."):]: v for k, v in fixture_tensors("vit.safetensors").items()
            if k != "vision_encoder.proj.weight"}  # a CLIP of width 64; the checkpoint was trained on width 32
    save_clip(wide, tmp_path / "wide.safetensors")
    code, _, err = run_cli(["convert", "nxtp", "--checkpoint", str(official / "ckpt.pth"), "--clip",
                            str(tmp_path / "wide.safetensors"), "--out", str(tmp_path / "o.safetensors"), *TINY_FLAGS], capsys)
    line = one_error_line(err)
    assert code == 1 and "vision_encoder." in line and "another CLIP" in line


def test_layers_beyond_the_source(hf, tmp_path, capsys):
    code, _, err = run_cli(["convert", "llama", "--llama", str(hf["root"] / "meta"), "--clip", str(hf["root"] / "clip"),
                            "--layers", "5", "--out", str(tmp_path / "o.safetensors")], capsys)
    line = one_error_line(err)
    assert code == 1 and "--layers 5" in line and "4 blocks" in line


def test_clip_that_is_not_a_torchscript_archive(official, tmp_path, capsys):
    (tmp_path / "ViT-L-14.pt").write_bytes(b"not an archive")
    code, _, err = run_cli(["convert", "nxtp", "--checkpoint", str(official / "ckpt.pth"), "--clip",
                            str(tmp_path / "ViT-L-14.pt"), "--out", str(tmp_path / "o.safetensors"), *TINY_FLAGS], capsys)
    assert code == 1 and "not a TorchScript archive" in one_error_line(err)


def test_hf_clip_with_exact_gelu_is_refused(hf, tmp_path, capsys):
    folder = tmp_path / "gelu_clip"
    shutil.copytree(hf["root"] / "clip", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    code, _, err = run_cli(["convert", "llama", "--llama", str(hf["root"] / "llama"), "--clip", str(folder),
                            "--layers", "2", "--out", str(tmp_path / "o.safetensors")], capsys)
    assert code == 1 and "quick_gelu" in one_error_line(err)


@pytest.mark.parametrize("flags", [[], ["--vision-heads", "3", "--llama-heads", "4"]], ids=["unknown", "wrong"])
def test_heads_that_cannot_be_inferred_or_do_not_fit(official, tmp_path, capsys, flags):
    code, _, err = run_cli(["convert", "nxtp", "--checkpoint", str(official / "ckpt.pth"), "--clip",
                            str(official / "ViT-tiny.pt"), "--out", str(tmp_path / "o.safetensors"), *flags], capsys)
    assert code == 1 and "--vision-heads" in one_error_line(err)
    assert not (tmp_path / "o.safetensors").exists()


def test_unpermute_inverts_hugging_face_permutation():
    """HF's converter: per head, rows (0, 2, 4, ...) then (1, 3, 5, ...). unpermute puts them back."""
    meta = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)  # 2 heads of head_dim 8
    hf_rows = [h * 8 + r for h in range(2) for r in (0, 2, 4, 6, 1, 3, 5, 7)]
    assert torch.equal(convert_llama.unpermute(meta[hf_rows], n_heads=2), meta)


# --- OpenAI's TorchScript archive, read without running it ---


def read_all(path) -> dict:
    return {k: t.read() for k, t in read_torchscript(path).items()}


def assert_same_tensors(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


@JIT_LOAD_IS_THE_REFERENCE
def test_archive_reader_gives_what_torch_jit_load_gives(official, tmp_path):
    assert_same_tensors(read_all(official / "ViT-tiny.pt"), torch.jit.load(official / "ViT-tiny.pt").state_dict())
    # views: a transposed tensor, two rows of one storage; bfloat16 and bool records
    base = torch.arange(12.0).view(3, 4)
    save_torchscript({"visual.t": torch.randn(3, 4).t(), "visual.row1": base[1], "visual.row2": base[2],
                      "visual.bf16": torch.randn(5).bfloat16(), "mask": torch.tensor([True, False])},
                     tmp_path / "views.pt")
    got, expected = read_all(tmp_path / "views.pt"), torch.jit.load(tmp_path / "views.pt").state_dict()
    assert_same_tensors(got, expected)
    assert [(got[k].stride(), got[k].storage_offset()) for k in ("visual.t", "visual.row2")] == [((1, 4), 0), ((1,), 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
@JIT_LOAD_IS_THE_REFERENCE
def test_archive_written_big_endian(tmp_path, dtype):
    save_torchscript({"visual.a": (100 * torch.randn(3, 5)).to(dtype), "visual.b": torch.arange(7).to(dtype)},
                     tmp_path / "little.pt")
    size = torch.empty((), dtype=dtype).element_size()
    with zipfile.ZipFile(tmp_path / "little.pt") as src, zipfile.ZipFile(tmp_path / "big.pt", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if "/data/" in name:  # every record holds `dtype` values: reverse the bytes of each
                data = bytes(b for i in range(0, len(data), size) for b in reversed(data[i: i + size]))
            dst.writestr(name, b"big" if name.endswith("/byteorder") else data)
    assert_same_tensors(read_all(tmp_path / "big.pt"), torch.jit.load(tmp_path / "little.pt").state_dict())


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_archive_that_would_run_code_is_refused(official, tmp_path, capsys):
    with zipfile.ZipFile(official / "ViT-tiny.pt") as src, zipfile.ZipFile(tmp_path / "evil.pt", "w") as dst:
        for name in src.namelist():
            data = pickle.dumps({"visual": RunsCode()}, protocol=2) if name.endswith("/data.pkl") else src.read(name)
            dst.writestr(name, data)
    code, out, err = run_cli(["convert", "nxtp", "--checkpoint", str(official / "ckpt.pth"), "--clip",
                              str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o.safetensors"), *TINY_FLAGS], capsys)
    line = one_error_line(err)
    assert code == 1 and "refers to __builtin__.print, which rebuilding CLIP's tensors does not need" in line
    assert "this must never run" not in out + err


def test_torch_save_file_is_not_an_archive(tmp_path):
    torch.save({"visual.conv1.weight": torch.zeros(2)}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match=r"state.pt is not a TorchScript archive \(its data.pkl holds a dict"):
        read_torchscript(tmp_path / "state.pt")
