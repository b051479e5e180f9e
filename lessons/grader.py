"""The grader of the "build it yourself" exercises: your function against the official outputs.

Each `check_*` runs your function on the reference cases in tests/fixtures/ (computed by the official
code, kaiyuyue/nxtp; see tests/fixtures/README.md), prints one line and returns True for a pass:

    patch_embedding: pass ...
    label_mask: not written yet ...
    label_mask: FAIL: train_case case, sample 0, row 27 (label 'dog') may see column 24 ('hot' of label
    'hot dog') in your mask; the official mask hides it ...

A failure names the first thing that differs, in words: the row and column of a mask, the position,
head and pair of a rotation, the branch and step of a sampler. Where the fixtures hold no official
output (labels that two branches both write, the cached step), the reference is the package's own
path, which tests/ checks against the official one.

The LLaMA tokenizer is not needed: the words come from the fixtures' own label lists and prompt.
"""

import json
import math
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import nxtp_minimal
from nxtp_minimal import inference, masks, sampling
from nxtp_minimal.cache import KVCache
from nxtp_minimal.config import VisionConfig
from nxtp_minimal.llama import RMSNorm
from nxtp_minimal.vit import VisionEncoder

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


class Disagreement(Exception):
    """The first thing that differs from the official output, in words."""


class NotWritten(Exception):
    """The skeleton still raises NotImplementedError."""


def _grade(title: str, body, fn) -> bool:
    """Run one check and print its one line: pass, not written yet, or the first disagreement."""
    try:
        with torch.no_grad():
            detail = body(fn)
    except NotWritten:
        print(f"{title}: not written yet (fill in the body marked 'your code here', then run the cell again)")
        return False
    except Disagreement as e:
        print(f"{title}: FAIL: {e}")
        return False
    print(f"{title}: pass ({detail})")
    return True


