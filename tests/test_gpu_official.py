"""The port on CUDA against the official code on CUDA (tests/fixtures/gpu/, made by make_gpu_official.py).

One file per regime: float32 is held to the CPU tolerances; under autocast, half-precision rounding may
reorder labels whose scores are close, so a label must keep its rank only where the official scores of its
neighbours differ from its own by more than 0.02, and every score must be within 2e-2. The comparator
(`compare`) is checked on the CPU: the port in float32 passes it against the CPU fixtures, and it reports
planted differences.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, REPO, llama_tokenizer_path
from make_gpu_official import DELIMITER, REGIMES, cpu_fixture_set, image_key, read, read_set
from safetensors.torch import load_file
from test_end_to_end import finished_part

import nxtp_minimal
from nxtp_minimal import inference, masks, prompt, sampling
from nxtp_minimal.config import LanguageConfig, VisionConfig
from nxtp_minimal.llama import Decoder
from nxtp_minimal.vit import VisionEncoder

GPU_FILES = sorted((FIXTURES / "gpu").glob("official.*.safetensors"))
SOURCES = REPO / ".gpu_check"  # make_gpu_official.py --export-sources .gpu_check
N_PROMPT = 8  # the prompt ids every branch row starts with
# activations and logits, rtol = atol: float32 as the CPU tests; bfloat16 as the bfloat16 tests of
# test_vit.py and test_llama.py; float16 keeps 3 more bits of mantissa than bfloat16
TOLERANCE = {"float32": 1e-4, "autocast-bfloat16": 1e-1, "official-float16": 2e-2}
SCORE = {"float32": 1e-5, "autocast-bfloat16": 2e-2, "official-float16": 2e-2}
GAP = 0.02  # under autocast, labels whose official scores are closer than this may trade places


# --- the port in the layout of make_gpu_official.py ---

@torch.inference_mode()
def port_set(device, regime, decode, tokenizer) -> tuple:
    """What make_gpu_official.py computes with the official code, computed by the port."""
    weights, cast = REGIMES[regime]
    dtype = getattr(torch, weights)

    def autocast():
        return torch.autocast(torch.device(device).type, cast, enabled=cast is not None)

    out = {}
    t, meta = read(FIXTURES / "vit.safetensors")
    encoder = VisionEncoder(VisionConfig(**meta["vision"]), meta["embed_dim"])
    encoder.load_state_dict({k[len("vision_encoder."):]: v for k, v in t.items() if k.startswith("vision_encoder.")})
    encoder = encoder.to(device, dtype)
    with autocast():
        out["vit.output.hidden"] = encoder.hidden(t["input.pixels"].to(device))
        out["vit.output.tokens"] = encoder(t["input.pixels"].to(device))

    t, meta = read(FIXTURES / "llama.safetensors")
    decoder = Decoder(LanguageConfig(**meta["language"], vocab_size=meta["vocab_size"]))
    decoder.load_state_dict({k[len("language_decoder."):]: v for k, v in t.items() if k.startswith("language_decoder.")})
    decoder = decoder.to(device, dtype).eval()
    n_image, answer = meta["n_image_tokens"], meta["answer_id"]
    blocks = []
    hooks = [layer.register_forward_hook(lambda m, i, h: blocks.append(h[0])) for layer in decoder.layers]
    with autocast():
        tokens = t["causal.tokens"].to(device)
        out["llama.causal.logits"] = decoder(tokens, masks.causal_mask(tokens.shape[1], device))
        for hook in hooks:
            hook.remove()
        out |= {f"llama.causal.layer_output.{i}": h for i, h in enumerate(blocks)}
        x = t["prefix.embeds"].to(device, dtype)
        out["llama.prefix.logits_last"] = decoder(x, masks.prefix_mask(x.shape[1], n_image, device), last_only=True)
        mask = masks.label_mask(t["train.input_tokens"], n_image, answer, DELIMITER).to(device)
        out["llama.train.logits"] = decoder(t["train.embeds"].to(device, dtype), mask)

    model = nxtp_minimal.load(FIXTURES / "tiny_nxtp.safetensors", tokenizer=tokenizer, device=device, dtype=dtype)
    pixels_of = load_file(FIXTURES / "tiny_nxtp_cases.safetensors")
    ids, cases = model.prompt_ids(), []
    for case in json.loads((FIXTURES / "cases.json").read_text())["tiny_nxtp"]["cases"]:
        names = case.get("images") or [case["image"]]
        pixels = torch.cat([pixels_of[f"{image_key(name)}.pixels"] for name in names]).to(device)
        tokens, probs, first = inference.sample(model, pixels, case["k"], ids, DELIMITER, decode=decode, autocast=cast)
        prefix = f"tiny.{image_key(names[0])}" if len(names) == 1 else "tiny.batch"
        with autocast():
            out[f"{prefix}.input_embeds"] = model.prefix(pixels, ids)
        out[f"{prefix}.first_logits"] = first
        out[f"{prefix}.k{case['k']}.branch_tokens"] = torch.cat(
            [torch.tensor([ids] * tokens[:, :, 0].numel(), device=device), tokens.flatten(0, 1)], dim=1)
        out[f"{prefix}.k{case['k']}.branch_probs"] = probs.flatten(0, 1)
        ranked = [ranked_case(model, t, p) for t, p in zip(tokens, probs)]
        common = dict(k=case["k"], prompt_token_ids=ids, decode_steps=tokens.shape[-1])
        cases.append(common | ({"images": names, "batched": ranked} if len(names) > 1 else {"image": names[0]} | ranked[0]))

    train = json.loads((FIXTURES / "cases.json").read_text())["train"]
    with autocast():
        loss = model.loss(load_file(FIXTURES / "train_case.safetensors")["pixels"].to(device),
                          train["label_lists_in_shuffled_order"])
    tokens, targets = prompt.training_batch(model.tokenizer, model.config.prompt, train["label_lists_in_shuffled_order"],
                                            model.config.vision.n_patches, model.config.language.max_seq_len)
    out |= {"train.tokens_objs": tokens, "train.target_objs": targets}
    return out, {"cases": cases, "train_loss": loss.item()}


def ranked_case(model, tokens, probs) -> dict:
    """One image's labels, scores and, per label, the ids of the first branch that wrote it (as
    make_gpu_official.py `rank` keeps them)."""
    tok = model.tokenizer
    ids = {}
    for branch, _ in sampling.branch_labels(tokens, probs, DELIMITER):
        ids.setdefault(sampling.label_text(branch, tok.decode, tok.decode([DELIMITER])), branch)
    ranked = inference.rank(model, tokens, probs)
    return dict(labels=[label for label, _ in ranked], probs=[p for _, p in ranked],
                label_token_ids=[ids[label] for label, _ in ranked])


# --- the comparator ---

def compare(reference, ours, regime) -> list:
    """Every way the port's set (ours) departs from the official one, in words; empty when it matches."""
    (ref, ref_meta), (got, got_meta) = reference, ours
    tol, problems = TOLERANCE[regime], []
    for key in sorted(ref):
        if key not in got:
            problems.append(f"{key}: the port gave nothing")
            continue
        a, b = got[key].cpu(), ref[key]
        if key.endswith(".branch_tokens"):
            problems += compare_branches(key, a, b, got[key.replace("tokens", "probs")].cpu(),
                                         ref[key.replace("tokens", "probs")], regime)
        elif key.endswith(".branch_probs"):
            continue  # with their tokens
        elif a.shape != b.shape:
            problems.append(f"{key}: shape {list(a.shape)}, official {list(b.shape)}")
        elif not b.is_floating_point():
            if not torch.equal(a, b):
                problems.append(f"{key}: differs first at {[i.item() for i in (a != b).nonzero()[0]]}")
        else:
            off = ~torch.isclose(a.float(), b.float(), rtol=tol, atol=tol)
            if off.any():
                where = [i.item() for i in off.nonzero()[0]]
                problems.append(f"{key}: {int(off.sum())} of {off.numel()} values beyond rtol=atol={tol:g}, first at "
                                f"{where} ({a.float()[tuple(where)].item():.6g} against {b[tuple(where)].item():.6g}); "
                                f"largest difference {(a.float() - b.float()).abs().max().item():.3g}")
    for case, expected in zip(got_meta["cases"], ref_meta["cases"]):
        name = f"{expected.get('image') or 'batch'} k={expected['k']}"
        # under autocast a branch may run a step longer or shorter; cases.json's batched case holds neither
        for field in ("prompt_token_ids", "decode_steps")[: 2 if regime == "float32" else 1]:
            if field in case and field in expected and case[field] != expected[field]:
                problems.append(f"{name}: {field} {case[field]}, official {expected[field]}")
        for i, (g, e) in enumerate(zip(case.get("batched") or [case], expected.get("batched") or [expected])):
            problems += [f"{name} image {i}: {p}" for p in compare_labels(g, e, regime)]
    loss, official = got_meta["train_loss"], ref_meta["train_loss"]
    if abs(loss - official) > (1e-5 * abs(official) if regime == "float32" else SCORE[regime]):
        problems.append(f"training loss {loss:.7f}, official {official:.7f}")
    return problems


