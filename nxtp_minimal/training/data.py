"""Your own labelled images for `train --data` and `evaluate --data`: JSON lines or WebDataset shards.

- JSON lines: one object per line, `{"image": "photos/1.jpg", "labels": ["cat", "red car"]}`, image paths
  relative to the file (absolute paths allowed); blank lines are ignored.
- WebDataset shards (`'shards/{000000..000009}.tar'`, as img2dataset writes them): each sample an image
  file (.jpg, .png, ...) and either a `.json` holding `labels` or a `.txt`/`.cls` with one label per line.

Labels are stripped and lower-cased (the training text lower-cases them anyway, `prompt.training_ids`), and a
label named twice for one image is kept once, where it first appears: with a label mask every label is its
own target, so a repeat would only double its weight.

A `Stream` reads either format in DataLoader workers: every rank and every worker takes its own share of the
units (JSON lines: records; shards: whole tar files, streamed by the `webdataset` library), the first pass
in the order given (so a JSON-lines file and shards of the same samples give the same batches) and every
later pass in a seeded permutation, each pass mixed by a seeded shuffle buffer. Batches
are built in the workers, so batch i of a rank always comes from the same samples, which is what lets a
resumed run skip exactly the batches it has trained on.
"""

import io
import itertools
import json
import os
import random
from dataclasses import dataclass

import torch

from ..preprocess import load_image, preprocess

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
SHUFFLE_BUFFER = 1000  # samples; as in webdataset's examples, enough to mix neighbours of a sorted shard
EXAMPLE = '{"image": "photos/1.jpg", "labels": ["cat", "red car"]}'


class BadSample(ValueError):
    """One sample that cannot be used: `where` (FILE:LINE, or shard and key) and what to fix."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem

    def __reduce__(self):  # DataLoader workers send it to the main process by pickling
        return BadSample, (self.where, self.problem)

    def row(self) -> dict:
        return {"where": self.where, "error": self.problem}


@dataclass
class Record:
    """One JSON-lines sample: where it was written (FILE:LINE), its image file and its cleaned labels."""

    where: str
    image: str
    labels: list


def clean_labels(labels, where: str) -> list:
    """Stripped, lower-cased labels without repeats (first place kept); BadSample for anything unusable."""
    if not isinstance(labels, list):
        raise BadSample(where, f'"labels" must be a list of strings, got {type(labels).__name__}; write e.g. {EXAMPLE}')
    if not labels:
        raise BadSample(where, '"labels" is empty: give every image at least one label, or leave the image out')
    out = []
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise BadSample(where, f"label {i + 1} is {json.dumps(label)}, not a string: write labels as text in quotes")
        label = label.strip().lower()
        if not label or "," in label:
            raise BadSample(where, f"label {i + 1} {json.dumps(label)} is empty or holds ',', which NXTP writes "
                                   "between labels: give one object name per label")
        if label not in out:
            out.append(label)
    return out


def parse_line(line: str, where: str, folder: str) -> Record:
    """One JSON line as a Record (the image path resolved against `folder`); BadSample if it is not one."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadSample(where, f"not JSON ({e.msg}); write one object per line, e.g. {EXAMPLE}") from None
    if not isinstance(obj, dict):
        raise BadSample(where, f"a JSON {type(obj).__name__}, not an object; write e.g. {EXAMPLE}")
    for key in ("image", "labels"):
        if key not in obj:
            raise BadSample(where, f'no "{key}" key; write e.g. {EXAMPLE}')
    if not isinstance(obj["image"], str) or not obj["image"]:
        raise BadSample(where, '"image" must be the path of an image file, relative to this file or absolute')
    return Record(where, os.path.join(folder, obj["image"]), clean_labels(obj["labels"], where))