def _call(fn, *args):
    """Your function on args; its errors become one line instead of a traceback."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise NotWritten from None
    except (Disagreement, NotWritten):  # raised by the grader's own stand-ins (the step of a sampler)
        raise
    except Exception as e:
        raise Disagreement(f"your function raised {type(e).__name__}: {e}") from None


def _tensor(got, shape, what: str, dtype=None) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise Disagreement(f"{what} should be a tensor of shape {list(shape)}, got {type(got).__name__}")
    if tuple(got.shape) != tuple(shape):
        raise Disagreement(f"{what} has shape {list(got.shape)}; expected {list(shape)}")
    if dtype is not None and got.dtype != dtype:
        raise Disagreement(f"{what} has dtype {got.dtype}; expected {dtype}")
    return got if dtype is not None else got.float()


def _close(a, b, atol: float) -> bool:
    return a.shape == b.shape and bool(((a - b).abs() <= atol).all())


# --- fixtures, read once ---


def _meta(name: str) -> dict:
    with safe_open(FIXTURES / name, "pt") as f:
        return json.loads(f.metadata()["meta"])


@lru_cache(maxsize=None)
def _cases() -> dict:
    return json.loads((FIXTURES / "cases.json").read_text())


@lru_cache(maxsize=None)
def _tiny():
    """The tiny trained model of the fixtures (float16 file, computed in float32), without a tokenizer."""
    return nxtp_minimal.load(FIXTURES / "tiny_nxtp.safetensors")


@lru_cache(maxsize=None)
def _tiny_cases() -> dict:
    return load_file(FIXTURES / "tiny_nxtp_cases.safetensors")


DELIMITER, ANSWER, EOS, IMAGE, BOS = 29892, 526, 2, 32000, 1  # LLaMA's ids, as in cases.json


@lru_cache(maxsize=None)
def _words():
    """What the fixtures say about LLaMA ids: id -> word (prompt, one-piece labels) and ids -> label."""
    c = _cases()
    tiny = c["tiny_nxtp"]
    words = {IMAGE: "<|image|>", BOS: "<s>", EOS: "</s>", DELIMITER: ","}
    words.update(zip(tiny["cases"][0]["prompt_token_ids"][2:], tiny["config"]["prompt"].split()))
    labels = {}
    for case in tiny["cases"][:4]:
        for label, ids in zip(case["labels"], case["label_token_ids"]):
            labels[tuple(ids[:-1])] = label  # the delimiter left out
    train = load_file(FIXTURES / "train_case.safetensors")["tokens_objs"]
    for row, names in zip(train.tolist(), c["train"]["label_lists_in_shuffled_order"]):
        text = row[row.index(ANSWER) + 1 : row.index(EOS)]
        for ids, name in zip(_split(text, DELIMITER), names):
            labels[tuple(ids)] = name
    for ids, name in labels.items():
        if len(ids) == len(name.split()):
            words.update(zip(ids, name.split()))
    return words, labels


def _piece(i: int) -> str:
    """One LLaMA id in words: the word, or which label it is a piece of."""
    words, labels = _words()
    if i in words:
        return f"'{words[i]}'"
    return next((f"a piece of '{label}'" for ids, label in labels.items() if i in ids), f"id {i}")


def _split(ids: list, delimiter: int) -> list:
    """[a, b, ',', c] -> [[a, b], [c]]"""
    out, run = [], []
    for i in ids:
        if i == delimiter:
            out.append(run)
            run = []
        else:
            run.append(i)
    return out + ([run] if run else [])


def fixture_decode(ids) -> str:
    """LLaMA ids -> text, for the ids the fixtures name (labels, prompt words, ','); others as <id>."""
    words, labels = _words()
    ids, parts, i = list(ids), [], 0
    while i < len(ids):
        match = max((n for n in range(1, 5) if tuple(ids[i : i + n]) in labels), default=0)
        if match:
            parts.append(" " + labels[tuple(ids[i : i + match])])
            i += match
        else:
            parts.append("," if ids[i] == DELIMITER else " " + words.get(ids[i], f"<{ids[i]}>"))
            i += 1
    return "".join(parts).strip()


# --- 01: the patch embedding ---


def check_patch_embedding(fn) -> bool:
    """fn(pixels [B, 3, S, S], conv_weight [width, 3, p, p], class_embedding [width],
    positional_embedding [1 + P, width]) -> [B, 1 + P, width]

    Patches of p x p pixels, read row by row, each flattened and multiplied by conv_weight (no bias);
    the class token in front; positional_embedding added to every token, the class token included.
    Graded on the fixture encoder (32 px, 8 px patches, width 64): your embedding goes through the
    official blocks, ln_post and projection, and must give the official `output.hidden` and `output.tokens`.
    """
    return _grade("patch_embedding", _patch_embedding, fn)


def _patch_embedding(fn):
    ref, meta = load_file(FIXTURES / "vit.safetensors"), _meta("vit.safetensors")
    enc = VisionEncoder(VisionConfig(**meta["vision"]), meta["embed_dim"]).eval()
    prefix = "vision_encoder."
    enc.load_state_dict({k.removeprefix(prefix): t for k, t in ref.items() if k.startswith(prefix)})
    pixels, g = ref["input.pixels"], enc.config.grid
    pos = enc.positional_embedding.detach()
    args = (pixels.clone(), enc.conv1.weight.detach().clone(), enc.class_embedding.detach().clone(), pos.clone())
    got = _tensor(_call(fn, *args), (pixels.shape[0], 1 + g * g, enc.config.width), "your embedding")
    hidden = enc.ln_post(enc.transformer(enc.ln_pre(got)))
    if _close(hidden, ref["output.hidden"], 1e-4) and _close(enc.proj(hidden), ref["output.tokens"], 1e-4):
        return f"{g * g} patches + class token, through the official blocks: output.hidden and output.tokens match"
    # Where does it differ? The blocks mix all tokens, so compare what goes into them: the package's
    # own embedding, caught on its way into ln_pre (tests/test_vit.py checks it against the official code).
    seen = []
    hook = enc.ln_pre.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    enc.hidden(pixels)
    hook.remove()
    want = seen[0]  # [B, 1 + P, width]
    off = (got - want).abs().amax(-1)  # [B, 1 + P]
    if not (off > 1e-5).any():
        raise Disagreement("your embedding matches, but the encoder's output does not: tell the teacher")
    b, j = (off > 1e-5).nonzero()[0].tolist()

    def token(i):
        if i == 0:
            return "the class token (token 0)"
        return f"token {i}, image patch {i - 1} (row {(i - 1) // g}, column {(i - 1) % g})"

    hint = ""
    if torch.allclose(got[b, j], want[b, j] - pos[j], atol=1e-5):
        hint = ": the positional embedding is missing (add positional_embedding[j] to token j)"
    elif torch.allclose(got[b, j], want[b, j] + pos[j], atol=1e-5):
        hint = ": the positional embedding is added twice"
    else:
        for m in range(want.shape[1]):
            same = torch.allclose(got[b, j], want[b, m], atol=1e-5)
            if same or torch.allclose(got[b, j], want[b, m] - pos[m] + pos[j], atol=1e-5):  # content of m, position j
                hint = f": it holds what the official embedding has at {token(m)}"
                hint += (" (patches are read row by row, and the class token comes first)" if m
                         else " (the class token comes first)")
                break
    raise Disagreement(f"image {b}, {token(j)} differs from the official embedding by up to {off[b, j]:.2g}{hint}")


# --- 02: RMSNorm and the rotary embedding ---


def check_rmsnorm(fn) -> bool:
    """fn(x [..., D], weight [D], eps) -> [..., D]: x / sqrt(mean(x^2 over D) + eps) * weight.

    Graded on the official `rmsnorm.input/output` (weight `layers.0.attention_norm.weight`, eps 1e-5),
    then on the same input scaled by 1/1000, where eps is larger than the mean square and matters.
    """
    return _grade("rms_norm", _rmsnorm, fn)


def _rmsnorm(fn):
    T, eps = load_file(FIXTURES / "llama.safetensors"), _meta("llama.safetensors")["language"]["norm_eps"]
    x, w, want = T["rmsnorm.input"], T["language_decoder.layers.0.attention_norm.weight"], T["rmsnorm.output"]
    got = _tensor(_call(fn, x.clone(), w.clone(), eps), x.shape, "your output")
    ms = x.pow(2).mean(-1, keepdim=True)
    hint = [(x * torch.rsqrt(ms) * w, "eps is missing (your output is x / sqrt(mean(x^2)) * weight); it belongs inside "
             "the square root, added to the mean of the squares"),
            (x / (ms.sqrt() + eps) * w, "eps is added after the square root; it belongs inside, added to the mean "
             "of the squares"),
            (x * w, "the division by the root mean square is missing (your output is x * weight)"),
            (x * torch.rsqrt(ms + eps), "the multiplication by weight is missing"),
            (x * torch.rsqrt(x.pow(2).mean() + eps) * w, "the mean is taken over the whole tensor, not over the last "
             "dimension")]
    off = (got - want).abs().amax(-1)  # [B, S]
    if (off > 1e-5).any():
        b, s = (off > 1e-5).nonzero()[0].tolist()
        why = next((f": {h}" for alt, h in hint if _close(got, alt, 2e-6)), "")
        raise Disagreement(f"batch {b}, position {s}: max |yours - official| = {off[b, s]:.2g}{why}")
    small = x * 1e-3  # mean square ~1e-6, below eps
    norm = RMSNorm(x.shape[-1], eps)
    norm.weight.data = w
    want_small = norm(small)
    got_small = _tensor(_call(fn, small.clone(), w.clone(), eps), x.shape, "your output")
    if not _close(got_small, want_small, 1e-5 * want_small.abs().max().item()):
        ms_small = small.pow(2).mean(-1, keepdim=True)
        why = ("it ignores eps" if _close(got_small, small * torch.rsqrt(ms_small) * w, 1e-4)
               else "eps is added after the square root" if _close(got_small, small / (ms_small.sqrt() + eps) * w, 1e-4)
               else "eps is not where the official formula has it")
        raise Disagreement(
            f"on the official input yours agrees to {off.max():.1e}, but on the same input scaled by 1/1000 (mean "
            f"square {ms_small.mean():.0e}, below eps = {eps:g}) batch 0, position 0 gives {got_small[0, 0, 0]:.4f} "
            f"where the official formula gives {want_small[0, 0, 0]:.4f}: {why}; eps belongs inside the square root, "
            "added to the mean of the squares")
    return "the official case, and a tiny input where eps matters"


def check_rope(fn) -> bool:
    """fn(x [B, S, H, hd], positions [S] long) -> [B, S, H, hd], the rotary embedding with theta 10000.

    Meta's layout: the pairs are neighbours, (x0, x1), (x2, x3), ..., and pair i of the token at
    position p turns by the angle p * theta^(-2i / hd): (a, b) -> (a cos - b sin, a sin + b cos).
    Graded on the official `rope.q/k_rotated` (positions 0..6), then on the official table of cos and
    sin for positions 0..127, read off by turning the unit pairs (1, 0).
    """
    return _grade("rope", _rope, fn)


def _rotate(x, cos, sin, halves=False):
    """Reference rotations, to tell the official layout from the usual mistakes."""
    if halves:  # pairs (x[i], x[i + hd/2]), Hugging Face's layout
        a, b = x.chunk(2, dim=-1)
        cos, sin = cos[:, None], sin[:, None]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def _rope(fn):
    T = load_file(FIXTURES / "llama.safetensors")
    table = T["rope.freqs_cos_sin"]  # [128, hd/2, 2]: cos, sin per position and pair
    for name in ("q", "k"):
        x, want = T[f"rope.{name}"], T[f"rope.{name}_rotated"]
        B, S, H, hd = x.shape
        cos, sin = table[:S, :, 0], table[:S, :, 1]
        got = _tensor(_call(fn, x.clone(), torch.arange(S)), x.shape, "your output")
        off = (got - want).abs().unflatten(-1, (-1, 2)).amax(-1)  # [B, S, H, hd/2]
        if (off > 1e-4).any():
            b, s, h, i = (off > 1e-4).nonzero()[0].tolist()
            if _close(got, _rotate(x, cos, sin, halves=True), 1e-4):
                why = (f": you rotated the pairs (x[i], x[i + {hd // 2}]), the two halves of each head (Hugging Face's "
                       "layout); Meta's pairs are neighbours, (x0, x1), (x2, x3), ...")
            elif _close(got, _rotate(x, cos, -sin), 1e-4):
                why = ": your rotation turns the other way (the sign of sin)"
            elif s == 0:
                why = ": at position 0 the angle is 0, so the rotation must leave x as it is"
            else:
                why = ""
            pair = lambda t: f"({t[b, s, h, 2 * i]:.4f}, {t[b, s, h, 2 * i + 1]:.4f})"  # noqa: E731
            raise Disagreement(f"{name}, batch {b}, position {s}, head {h}, pair {i} (dims {2 * i}, {2 * i + 1}): "
                               f"yours {pair(got)}, official {pair(want)}{why}")
    P, n = table.shape[0], table.shape[1]
    unit = torch.zeros(1, P, 1, 2 * n)
    unit[..., 0::2] = 1.0  # every pair (1, 0): turned, it reads (cos, sin)
    got = _tensor(_call(fn, unit.clone(), torch.arange(P)), unit.shape, "your output")[0, :, 0].unflatten(-1, (-1, 2))
    off = (got - table).abs().amax(-1)  # [P, hd/2]
    if (off > 1e-4).any():
        p, i = (off > 1e-4).nonzero()[0].tolist()
        angle = lambda cs: math.atan2(cs[1], cs[0])  # noqa: E731
        raise Disagreement(f"position {p}, pair {i}: your rotation turns by {angle(got[p, i].tolist()):.4f} rad, the "
                           f"official table by {angle(table[p, i].tolist()):.4f} (= {p} x 10000^(-{2 * i}/{2 * n}), "
                           "modulo 2 pi)")
    return "official q and k at positions 0..6, and the official angles at positions 0..127"


# --- 03: the label mask ---


def check_label_mask(fn) -> bool:
    """fn(input_tokens [B, S] with -1 at image positions, n_image, answer_id, delimiter_id) -> bool [B, 1, S, S]

    True where a query (row) may attend to a key (column). The official rule: start from the prefix
    mask (causal; the image positions see each other); close every column after the answer position;
    re-open the causal triangle inside each label segment: the answer position up to the first
    delimiter, then from the token after each delimiter up to the next delimiter. Two official quirks:
    the answer position is read from the batch's LAST row and used for every row; tokens after the last
    delimiter (last label, eos, padding) see only up to the answer position, not even themselves.
    Graded on the official masks of train_case.safetensors and llama.safetensors, then on a batch
    whose rows' prompts differ in length (reference: masks.label_mask, tested against the official loop).
    """
    return _grade("label_mask", _label_mask, fn)


def _names(row: list, n_image: int, labels=None) -> list:
    """A name for every position of one row: image patch, prompt word, label token, delimiter, eos, padding."""
    words, _ = _words()
    answer = row.index(ANSWER) if ANSWER in row else len(row)
    segments = _split([t for t in row[answer + 1 :] if t not in (EOS, -1)], DELIMITER)
    label = lambda j: f"label '{labels[j]}'" if labels and j < len(labels) else f"label {j + 1}"  # noqa: E731
    names, seg, piece, after_eos = [], 0, 0, False
    for pos, t in enumerate(row):
        if pos < n_image:
            names.append(f"image patch {pos}")
        elif pos < answer:
            special = {IMAGE: "'<|image|>'", BOS: "bos"}
            if labels and t in words:
                names.append(special.get(t, f"prompt word '{words[t]}'"))
            else:
                names.append(f"prompt token {pos - n_image}")
        elif pos == answer:
            names.append("'are', the answer position")
        elif t == EOS or after_eos or t == -1:
            after_eos = True
            names.append("eos" if t == EOS else "padding")
        elif t == DELIMITER:
            names.append(f"the delimiter that ends {label(seg)}")
            seg, piece = seg + 1, 0
        else:
            ids = segments[seg] if seg < len(segments) else []
            split = labels[seg].split() if labels and seg < len(labels) else []
            if len(ids) == 1:
                names.append(label(seg))
            elif len(split) == len(ids):
                names.append(f"'{split[piece]}' of {label(seg)}")
            else:
                names.append(f"token {piece + 1} of {label(seg)}")
            piece += 1
    return names


def _label_mask(fn):
    c = _cases()
    train, llama = load_file(FIXTURES / "train_case.safetensors"), load_file(FIXTURES / "llama.safetensors")
    n_small = _meta("llama.safetensors")["n_image_tokens"]
    mixed = llama["train.input_tokens"].clone()  # row 0 gets a longer prompt than the last row
    mixed[0] = torch.cat([mixed[0, : n_small + 5], torch.tensor([14]), mixed[0, n_small + 5 : -1]])
    cases = [
        ("train_case", train["input_tokens_objs"], c["train"]["n_image_tokens"], train["mask"] == 0,
         c["train"]["label_lists_in_shuffled_order"], ""),
        ("llama", llama["train.input_tokens"], n_small, llama["train.mask"] == 0, None, ""),
        ("mixed prompts", mixed, n_small, masks.label_mask(mixed, n_small, ANSWER, DELIMITER), None,
         " (in this batch the prompts differ in length: the official code reads the answer position from the "
         "batch's LAST row and uses it for every row)"),
    ]
    for case, tokens, n_image, want, labels, note in cases:
        B, S = tokens.shape
        got = _call(fn, tokens.clone(), n_image, ANSWER, DELIMITER)
        if isinstance(got, torch.Tensor) and got.dtype != torch.bool and got.shape == want.shape:
            raise Disagreement(f"your mask is {got.dtype}; return booleans, True where a row may attend to a column")
        got = _tensor(got, want.shape, "your mask", torch.bool)
        if torch.equal(got, want):
            continue
        b, _, i, j = (got != want).nonzero()[0].tolist()
        names = _names(tokens[b].tolist(), n_image, labels[b] if labels else None)
        yours, official = ("may", "hides") if got[b, 0, i, j] else ("may not", "shows")
        line = (f"{case} case, sample {b}, row {i} ({names[i]}) {yours} see column {j} ({names[j]}) in your mask; the "
                f"official mask {official} it ({int((got != want).sum())} of {B * S * S} cells differ){note}")
        if torch.equal(got, masks.prefix_mask(S, n_image).expand_as(got)):
            line += (". Your mask is the plain causal mask (image patches seeing each other): the label mask also "
                     "hides earlier labels")
        elif torch.equal(got, masks.causal_mask(S).expand_as(got)):
            line += (". Your mask is the plain causal mask: the label mask also lets the image patches see each other "
                     "and hides earlier labels")
        raise Disagreement(line)
    return "the official masks of train_case and llama, and a batch with prompts of different lengths"


# --- 04: one-shot sampling with ranking ---


def check_one_shot(fn) -> bool:
    """fn(first_logits [V], step, k, delimiter_id, decode, max_tokens=19) -> [(label, score), ...]

    One image. first_logits: the answer position's logits. The k most likely first tokens start k
    branches; each continues greedily (its most likely next token) until it writes the delimiter at its
    second token or later; stop when every branch has, or each holds max_tokens tokens.
    step(tokens [k, t], live [k] bool) -> logits [k, V]: next-token logits of every branch, given all
    k branches' tokens so far (live: the branches still running). decode(ids) -> text.
    A branch's label is decode(its ids up to and including its first delimiter) with ',' removed; its
    score is the product of those tokens' probabilities (softmax of the logits). Branches with the same
    label text are one label, their scores summed. Returns the labels, highest score first.
    Graded on the official labels and scores of the tiny fixture model (two images, k = 5 and 1), with
    the official recompute loop as `step`; then on a toy vocabulary where two branches write 'apple'.
    """
    return _grade("one_shot", _one_shot, fn)


def _ranked(got, what: str) -> list:
    try:
        return [(str(label).strip(), float(score)) for label, score in got]
    except (TypeError, ValueError):
        raise Disagreement(f"{what} should be a list of (label, score) pairs, got {got!r:.80}") from None


def _guarded(step, k: int, max_tokens: int):
    """The step the student's sampler calls, checking what it is given."""
    calls = []

    def guarded(tokens, live):
        t = len(calls) + 1
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != k:
            shape = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise Disagreement(f"at decode step {t} your sampler passed step tokens {shape}; step takes every branch's "
                               f"tokens so far, [k, t] = [{k}, {t}] at step {t}")
        if tokens.shape[1] >= max_tokens:
            raise Disagreement(f"your sampler asked for a token after each branch already holds {tokens.shape[1]}: "
                               f"stop when every branch has written the delimiter or holds max_tokens = {max_tokens}")
        calls.append(tokens.clone())
        return step(tokens.long(), torch.as_tensor(live, dtype=torch.bool).reshape(k))

    return guarded, calls