def compare_branches(key, tokens, official, probs, official_probs, regime) -> list:
    """float32: every branch's finished part and its probabilities. Under autocast a near tie may send a
    branch another way; the labels and scores it leads to are compared instead."""
    if regime != "float32":
        return []
    if not torch.equal(tokens[:, :N_PROMPT], official[:, :N_PROMPT]):
        return [f"{key}: the prompt differs"]
    problems = []
    for i, (row, theirs) in enumerate(zip(tokens[:, N_PROMPT:].tolist(), official[:, N_PROMPT:].tolist())):
        mine, done = finished_part(row), finished_part(theirs)
        if mine != done:
            j = next((j for j, (a, b) in enumerate(zip(mine, done)) if a != b), min(len(mine), len(done)))
            problems.append(f"{key}: branch {i} differs at sampled token {j}: {mine} against the official {done}")
        elif (probs[i, : len(done)] - official_probs[i, : len(done)]).abs().max() > SCORE[regime]:
            problems.append(f"{key}: branch {i} probabilities {probs[i, : len(done)].tolist()} against the "
                            f"official {official_probs[i, : len(done)].tolist()}")
    return problems


def compare_labels(got, expected, regime) -> list:
    """Ranked labels and scores. float32: the same list, scores within 1e-5, the same ids. Under autocast:
    a label whose official neighbours' scores differ from its own by more than 0.02 keeps its rank, every
    label kept scores within 2e-2, and one that left the top k was within 0.02 of its last score."""
    labels, scores, tol = expected["labels"], expected["probs"], SCORE[regime]
    mine = dict(zip(got["labels"], got["probs"]))
    if regime == "float32":
        if got["labels"] != labels:
            return [f"labels {got['labels']}, official {labels}"]
        worst = max(abs(a - b) for a, b in zip(got["probs"], scores))
        problems = [f"scores {got['probs']}, official {scores}"] if worst > tol else []
        return problems + ([] if got["label_token_ids"] == expected["label_token_ids"] else
                           [f"label ids {got['label_token_ids']}, official {expected['label_token_ids']}"])
    problems = []
    for i, (label, score) in enumerate(zip(labels, scores)):
        neighbours = scores[max(i - 1, 0): i] + scores[i + 1: i + 2]
        if all(abs(score - s) > GAP for s in neighbours) and (i >= len(got["labels"]) or got["labels"][i] != label):
            problems.append(f"rank {i}: {got['labels'][i] if i < len(got['labels']) else None!r}, official {label!r} "
                            f"(its neighbours' scores are more than {GAP} away)")
        if label in mine and abs(mine[label] - score) > tol:
            problems.append(f"{label!r} scores {mine[label]:.5f}, official {score:.5f}")
        if label not in mine and score > min(got["probs"]) + GAP:
            problems.append(f"{label!r} (official {score:.5f}) left the top {len(labels)}")
    return problems