def read_jsonl(path, max_pixels=None) -> tuple:
    """The quick pass over a JSON-lines file, before any training: (records, problems).

    Every line is parsed and every image opened and decoded once, so a bad line is reported with its
    FILE:LINE now rather than in the middle of a run; problems is a list of BadSample, in file order.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}. Give a JSON-lines file or shards such as 'shards/{{000000..000009}}.tar'")
    folder, records, problems = os.path.dirname(os.path.abspath(path)), [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = parse_line(line, where, folder)
                load_image(record.image, max_pixels).close()
                records.append(record)
            except BadSample as e:
                problems.append(e)
            except (FileNotFoundError, ValueError) as e:  # load_image's messages say what to fix
                problems.append(BadSample(where, str(e)))
    return records, problems


def first_problem(problems: list) -> BadSample:
    """The first of a list of bad samples, its message saying how many more there are and how to skip them."""
    first, more = problems[0], len(problems) - 1
    others = f"{more} more bad sample(s) after it; " if more else ""
    return BadSample(first.where, f"{first.problem} ({others}--skip-bad leaves bad samples out and lists them in skipped.jsonl)")


def is_shards(spec: str) -> bool:
    return os.fspath(spec).endswith(".tar")


def shard_paths(spec: str) -> list:
    """The tar files of a brace pattern ('shards/{000000..000009}.tar'), each checked to exist."""
    from webdataset.shardlists import expand_urls

    paths = expand_urls(os.fspath(spec))
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"shard not found: {p} (from {spec}); check the pattern, e.g. 'shards/{{000000..000009}}.tar'")
    return paths


def split(records: list, fraction: float) -> tuple:
    """(train, held-out) records: `fraction` of the distinct images, chosen with a fixed seed.

    The seed is a constant, not --seed, so every run on the same file holds out the same images; lines that
    name the same image fall on the same side, so no held-out image is ever trained on.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {fraction}")
    images = sorted({r.image for r in records})
    held = set(random.Random("nxtp-val-split").sample(images, round(fraction * len(images))))
    train = [r for r in records if r.image not in held]
    val = [r for r in records if r.image in held]
    if not val:
        raise ValueError(f"--val-fraction {fraction} of {len(images)} images holds out none: raise it or give --val")
    if not train:
        raise ValueError(f"--val-fraction {fraction} of {len(images)} images leaves nothing to train on: lower it")
    return train, val


def train_tokenizer(path, label_lists: list, prompts: tuple) -> None:
    """A SentencePiece model for these labels with the demo tokenizer's conventions, written to `path`.

    As scenes.train_tokenizer: BPE, LLaMA's ids (unk 0, bos 1, eos 2, no pad), "," its own piece (the
    delimiter), and room for every word to become one piece (capped at LLaMA's 32000), trained on the
    sentences the model will read: a prompt, then an image's labels.
    """
    import sentencepiece as spm

    sentences = [f"{prompts[i % len(prompts)]} " + ", ".join(labels) for i, labels in enumerate(label_lists)]
    words = {w for text in (*prompts, *(l for ls in label_lists for l in ls)) for w in text.lower().split()}
    chars = {c for text in (*prompts, *words) for c in text}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences + list(prompts)), model_writer=model, model_type="bpe",
        vocab_size=min(32000, len(chars) + 4 + sum(len(w) for w in words)), hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=[","],
        character_coverage=1.0, normalization_rule_name="identity", num_threads=1, minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())