def _one_shot(fn):
    model, T = _tiny(), _tiny_cases()
    for case in _cases()["tiny_nxtp"]["cases"][:4]:
        j, k = int(case["image"][-5]), case["k"]  # tiny_nxtp_imageJ.png
        ref = inference.ReferenceSampler(model, T[f"image{j}.pixels"], k, case["prompt_token_ids"])
        step, calls = _guarded(ref.step, k, sampling.MAX_TOKENS)
        got = _ranked(_call(fn, T[f"image{j}.first_logits"][0].clone(), step, k, DELIMITER, fixture_decode,
                            sampling.MAX_TOKENS), "your result")
        where = f"image {j}, k = {k}"
        _duplicates(got, where)
        tokens, probs = T[f"image{j}.k{k}.branch_tokens"], T[f"image{j}.k{k}.branch_probs"]
        _compare(got, list(zip(case["labels"], case["probs"])), where, "officially",
                 lambda label: _branch_hint(calls, tokens, probs, label))
    # Two branches that write the same text: no official case has them, so a toy vocabulary does, with
    # the package's sampler and ranking as the reference.
    first, step, k = _toy()
    tokens, probs = sampling.one_shot(first[None], step, k, 0)
    branches = sampling.branch_labels(tokens[0], probs[0], 0)
    guarded, _ = _guarded(step, k, sampling.MAX_TOKENS)
    got = _ranked(_call(fn, first.clone(), guarded, k, 0, _toy_decode, sampling.MAX_TOKENS), "your result")
    _duplicates(got, "toy vocabulary", branches)

    def factors(label):
        for (ids, score), ps in zip(branches, probs[0].tolist()):
            if _toy_decode(ids).replace(",", "") == label:
                pieces = " ".join(repr(_TOY[i]) for i in ids)
                return f"; the branch {pieces} scores {' x '.join(f'{p:.2f}' for p in ps[: len(ids)])} = {score:.4f}"
        return ""

    _compare(got, sampling.rank(branches, _toy_decode), "toy vocabulary", "by the official rule", factors)
    return "the official labels and scores of both fixture images at k = 1 and 5, and merged duplicates"


