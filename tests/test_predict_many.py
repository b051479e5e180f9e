"""`predict` on folders and data sets: inputs, bad files among good ones, --out with resume, torchrun
shards, and --attention-maps. Labels are checked against `model.predict` on each image alone."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from PIL import Image

from nxtp_minimal import inference, load_demo, load_image, preprocess
from nxtp_minimal.tools import cli, predict
from nxtp_minimal.training.scenes import scene
from nxtp_minimal.weights import DEMO_DIR

DEMO = ["--weights", os.path.join(DEMO_DIR, "demo.safetensors"),
        "--tokenizer", os.path.join(DEMO_DIR, "demo_tokenizer.model")]
K = 5


@pytest.fixture(scope="module")
def demo():
    return load_demo()


def save_scenes(folder, n, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        paths.append(str(folder / f"scene_{i:03d}.png"))
        scene(5, i, 64)[0].save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def scenes200(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes200")
    return folder, save_scenes(folder, 200)


def run(capsys, *args):
    """The command line in this process: (exit status, stdout, stderr)."""
    try:
        cli.main(["predict", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(code, err):
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def expected_labels(demo, path):
    return [{"label": label, "prob": pytest.approx(p, abs=1e-5)} for label, p in demo.predict(path, k=K)[0]]


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# --- inputs ---


def test_folders_globs_and_lists(tmp_path, monkeypatch):
    a = save_scenes(tmp_path / "data" / "a", 2)
    b = save_scenes(tmp_path / "data" / "b" / "deep", 2, start=2)
    upper = tmp_path / "data" / "b" / "UPPER.PNG"
    scene(5, 9, 64)[0].save(upper, format="PNG")
    (tmp_path / "data" / "a" / "notes.txt").write_text("not an image")
    data = str(tmp_path / "data")
    # folders: recursive, sorted, only extensions Pillow reads (upper case too)
    assert predict.image_paths([data]) == a + [str(upper)] + b
    # globs as this command expands them: `**` recursive, non-images left out
    assert predict.image_paths([f"{data}/**/scene_*.png"]) == a + b
    assert predict.image_paths([f"{data}/a/*"]) == a
    # the order given, each image once (first spelling), a missing file kept (it fails later, as one image)
    again = os.path.join(data, "a", ".", "scene_000.png")
    got = predict.image_paths([b[1], again, data, "no/such.png"])
    assert got == [b[1], again, a[1], str(upper), b[0], "no/such.png"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{b[0]}\n\n{a[0]}\n  \n")
    assert predict.image_paths([a[1]], str(listing)) == [a[1], b[0], a[0]]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{b[1]}\n{a[0]}\n"))
    assert predict.image_paths([], "-") == [b[1], a[0]]


@pytest.mark.parametrize("inputs, message", [
    (["EMPTY"], "no images in folder EMPTY (searched recursively"),
    (["EMPTY/*.png"], "no images match the pattern EMPTY/*.png"),
    ([], "no images given: name image files, folders or quoted glob patterns, or --files-from LIST"),
    (["--files-from", "EMPTY/list.txt"], "no images given"),
    (["--files-from", "EMPTY/none.txt"], "--files-from list not found: EMPTY/none.txt"),
])
def test_no_images_is_one_line(capsys, tmp_path, inputs, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "list.txt").write_text("\n\n")
    (empty / "readme.txt").write_text("no images here")
    inputs = [item.replace("EMPTY", str(empty)) for item in inputs]
    line = one_error_line(*run(capsys, *inputs, *DEMO)[::2])
    assert message.replace("EMPTY", str(empty)) in line


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--workers", "-1"], "--workers must be at least 0, got -1"),
    (["--max-pixels", "-5"], "--max-pixels must be at least 0, got -5"),
    (["--json", "--out", "x.jsonl"], "--json prints the results, --out writes them to a file: give one of them"),
])
def test_bad_options_are_one_line(capsys, args, message):
    line = one_error_line(*run(capsys, str(REPO / "lessons" / "images"), *args, *DEMO)[::2])
    assert message in line


def test_torchrun_needs_out_and_a_list_file(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    image = str(REPO / "lessons" / "images" / "scene_0.png")
    line = one_error_line(*run(capsys, image, *DEMO)[::2])
    assert line == ("error: under torchrun, --out is required: each rank writes OUT.rankR and rank 0 merges them "
                    "into OUT")
    line = one_error_line(*run(capsys, "--files-from", "-", "--out", "x.jsonl", *DEMO)[::2])
    assert "--files-from needs a file, not -: the ranks cannot share stdin" in line


def test_labels_equal_predict_on_each_image(capsys, demo, tmp_path, monkeypatch):
    paths = save_scenes(tmp_path / "data", 7)
    listing = tmp_path / "list.txt"
    listing.write_text(paths[0] + "\n")
    order = paths[5:] + paths[:5]
    # a folder, a glob, a list on stdin; DataLoader workers and a last batch that is not full
    monkeypatch.setattr(sys, "stdin", io.StringIO(paths[6] + "\n"))
    code, out, err = run(capsys, *paths[5:], str(tmp_path / "data" / "scene_00[0-4].png"), "--files-from", "-",
                         "--top-k", str(K), "--batch-size", "3", "--workers", "2", "--json", *DEMO)
    assert code == 0 and err == ""
    rows = json.loads(out)
    assert [row["image"] for row in rows] == order
    for row in rows:
        assert row["labels"] == expected_labels(demo, row["image"])
    # the official table, the same labels; the listed image was in the folder already
    code, out, _ = run(capsys, str(tmp_path / "data"), "--files-from", str(listing), "--top-k", str(K), *DEMO)
    assert code == 0
    lines = out.splitlines()
    assert lines[:: K + 1] == [f"{path}: top-{K} predictions:" for path in paths]
    for i, path in enumerate(paths):
        printed = [line.split(" - ", 1) for line in lines[i * (K + 1) + 1: (i + 1) * (K + 1)]]
        assert [label for _, label in printed] == [label for label, _ in demo.predict(path, k=K)[0]]
        assert [float(p.removeprefix("| prob: ")) for p, _ in printed] == [
            pytest.approx(p, abs=1e-5) for _, p in demo.predict(path, k=K)[0]]


# --- bad images among good ones ---


def test_one_bad_image_among_many(capsys, demo, tmp_path):
    good = save_scenes(tmp_path / "data", 4)
    text = tmp_path / "data" / "notes.png"
    text.write_text("hello")
    bomb = tmp_path / "data" / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 million pixels in about 48 kB
    assert bomb.stat().st_size < 100_000
    missing = str(tmp_path / "data" / "gone.png")
    inputs = [str(tmp_path / "data"), missing]
    order = [str(bomb), str(text)] + good + [missing]
    errors = {
        str(bomb): f"{bomb} is 20000 x 20000 = 400000000 pixels, more than the limit of 89478485 pixels (a guard "
                   "against decompression bombs); if you trust the file, pass --max-pixels N to raise it",
        str(text): f"cannot read {text} as an image (cannot identify image file '{text}'); give a JPEG, PNG or "
                   "other format PIL opens",
        missing: f"image not found: {missing}",
    }
    code, out, err = run(capsys, *inputs, "--top-k", str(K), "--json", "--batch-size", "2", *DEMO)
    assert code == 1 and "Traceback" not in err
    assert err.splitlines() == [f"error: {errors[path]}" for path in order if path in errors]
    rows = json.loads(out)
    assert [row["image"] for row in rows] == order
    for row in rows:
        if row["image"] in errors:
            assert row == {"image": row["image"], "error": errors[row["image"]]}
        else:
            assert row["labels"] == expected_labels(demo, row["image"])
    # the table leaves the failures out (their lines are on stderr)
    code, out, err = run(capsys, *inputs, "--top-k", str(K), *DEMO)
    assert code == 1 and len(err.splitlines()) == 3
    headers = [line for line in out.splitlines() if not line.startswith("|")]
    assert headers == [f"{path}: top-{K} predictions:" for path in good]
    # --max-pixels reaches load_image: a 64 x 64 scene is 4096 pixels
    code, out, err = run(capsys, good[0], "--max-pixels", "4095", *DEMO)
    assert one_error_line(code, err) == (f"error: {good[0]} is 64 x 64 = 4096 pixels, more than the limit of 4095 "
                                         "pixels (a guard against decompression bombs); if you trust the file, pass "
                                         "--max-pixels N to raise it")
    assert run(capsys, good[0], "--max-pixels", "4096", *DEMO)[0] == 0


# --- --out and resume ---


def test_out_resumes_after_an_interruption(capsys, scenes200, tmp_path, monkeypatch):
    folder, paths = scenes200
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    code, out, _ = run(capsys, str(folder), "--out", str(whole), "--batch-size", "16", "--workers", "0", *DEMO)
    assert code == 0 and out == f"results in {whole}: 200 images labelled, 0 skipped (already there), 0 failed\n"

    calls = []
    label_batch = predict.label_batch

    def interrupted(model, pixels, k, attention=False, options=None):
        # every finished batch is on disk before the next one starts
        assert len(part.read_text().splitlines()) == 16 * len(calls)
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(len(pixels))
        return label_batch(model, pixels, k, attention, options)

    monkeypatch.setattr(predict, "label_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(capsys, str(folder), "--out", str(part), "--batch-size", "16", "--workers", "2", *DEMO)
    assert len(jsonl(part)) == 80
    monkeypatch.setattr(predict, "label_batch", label_batch)
    code, out, _ = run(capsys, str(folder), "--out", str(part), "--batch-size", "16", "--workers", "2", *DEMO)
    assert code == 0 and out == f"results in {part}: 120 images labelled, 80 skipped (already there), 0 failed\n"
    rows = jsonl(part)
    assert len(rows) == 200 and [row["image"] for row in rows] == paths
    assert part.read_text() == whole.read_text()  # the same batches, so the same numbers
    # once more: nothing left to do
    code, out, _ = run(capsys, str(folder), "--out", str(part), *DEMO)
    assert out == f"results in {part}: 0 images labelled, 200 skipped (already there), 0 failed\n"
    assert part.read_text() == whole.read_text()


def test_killed_process_resumes(scenes200, tmp_path):
    paths = scenes200[1][:40]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths))
    out = tmp_path / "killed.jsonl"
    command = [sys.executable, "-m", "nxtp_minimal", "predict", "--files-from", str(listing), "--out", str(out),
               "--batch-size", "4", "--workers", "0", *DEMO]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (not out.exists() or len(out.read_bytes().splitlines()) < 8) and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    kept = len(jsonl(out))
    assert 8 <= kept < 40, "the run ended before it was killed"
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"results in {out}: {40 - kept} images labelled, {kept} skipped (already there), 0 failed\n"
    rows = jsonl(out)
    assert [row["image"] for row in rows] == paths


def test_cut_line_and_failures_are_redone(capsys, demo, tmp_path):
    paths = save_scenes(tmp_path / "data", 5)
    out = tmp_path / "r.jsonl"
    assert run(capsys, str(tmp_path / "data"), "--out", str(out), "--top-k", str(K), *DEMO)[0] == 0
    whole = out.read_text()
    rows = whole.splitlines(keepends=True)
    # image 1 failed last time, image 3 was being written when the run was killed; rows out of order
    failed = json.dumps({"image": paths[1], "error": "cannot read it"}) + "\n"
    out.write_text(rows[2] + failed + rows[0] + rows[3][:25])
    code, printed, _ = run(capsys, str(tmp_path / "data"), "--out", str(out), "--top-k", str(K), *DEMO)
    assert code == 0 and printed == f"results in {out}: 3 images labelled, 2 skipped (already there), 0 failed\n"
    assert [row["image"] for row in jsonl(out)] == paths  # input order again
    for row in jsonl(out):
        assert row["labels"] == expected_labels(demo, row["image"])
    # a file that is not ours is not appended to
    other = tmp_path / "other.jsonl"
    other.write_text("image,labels\n")
    line = one_error_line(*run(capsys, paths[0], "--out", str(other), *DEMO)[::2])
    assert line == (f"error: {other} line 1 is not a result of predict --out: give another --out, or delete the "
                    "file to start again")


# --- torchrun ---


def test_torchrun_two_processes_equal_one(capsys, tmp_path):
    paths = save_scenes(tmp_path / "data", 11)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert run(capsys, str(tmp_path / "data"), "--out", str(one), "--top-k", str(K), "--batch-size", "2", *DEMO)[0] == 0
    reference = jsonl(one)
    # rank 1 (images 1, 3, 5, ...) was killed last time after two images, in the middle of the third
    shard = reference[1::2]
    (tmp_path / "two.jsonl.rank1").write_text("".join(json.dumps(row) + "\n" for row in shard[:2]) + '{"image": "')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "nxtp_minimal", "predict", str(tmp_path / "data"), "--out", str(two), "--top-k", str(K),
         "--batch-size", "2", "--workers", "0", *DEMO],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"results in {two}: 9 images labelled, 2 skipped (already there), 0 failed\n"
    assert sorted(os.listdir(tmp_path)) == ["data", "one.jsonl", "two.jsonl"]  # rank files merged, then removed
    merged = jsonl(two)
    assert [row["image"] for row in merged] == paths
    for got, want in zip(merged, reference):
        assert [x["label"] for x in got["labels"]] == [x["label"] for x in want["labels"]]
        assert [x["prob"] for x in got["labels"]] == pytest.approx([x["prob"] for x in want["labels"]], abs=1e-6)


# --- attention maps ---


def test_figure_files_never_overwrite():
    paths = ["a/x.png", "b/x.jpg", "c/x-2.png", "d/y.png", "e/x.png"]
    assert predict.figure_files(paths, "maps") == {
        "a/x.png": "maps/x.png", "b/x.jpg": "maps/x-3.png", "c/x-2.png": "maps/x-2.png", "d/y.png": "maps/y.png",
        "e/x.png": "maps/x-4.png"}


def test_attention_maps(capsys, demo, tmp_path):
    a = save_scenes(tmp_path / "data" / "a", 2)
    b = save_scenes(tmp_path / "data" / "b", 1)  # scene_000.png in both folders
    (tmp_path / "data" / "b" / "bad.png").write_text("hello")
    maps_dir = tmp_path / "maps"
    code, out, err = run(capsys, str(tmp_path / "data"), "--attention-maps", str(maps_dir), "--top-k", "3", *DEMO)
    assert code == 1 and err.count("error: ") == 1
    assert sorted(os.listdir(maps_dir)) == ["scene_000-2.png", "scene_000.png", "scene_001.png"]
    with Image.open(maps_dir / "scene_000-2.png") as figure:
        assert figure.width > 3 * figure.height > 600  # the image and three overlays side by side
    # the maps drawn are the sampling call's own, for the printed labels: those of model.attention_maps
    paths = a + b
    pixels = torch.stack([preprocess(load_image(p), 64) for p in paths])
    for path, (ranked, maps) in zip(paths, predict.label_batch(demo, pixels, K, attention=True)):
        assert ranked == [(lab, pytest.approx(p, abs=1e-5)) for lab, p in demo.predict(path, k=K)[0]]
        reference = inference.attention_maps(demo, path, [label for label, _ in ranked])
        assert list(maps) == list(reference)
        for label in reference:
            torch.testing.assert_close(maps[label], reference[label], atol=1e-5, rtol=0)


def test_out_that_is_a_folder_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, str(REPO / "lessons" / "images" / "scene_0.png"), "--out", str(tmp_path))
    line = one_error_line(code, err)
    assert "is a folder" in line and "results.jsonl" in line


def test_attention_maps_that_is_a_file_is_one_line(capsys, tmp_path):
    existing = tmp_path / "maps.png"
    existing.write_bytes(b"")
    code, _, err = run(capsys, str(REPO / "lessons" / "images" / "scene_0.png"), "--attention-maps", str(existing))
    assert "is a file: give a folder" in one_error_line(code, err)
    code, _, err = run(capsys, str(REPO / "lessons" / "images" / "scene_0.png"), "--attention-maps", str(existing / "below"))
    assert "cannot make --attention-maps" in one_error_line(code, err)