# --- the tests ---

@pytest.mark.parametrize("decode", inference.DECODES)
def test_port_in_float32_passes_the_comparator_against_the_cpu_fixtures(llama_tokenizer, decode):
    """The comparator the GPU test uses, on the CPU: the port against the official CPU outputs."""
    problems = compare(cpu_fixture_set(), port_set("cpu", "float32", decode, llama_tokenizer), "float32")
    assert not problems, "\n".join(problems)


def test_comparator_reports_planted_differences():
    reference = cpu_fixture_set()
    tensors, meta = {k: v.clone() for k, v in reference[0].items()}, json.loads(json.dumps(reference[1]))
    assert compare(reference, (tensors, meta), "float32") == []
    tensors["llama.train.logits"][1, 3, 5] += 1e-3
    tensors["tiny.image1.k5.branch_tokens"][2, N_PROMPT] = 4
    case = meta["cases"][2]  # image1, k=5: apple .42, tree .29, water .21, teddy bear .022, traffic light .012

    def swap(i, j):
        for field in ("labels", "probs", "label_token_ids"):
            case[field][i], case[field][j] = case[field][j], case[field][i]

    swap(3, 4)
    problems = compare(reference, (tensors, meta), "float32")
    assert [p.split(":")[0] for p in problems] == [
        "llama.train.logits", "tiny.image1.k5.branch_tokens", "tiny_nxtp_image1.png k=5 image 0"]
    assert "first at [1, 3, 5]" in problems[0] and "branch 2 differs at sampled token 0" in problems[1]
    # under autocast the last two (0.022 and 0.012) may trade places; the first two may not
    assert compare(reference, (tensors, meta), "autocast-bfloat16") == []
    swap(0, 1)
    assert [p.split(":")[1].strip() for p in compare(reference, (tensors, meta), "autocast-bfloat16")] == [
        "rank 0", "rank 1"]