def _compare(got, want, where, by, hint):
    """The first rank at which two rankings [(label, score)] differ, in words."""
    for r, ((label, score), (official, p)) in enumerate(zip(got, want)):
        if label != official or abs(score - p) > 1e-5:
            raise Disagreement(f"{where}: rank {r + 1} is '{label}' with {score:.5f} in yours, '{official}' with "
                               f"{p:.5f} {by}{hint(official)}")
    if len(got) != len(want):
        raise Disagreement(f"{where}: yours gives {len(got)} labels, {len(want)} {by} "
                           f"({[label for label, _ in want]})")


def _duplicates(got, where, branches=None):
    seen = [label for label, _ in got]
    for label in dict.fromkeys(seen):
        if seen.count(label) > 1:
            which = ""
            if branches:  # the toy case: name the pieces of the branches that write it
                pieces = [" + ".join(repr(_TOY[t]) for t in ids[:-1]) for ids, _ in branches
                          if _toy_decode(ids).replace(",", "") == label]
                which = f" (branches {' and '.join(pieces)} both write it)" if len(pieces) > 1 else ""
            raise Disagreement(f"{where}: '{label}' appears {seen.count(label)} times in your ranking{which}: branches "
                               "with the same text are one label, and the official ranking merges them, adding their "
                               "scores")