class _Member(io.BytesIO):
    """A tar member's bytes that print as 'shard.tar/key.jpg', so load_image's messages name the sample."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __str__(self):
        return self.label


def shard_labels(sample: dict, where: str) -> list:
    """The cleaned labels of a webdataset sample: `.json` "labels", else `.txt` or `.cls`, one per line."""
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSample(where, f"its .json is not JSON ({e}); write {{\"labels\": [...]}}") from None
        if isinstance(meta, dict) and "labels" in meta:
            return clean_labels(meta["labels"], where)
    for ext in ("txt", "cls"):
        if ext in sample:
            return clean_labels([x for x in sample[ext].decode("utf-8").splitlines() if x.strip()], where)
    raise BadSample(where, 'no labels: add a .json with "labels", or a .txt or .cls with one label per line')


def shard_image(sample: dict, where: str, max_pixels):
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample(where, f"no image file: add one with an extension of {', '.join(IMAGE_EXTENSIONS)}")
    return load_image(_Member(sample[ext], f"{sample['__url__']}/{sample['__key__']}.{ext}"), max_pixels)


def read_shards(paths: list, max_pixels=None):
    """(where, image loader, labels) for every sample of the tar files, in order; a BadSample instead of
    a sample that cannot be used. The loader decodes on call, so a count of labels never decodes images."""
    import webdataset as wds

    # the shard list is already this reader's share: webdataset must not split or shuffle it again
    for sample in wds.WebDataset(paths, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False):
        where = f"{sample['__url__']} sample {sample['__key__']}"
        try:
            yield where, (lambda s=sample, w=where: shard_image(s, w, max_pixels)), shard_labels(sample, where)
        except BadSample as e:
            yield e


def read_records(records: list, max_pixels=None):
    """The same stream as read_shards for JSON-lines records."""
    for r in records:
        yield r.where, (lambda r=r: load_image(r.image, max_pixels)), r.labels


def label_lists(source, limit: int = 100_000) -> list:
    """The label lists of the first `limit` usable samples (records, or a shard pattern's tar files)."""
    if isinstance(source, list):
        return [r.labels for r in source[:limit]]
    items = (x for x in read_shards(shard_paths(source)) if not isinstance(x, BadSample))
    return [labels for _, _, labels in itertools.islice(items, limit)]


def _shuffled(items, size: int, rng: random.Random):
    """A shuffle buffer: keep `size` items, emit a random one as each new one arrives."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class Stream(torch.utils.data.IterableDataset):
    """Batches of (pixels [B, 3, S, S], label lists) from JSON-lines records or a shard pattern.

    Each item is a dict: "pixels", "labels", and "skipped" (BadSample rows met since the last batch), or,
    when `skip_bad` is off, "error": the first bad sample met, for the main process to report.
    repeat=True streams forever (training: rank `rank` of `world`, resuming after `start` batches);
    repeat=False is one pass in order with a last short batch (evaluation).
    """

    def __init__(self, source, size: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 start: int = 0, repeat: bool = True, shuffle: int = SHUFFLE_BUFFER, max_pixels=None,
                 skip_bad: bool = False):
        super().__init__()
        self.units = source if isinstance(source, list) else shard_paths(source)
        self.shards = not isinstance(source, list)
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.start, self.repeat, self.shuffle, self.max_pixels, self.skip_bad = start, repeat, shuffle, max_pixels, skip_bad

    def check_readers(self, workers: int) -> None:
        """A one-line error if some reader (rank x worker) would get no shard or record at all."""
        readers = self.world * max(1, workers)
        if self.repeat and len(self.units) < readers:
            what = "shards" if self.shards else "samples"
            raise ValueError(f"{len(self.units)} {what} cannot feed {readers} readers ({self.world} process(es) x "
                             f"{max(1, workers)} worker(s)): write more, smaller shards or pass fewer --workers")

    def _samples(self, reader: int, readers: int):
        rng = random.Random(f"{self.seed}-reader-{reader}")
        for epoch in itertools.count() if self.repeat else (0,):
            units = list(self.units)
            if epoch:
                random.Random(f"{self.seed}-epoch-{epoch}").shuffle(units)  # the same order on every reader
            mine = units[reader::readers]
            samples = read_shards(mine, self.max_pixels) if self.shards else read_records(mine, self.max_pixels)
            # one buffer per pass, so a data set smaller than the buffer never repeats an image in a batch
            yield from _shuffled(samples, self.shuffle, rng) if self.shuffle else samples

    def _batches(self, reader: int, readers: int, skip: int = 0):
        """This reader's batches after its first `skip` ones, which are only counted. Without --skip-bad the
        skipped images need no decoding: they were all good when the first run read them (it would have
        stopped otherwise); with it, only decoding tells which of them that run left out."""
        pixels, labels, skipped, done = [], [], [], 0
        for item in self._samples(reader, readers):
            try:
                if isinstance(item, BadSample):
                    raise item
                where, image, item_labels = item
                if done >= skip or self.skip_bad:
                    try:
                        pixels.append(preprocess(image(), self.size))
                    except (FileNotFoundError, ValueError) as e:
                        raise BadSample(where, str(e)) from None
                labels.append(item_labels)
            except BadSample as e:
                if not self.skip_bad:
                    yield {"error": e}
                    return
                skipped.append(e.row())
                continue
            if len(labels) == self.batch_size:
                if done >= skip:
                    yield {"pixels": torch.stack(pixels), "labels": labels, "skipped": skipped}
                pixels, labels, skipped, done = [], [], [], done + 1
        if labels or skipped:
            yield {"pixels": torch.stack(pixels) if pixels else None, "labels": labels, "skipped": skipped}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # The DataLoader takes batches from its workers in turn, starting with worker 0: after `start`
        # batches, this worker plays the part of worker (worker + start) % workers of the first run, and
        # skips the batches that one had already given.
        role = (worker + self.start) % workers
        yield from self._batches(self.rank * workers + role, self.world * workers,
                                 skip=(self.start - role + workers - 1) // workers)


def loader(stream: Stream, workers: int):
    """A DataLoader over a Stream's ready-made batches, its workers decoding ahead of the model."""
    stream.check_readers(workers)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
