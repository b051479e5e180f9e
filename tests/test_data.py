"""Your own data: JSON lines and WebDataset shards of generated scenes, bad samples, held-out splits,
training and evaluating on them from the command line."""

import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from nxtp_minimal.tools import cli
from nxtp_minimal.tools.errors import UserError
from nxtp_minimal.training import data, evaluate, train
from nxtp_minimal.training.scenes import scene

SIZE = 32  # the tiny preset's image size


def write_scenes(folder, n: int, seed: int = 0, size: int = SIZE) -> list:
    """Scenes 0 .. n - 1 of `seed` as PNG files in folder/images, with labels.jsonl beside them."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image, labels = scene(seed, i, size)
        image.save(folder / "images" / f"{i:04d}.png")
        rows.append({"image": f"images/{i:04d}.png", "labels": labels})
    (folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def write_shards(folder, rows: list, source, shards: int = 2) -> str:
    """The same samples as WebDataset shards (png + json), in order; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:06d}.tar")) as sink:
            for i, row in enumerate(rows[s * per:(s + 1) * per], s * per):
                sink.write({"__key__": f"{i:06d}", "png": (source / row["image"]).read_bytes(),
                            "json": {"labels": row["labels"]}})
    return str(folder / f"{{000000..{shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def scenes_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    rows = write_scenes(folder, 48)
    return folder, rows, write_shards(folder / "shards", rows, folder)


def first(stream):
    return next(iter(data.loader(stream, 0)))


def test_json_lines_and_shards_give_the_same_first_batch(scenes_set):
    folder, rows, pattern = scenes_set
    records, problems = data.read_jsonl(folder / "labels.jsonl")
    assert not problems and len(records) == len(rows)
    a = first(data.Stream(records, SIZE, 8, seed=3))
    b = first(data.Stream(pattern, SIZE, 8, seed=3))
    assert torch.equal(a["pixels"], b["pixels"]) and a["labels"] == b["labels"]
    # the shuffle buffer mixed the order, and every batch is a fresh draw of the stream
    assert a["labels"] != [r["labels"] for r in rows[:8]]


def test_readers_share_the_data_without_overlap(scenes_set):
    # two ranks with two DataLoader workers each: four readers, each with every fourth record
    folder, rows, pattern = scenes_set
    records, _ = data.read_jsonl(folder / "labels.jsonl")
    seen = []
    for rank in range(2):
        stream = data.Stream(records, SIZE, 4, rank=rank, world=2, repeat=False, shuffle=0)
        for item in data.loader(stream, 2):
            seen += [tuple(ls) for ls in item["labels"]]
    assert sorted(seen) == sorted(tuple(r["labels"]) for r in rows)
    # shards are shared whole: two ranks of one worker each read one shard each
    halves = [[tuple(ls) for item in data.loader(data.Stream(pattern, SIZE, 4, rank=rank, world=2, repeat=False,
                                                             shuffle=0), 0) for ls in item["labels"]] for rank in range(2)]
    assert halves == [[tuple(r["labels"]) for r in rows[:24]], [tuple(r["labels"]) for r in rows[24:]]]
    with pytest.raises(ValueError, match="2 shards cannot feed 4 readers"):
        data.loader(data.Stream(pattern, SIZE, 4, world=2), 2)


def test_labels_are_cleaned():
    assert data.clean_labels([" Cat", "cat", "Red Car ", "CAT"], "f:1") == ["cat", "red car"]


BAD_LINES = {
    "not json": ("{image: a.png}", "not JSON"),
    "not an object": ('["a.png", ["cat"]]', "not an object"),
    "no image": ('{"labels": ["cat"]}', 'no "image" key'),
    "no labels": ('{"image": "images/0000.png"}', 'no "labels" key'),
    "empty labels": ('{"image": "images/0000.png", "labels": []}', '"labels" is empty'),
    "non-string label": ('{"image": "images/0000.png", "labels": ["cat", 3]}', "label 2 is 3, not a string"),
    "comma": ('{"image": "images/0000.png", "labels": ["cat, dog"]}', "holds ','"),
    "missing image": ('{"image": "images/none.png", "labels": ["cat"]}', "image not found"),
    "unreadable image": ('{"image": "labels.jsonl", "labels": ["cat"]}', "cannot read"),
    "too many pixels": ('{"image": "big.png", "labels": ["cat"]}', "more than the limit of 10000 pixels"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_line_is_one_error_naming_file_and_line(case, scenes_set, tmp_path, capsys):
    folder, rows, _ = scenes_set
    Image.new("RGB", (101, 100)).save(folder / "big.png")
    line, message = BAD_LINES[case]
    path = folder / f"bad_{case.replace(' ', '_')}.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + line + "\n")
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "--data", str(path), "--preset", "tiny", "--out-dir", str(tmp_path), "--max-pixels", "10000"])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path}:3: ") and message in err and "--skip-bad" in err, err
    assert not (tmp_path / "checkpoint.pt").exists()  # stopped before any step


def test_skip_bad_trains_and_lists_what_it_skipped(scenes_set, tmp_path):
    folder, rows, _ = scenes_set
    path = folder / "some_bad.jsonl"
    lines = [json.dumps(r) for r in rows[:12]]
    lines[3], lines[7] = '{"image": "images/none.png", "labels": ["cat"]}', "not json"
    path.write_text("\n".join(lines) + "\n")
    train.main(["--data", str(path), "--preset", "tiny", "--out-dir", str(tmp_path), "--steps", "2",
                "--batch-size", "4", "--workers", "0", "--skip-bad"])
    skipped = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert [s["where"] for s in skipped] == [f"{path}:4", f"{path}:8"]
    assert "image not found" in skipped[0]["error"] and "not JSON" in skipped[1]["error"]