def _branch_hint(calls, branch_tokens, branch_probs, label) -> str:
    """The first step at which a fed branch is no official branch's prefix; else how the official scores `label`."""
    official = branch_tokens[:, 8:]  # the fixtures keep the prompt in front
    for t, tokens in enumerate(calls, start=1):
        n = min(tokens.shape[1], official.shape[1])
        known = {tuple(row) for row in official[:, :n].tolist()}
        for b, row in enumerate(tokens[:, :n].tolist()):
            if tuple(row) not in known:
                return (f"; at decode step {t} your branch {b} holds '{fixture_decode(row)}', which no official branch "
                        f"holds (they hold {sorted(fixture_decode(r) for r in known)})")
    for ids, probs in zip(official.tolist(), branch_probs.tolist()):
        end = ids.index(DELIMITER) + 1 if DELIMITER in ids else len(ids)
        if fixture_decode(ids[:end]).replace(",", "") == label:
            factors = " x ".join(f"{p:.4f}" for p in probs[:end])
            return (f"; officially a branch writing '{label}' scores the product of its {end} token probabilities, "
                    f"the delimiter included: {factors} = {math.prod(probs[:end]):.5f}")
    return ""


_TOY = [",", "\u2581apple", "\u2581pear", "\u2581ap", "ple", "\u2581red", "\u2581fig", "\u2581kiwi"]


