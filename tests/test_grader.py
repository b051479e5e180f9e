"""The lessons' grader (lessons/grader.py): correct answers pass, unfilled skeletons say "not written
yet", and each planted mistake fails with a line that names what differs."""

import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from nxtp_minimal import cache, masks, sampling
from nxtp_minimal.llama import RMSNorm, apply_rope, rope_table

sys.path.insert(0, str(REPO / "lessons"))
import grader  # noqa: E402


def graded(check, fn, capsys):
    """(the check's return value, the one line it printed)"""
    ok = check(fn)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return ok, lines[0]


# --- correct answers, mostly the package's own pieces ---


def patch_embedding(pixels, conv_weight, class_embedding, positional_embedding):
    p = conv_weight.shape[-1]
    x = F.conv2d(pixels, conv_weight, stride=p).flatten(2).transpose(1, 2)  # [B, P, width], row by row
    return torch.cat([class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + positional_embedding


def rms_norm(x, weight, eps):
    norm = RMSNorm(x.shape[-1], eps)
    norm.weight.data = weight
    return norm(x)


def rope(x, positions):
    cos, sin = rope_table(x.shape[-1], positions)
    return apply_rope(x, cos, sin)


def one_shot(first_logits, step, k, delimiter_id, decode, max_tokens=19):
    tokens, probs = sampling.one_shot(first_logits[None], step, k, delimiter_id, max_tokens)
    return sampling.rank(sampling.branch_labels(tokens[0], probs[0], delimiter_id), decode)


def cached_step(decoder, caches, newest, t, L, T, leak=False):
    k = newest.shape[0]
    rows = torch.arange(k)[None]  # [1, k]: every branch, in order
    mask = cache.step_mask(rows, t, L, k, T)  # [1, 1, k, L + k * T]
    if leak:  # every branch sees the first t slots of every branch
        mask[..., L:] = (torch.arange(k * T) % T < t)
    h, _ = decoder.blocks(decoder.tok_embeddings(newest[None]), torch.full((k,), L + t - 1), mask, caches,
                          L + rows * T + t - 1)
    return decoder.output(h[0])


CORRECT = [
    (grader.check_patch_embedding, patch_embedding),
    (grader.check_rmsnorm, rms_norm),
    (grader.check_rope, rope),
    (grader.check_label_mask, masks.label_mask),
    (grader.check_one_shot, one_shot),
    (grader.check_cached_step, cached_step),
]
IDS = ["patch_embedding", "rmsnorm", "rope", "label_mask", "one_shot", "cached_step"]


@pytest.mark.parametrize("check, fn", CORRECT, ids=IDS)
def test_correct_answers_pass(check, fn, capsys):
    ok, line = graded(check, fn, capsys)
    assert ok and ": pass (" in line


@pytest.mark.parametrize("check", [c for c, _ in CORRECT], ids=IDS)
def test_unfilled_skeleton_is_not_written_yet(check, capsys):
    def skeleton(*args):
        # ---- your code here ----
        raise NotImplementedError
        # ---- end of your code ----

    ok, line = graded(check, skeleton, capsys)
    assert not ok and "not written yet" in line


# --- planted mistakes: each fails, and the line says what differs ---


def test_causal_mask_instead_of_the_label_mask(capsys):
    def causal(input_tokens, n_image, answer_id, delimiter_id):
        B, S = input_tokens.shape
        return masks.prefix_mask(S, n_image).expand(B, 1, S, S)

    ok, line = graded(grader.check_label_mask, causal, capsys)
    assert not ok
    # the first label after 'hot dog' sees 'hot': named by row, column and the words there
    assert "row 27 (label 'dog') may see column 24 ('hot' of label 'hot dog')" in line
    assert "the official mask hides it" in line and "plain causal mask" in line


def test_label_mask_with_the_answer_of_each_row(capsys):
    def per_row(input_tokens, n_image, answer_id, delimiter_id):
        return torch.cat([masks.label_mask(row[None], n_image, answer_id, delimiter_id) for row in input_tokens])

    ok, line = graded(grader.check_label_mask, per_row, capsys)
    assert not ok and "mixed prompts" in line and "LAST row" in line


def test_rotary_pairs_split_in_halves(capsys):
    def halves(x, positions):
        cos, sin = rope_table(x.shape[-1], positions)
        cos, sin = cos[:, None], sin[:, None]
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    ok, line = graded(grader.check_rope, halves, capsys)
    assert not ok and "position 1, head 0, pair 0" in line and "halves" in line and "neighbours" in line


def test_rotary_with_wrong_frequencies(capsys):
    def base_500(x, positions):
        cos, sin = rope_table(x.shape[-1], positions, theta=500.0)
        return apply_rope(x, cos, sin)

    ok, line = graded(grader.check_rope, base_500, capsys)
    assert not ok and "pair 1 (dims 2, 3)" in line


def test_rmsnorm_without_eps(capsys):
    def no_eps(x, weight, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * weight

    ok, line = graded(grader.check_rmsnorm, no_eps, capsys)
    assert not ok and "eps is missing" in line


def test_patch_embedding_read_column_by_column(capsys):
    def columns(pixels, conv_weight, class_embedding, positional_embedding):
        x = F.conv2d(pixels, conv_weight, stride=conv_weight.shape[-1]).transpose(2, 3).flatten(2).transpose(1, 2)
        return torch.cat([class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + positional_embedding

    ok, line = graded(grader.check_patch_embedding, columns, capsys)
    assert not ok and "image patch 1 (row 0, column 1)" in line and "image patch 4 (row 1, column 0)" in line


def test_sampler_that_does_not_merge_duplicate_labels(capsys):
    def no_merge(first_logits, step, k, delimiter_id, decode, max_tokens=19):
        tokens, probs = sampling.one_shot(first_logits[None], step, k, delimiter_id, max_tokens)
        branches = sampling.branch_labels(tokens[0], probs[0], delimiter_id)
        return sorted(((decode(ids).replace(",", ""), s) for ids, s in branches), key=lambda x: -x[1])

    ok, line = graded(grader.check_one_shot, no_merge, capsys)
    assert not ok and "'apple' appears 2 times in your ranking" in line and "merges them" in line


def test_sampler_scoring_without_the_delimiter(capsys):
    def without_delimiter(first_logits, step, k, delimiter_id, decode, max_tokens=19):
        tokens, probs = sampling.one_shot(first_logits[None], step, k, delimiter_id, max_tokens)
        branches = [(ids, s / probs[0, b, len(ids) - 1].item())
                    for b, (ids, s) in enumerate(sampling.branch_labels(tokens[0], probs[0], delimiter_id))]
        return sampling.rank(branches, decode)

    ok, line = graded(grader.check_one_shot, without_delimiter, capsys)
    assert not ok and "rank 1 is 'teddy bear'" in line and "the delimiter included" in line


def test_cache_step_that_lets_a_branch_see_another_branch(capsys):
    ok, line = graded(grader.check_cached_step, lambda *args: cached_step(*args, leak=True), capsys)
    assert not ok and "at decode step 1, branch 0 ('teddy bear')" in line
    assert "slot 0 of branch 1, another branch's slot (its token 'water')" in line


def test_cache_step_at_the_wrong_position(capsys):
    def shifted(decoder, caches, newest, t, L, T):
        return cached_step(decoder, caches, newest, t + 1, L, T)  # position, slot and mask one step ahead

    ok, line = graded(grader.check_cached_step, shifted, capsys)
    assert not ok and "RoPE positions" in line


def test_an_error_in_the_student_function_is_one_line(capsys):
    ok, line = graded(grader.check_rmsnorm, lambda x, weight, eps: x @ weight[:3], capsys)
    assert not ok and "your function raised RuntimeError" in line


def test_a_wrong_shape_is_named(capsys):
    ok, line = graded(grader.check_rmsnorm, lambda x, weight, eps: x @ weight, capsys)
    assert not ok and "your output has shape [2, 5]; expected [2, 5, 64]" in line


def test_every_check_has_a_skeleton_in_a_lesson_and_an_assert_in_its_solution():
    import nbformat

    checks = [c.__name__ for c, _ in CORRECT]
    lessons = REPO / "lessons"
    for path in sorted(lessons.glob("[0-9][0-9]_*.ipynb")):
        code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        solution = "\n".join(c.source for c in nbformat.read(lessons / "solutions" / path.name, as_version=4).cells)
        for cell in (c for c in code if "grader.check_" in c):
            name = cell.split("grader.check_")[1].split("(")[0]
            assert "# ---- your code here ----" in cell and "raise NotImplementedError" in cell, path.name
            assert f"assert grader.check_{name}(" in solution, f"solutions/{path.name} does not assert check_{name}"
            checks.remove(f"check_{name}")
    assert checks == [], f"no lesson has a skeleton for {checks}"