def bad_shards(folder, good: bytes) -> str:
    folder.mkdir()
    with wds.TarWriter(str(folder / "000000.tar")) as sink:
        sink.write({"__key__": "a", "png": good, "json": {"labels": ["sun"]}})
        sink.write({"__key__": "b", "png": good, "txt": "Sun\nmoon\n"})
        sink.write({"__key__": "c", "png": good, "json": {"caption": "no labels here"}})
        sink.write({"__key__": "d", "png": b"not a png", "cls": "sun"})
    return str(folder / "000000.tar")


def test_bad_shard_samples_are_named_by_shard_and_key(scenes_set, tmp_path):
    folder, rows, _ = scenes_set
    shard = bad_shards(tmp_path / "shards", (folder / rows[0]["image"]).read_bytes())
    items = list(data.Stream(shard, SIZE, 8, repeat=False, shuffle=0))
    assert str(items[0]["error"]) == (f'{shard} sample c: no labels: add a .json with "labels", or a .txt or .cls '
                                      "with one label per line")
    items = list(data.Stream(shard, SIZE, 8, repeat=False, shuffle=0, skip_bad=True))
    assert items[0]["labels"] == [["sun"], ["sun", "moon"]]
    assert [s["where"] for s in items[0]["skipped"]] == [f"{shard} sample c", f"{shard} sample d"]
    assert f"cannot read {shard}/d.png as an image" in items[0]["skipped"][1]["error"]


def test_empty_data_and_nothing_left_to_train_on(scenes_set, tmp_path):
    folder, rows, _ = scenes_set
    empty = folder / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no usable samples"):
        train.main(["--data", str(empty), "--out-dir", str(tmp_path)])
    two = folder / "two.jsonl"
    two.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    with pytest.raises(ValueError, match="leaves nothing to train on"):
        train.main(["--data", str(two), "--val-fraction", "0.9", "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="holds out none"):
        train.main(["--data", str(two), "--val-fraction", "0.1", "--out-dir", str(tmp_path)])


def test_val_fraction_never_trains_on_a_held_out_image(scenes_set):
    folder, _, _ = scenes_set
    records, _ = data.read_jsonl(folder / "labels.jsonl")
    records += records[:10]  # an image named on two lines stays on one side
    train_part, val = data.split(records, 0.25)
    assert {r.image for r in train_part}.isdisjoint({r.image for r in val})
    assert len({r.image for r in val}) == 12 and len(train_part) + len(val) == len(records)
    assert data.split(records, 0.25) == (train_part, val)  # fixed: the same split every time
    args = train.parser().parse_args(["--data", str(folder / "labels.jsonl"), "--val-fraction", "0.25"])
    used, held, _ = train.data_sources(args)
    assert (used, held) == data.split(records[:-10], 0.25)


def test_short_run_lowers_the_held_out_loss(scenes_set, tmp_path):
    folder, _, _ = scenes_set
    train.main(["--data", str(folder / "labels.jsonl"), "--val-fraction", "0.25", "--preset", "tiny",
                "--out-dir", str(tmp_path), "--steps", "30", "--batch-size", "16", "--lr", "3e-3", "--warmup", "5",
                "--eval-every", "30", "--workers", "0"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    before, after = metrics["history"][0], metrics["history"][-1]
    assert before["step"] == 0 and after["step"] == 30 and after["images"] == 12
    assert after["loss"] < 0.8 * before["loss"], (before["loss"], after["loss"])
    assert set(metrics) >= {"top_n_recall", "exact@5", "loss", "skipped"}
    # the tokenizer was trained on the labels and written beside the weights, which load with it
    import nxtp_minimal

    model = nxtp_minimal.load(tmp_path / "model.safetensors", tmp_path / "tokenizer.model")
    assert model.config.vision.image_size == SIZE


def test_init_with_another_tokenizer_stops_before_any_step(scenes_set, tmp_path):
    folder, _, _ = scenes_set
    args = ["--data", str(folder / "labels.jsonl"), "--preset", "tiny", "--steps", "1", "--workers", "0"]
    train.main(args + ["--out-dir", str(tmp_path / "a")])
    with pytest.raises(UserError, match="needs --tokenizer"):
        train.main(args + ["--out-dir", str(tmp_path / "b"), "--init", str(tmp_path / "a" / "model.safetensors")])
    with pytest.raises(UserError, match="trained with another tokenizer") as e:
        train.main(args + ["--out-dir", str(tmp_path / "b"), "--init", str(tmp_path / "a" / "model.safetensors"),
                           "--tokenizer", "weights/demo_tokenizer.model"])
    assert "pass --tokenizer with the SentencePiece model" in str(e.value)
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def test_evaluate_data_matches_evaluate_on_the_same_scenes(tmp_path, capsys):
    n = 40
    write_scenes(tmp_path, n, seed=evaluate.HELD_OUT_SEED, size=64)
    pattern = write_shards(tmp_path / "shards", [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()],
                           tmp_path)
    results = []
    for extra in ([], ["--data", str(tmp_path / "labels.jsonl")], ["--data", pattern]):
        cli.main(["evaluate", "--scenes", str(n), "--json"] + extra)
        results.append(json.loads(capsys.readouterr().out))
    on_scenes, on_jsonl, on_shards = results
    assert on_jsonl["images"] == on_shards["images"] == on_scenes["scenes"] == n
    for result in (on_jsonl, on_shards):
        assert result["top_n_recall"] == on_scenes["top_n_recall"]
        assert result["exact@5"] == on_scenes["exact@5"]
    assert on_jsonl["loss"] == pytest.approx(on_shards["loss"], rel=1e-6)