def _toy_decode(ids) -> str:
    return "".join(_TOY[i] for i in ids).replace("\u2581", " ").strip()


def _toy():
    """First-token logits and a step over the toy vocabulary: 'apple' comes as '▁apple' and as '▁ap' 'ple'."""
    def logits(p: dict):
        probs = torch.full((len(_TOY),), (1 - sum(p.values())) / (len(_TOY) - len(p)))
        for piece, q in p.items():
            probs[_TOY.index(piece)] = q
        return probs.log()

    first = logits({"\u2581pear": 0.25, "\u2581ap": 0.2, "\u2581apple": 0.18, "\u2581red": 0.15, "\u2581fig": 0.1})
    after = {"\u2581apple": {",": 0.9}, "\u2581pear": {",": 0.8}, "\u2581ap": {"ple": 0.7}, "ple": {",": 0.9},
             "\u2581red": {"\u2581apple": 0.6}, ",": {",": 0.9}}
    table = torch.stack([logits(after.get(piece, {",": 0.5})) for piece in _TOY])  # [V, V]: by the last token
    return first, lambda tokens, live: table[tokens[:, -1]], 4


# --- 08: one cached decode step ---


def check_cached_step(fn) -> bool:
    """fn(decoder, caches, newest [k] long, t, L, T) -> logits [k, V]: one decode step of one image's k branches.

    Each branch holds t tokens; newest is its token t - 1. The cache row of every block is
    [prefix: L columns | branch 0: T slots | ... | branch k-1: T slots], the prefix already filled.
    Feed all k newest tokens at RoPE position L + t - 1, write branch b's key and value into its slot
    t - 1 (column L + b * T + t - 1), and let branch b see the prefix and its own first t slots, nothing
    else: `decoder.blocks(decoder.tok_embeddings(newest[None]), positions [k], mask [1, 1, k, L + k * T],
    caches, columns [1, k])` then `decoder.output`.
    Graded by sampling with it on the tiny fixture model (k = 5, both images) against the official
    recompute loop, step by step, and the ranked labels against the official ones.
    """
    return _grade("cached_step", _cached_step, fn)