@pytest.mark.skipif(not (SOURCES / "nxtp" / "src").is_dir(), reason="the official sources are not exported: "
                    "python tests/make_gpu_official.py --export-sources .gpu_check")
def test_script_reproduces_the_cpu_fixtures(tmp_path):
    """make_gpu_official.py drives the official code as the committed fixtures were made: on the CPU in
    float32 it gives them back."""
    tokenizer = llama_tokenizer_path()
    if tokenizer is None:
        pytest.skip("LLaMA tokenizer not found: set NXTP_LLAMA_TOKENIZER (see weights/README.md)")
    subprocess.run([sys.executable, str(REPO / "tests" / "make_gpu_official.py"), "--official",
                    str(SOURCES / "nxtp" / "src"), "--clip", str(SOURCES / "clip"), "--device", "cpu",
                    "--regimes", "float32", "--out", str(tmp_path), "--tokenizer", tokenizer],
                   check=True, capture_output=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    problems = compare(cpu_fixture_set(), read_set(tmp_path / "official.float32.safetensors"), "float32")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("decode", inference.DECODES)
@pytest.mark.parametrize("path", GPU_FILES or [None], ids=lambda p: p.name.split(".")[1] if p else "none")
def test_port_matches_official_on_gpu(request, device, path, decode):
    if not device.startswith("cuda"):
        pytest.skip("compares the port on CUDA with the official code on CUDA: run pytest --device cuda on a GPU")
    if path is None:
        pytest.skip("tests/fixtures/gpu/ holds no official GPU outputs yet: tests/gpu_check.sh makes them on a GPU")
    reference = read_set(path)
    regime = reference[1]["regime"]
    assert reference[1]["device"].startswith("cuda"), f"{path.name} was computed on {reference[1]['device']}, not a GPU"
    tokenizer = request.getfixturevalue("llama_tokenizer")  # asked for here, so that a CPU run skips for the GPU
    problems = compare(reference, port_set(device, regime, decode, tokenizer), regime)
    assert not problems, f"{regime} on {reference[1]['card']}:\n" + "\n".join(problems)