class _Recorder:
    """The decoder, keeping its last `blocks` call (positions, mask, columns) to explain a difference."""

    def __init__(self, decoder):
        self._decoder, self.last = decoder, None

    def blocks(self, h, positions, mask=None, cache=None, columns=None, need_weights=False):
        self.last = {"positions": positions, "mask": mask, "columns": columns, "cache": cache}
        return self._decoder.blocks(h, positions, mask, cache, columns, need_weights)

    def __call__(self, *args, **kwargs):
        return self._decoder(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._decoder, name)


def _cached_step(fn):
    model, fixtures = _tiny(), _tiny_cases()
    decoder, c = model.language_decoder, model.config
    for case in _cases()["tiny_nxtp"]["cases"][:4]:
        j, k = int(case["image"][-5]), case["k"]
        if k == 1:
            continue
        pixels, prompt = fixtures[f"image{j}.pixels"], case["prompt_token_ids"]
        official = inference.ReferenceSampler(model, pixels, k, prompt)
        x = model.prefix(pixels, prompt)  # [1, L, D]
        L, T = x.shape[1], sampling.MAX_TOKENS - 1
        H, hd = c.language.n_heads, c.language.head_dim
        caches = [KVCache(1, L, k, T, H, hd, x.device, x.dtype) for _ in decoder.layers]
        h, _ = decoder.blocks(x, torch.arange(L), masks.prefix_mask(L, c.vision.n_patches), caches)
        first = decoder.output(h[:, -1])
        branch_names = [fixture_decode(ids[: ids.index(DELIMITER)] if DELIMITER in ids else ids)
                        for ids in fixtures[f"image{j}.k{k}.branch_tokens"][:, len(prompt):].tolist()]
        recorder = _Recorder(decoder)

        def step(tokens, live):
            t = tokens.shape[1]
            want = official.step(tokens, live)  # [k, V]
            got = _tensor(_call(fn, recorder, caches, tokens[:, -1].clone(), t, L, T), want.shape,
                          f"at step {t}, your logits")
            off = (got - want).abs().amax(-1)  # [k]
            if ((off > 1e-4) & live).any():
                b = int(((off > 1e-4) & live).nonzero()[0])
                where = f"image {j}, k = {k}: at decode step {t}, branch {b} ('{branch_names[b]}')"
                why = _step_hint(recorder.last, b, t, L, T, k, c.vision.n_patches, tokens)
                raise Disagreement(f"{where} gets logits up to {off[b]:.2g} away from the official loop's{why}")
            return got

        tokens, probs = sampling.one_shot(first, step, k, DELIMITER)
        ranked = sampling.rank(sampling.branch_labels(tokens[0], probs[0], DELIMITER), fixture_decode)
        labels = [label for label, _ in ranked]
        if labels != case["labels"]:
            raise Disagreement(f"image {j}, k = {k}: your steps give {labels}, officially {case['labels']}")
    return "every step of both fixture images at k = 5 equals the official recompute loop, and so do the labels"


def _step_hint(call, b, t, L, T, k, n_image, tokens) -> str:
    if call is None:
        return "; your step never called decoder.blocks (with the caches, the mask and the columns)"
    def column(col):
        if col < L:
            return f"prefix column {col} ({f'image patch {col}' if col < n_image else 'prompt'})"
        return f"slot {(col - L) % T} of branch {(col - L) // T}"

    positions = torch.as_tensor(call["positions"]).reshape(-1)
    if not bool((positions == L + t - 1).all()):
        return (f"; your newest tokens sit at RoPE positions {positions.tolist()}, and the official loop puts the "
                f"token of step {t} at L + t - 1 = {L + t - 1}")
    columns = call["columns"]
    if columns is None:
        return "; your step passed no columns, so the new keys and values were not written into the cache"
    columns = torch.as_tensor(columns).reshape(-1)
    if len(columns) == k and int(columns[b]) != L + b * T + t - 1:
        return (f"; branch {b}'s key and value went to cache column {int(columns[b])} ({column(int(columns[b]))}), "
                f"and its slot for step {t} is column L + b * T + t - 1 = {L + b * T + t - 1}")
    mask = call["mask"]
    if mask is None or mask.shape[-1] != L + k * T:
        shape = None if mask is None else list(mask.shape)
        return f"; your mask is {shape}, expected [1, 1, k, L + k * T] = [1, 1, {k}, {L + k * T}]"
    row = mask.reshape(-1, mask.shape[-2], mask.shape[-1])[0, b].bool()  # what branch b may see
    for col in range(L + k * T):
        own = col < L or ((col - L) // T == b and (col - L) % T < t)
        if bool(row[col]) != own:
            if col < L:
                return f"; your mask hides {column(col)} from branch {b}"
            o, s = (col - L) // T, (col - L) % T
            if o != b:
                held = f"its token {_piece(int(tokens[o, s]))}" if s < t else "empty at this step"
                return f"; your mask lets branch {b} see slot {s} of branch {o}, another branch's slot ({held})"
            if row[col]:
                return f"; your mask lets branch {b} see its own slot {s}, still empty at step {t}"
            return f"; your mask hides branch {b}'s own slot {s} (its token {_piece(int(tokens[b, s]))})"
    return ""
