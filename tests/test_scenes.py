"""Synthetic scenes and the demo tokenizer: deterministic, every kind drawn, LLaMA's conventions."""

import numpy as np
import pytest
import torch

from conftest import REPO
from nxtp_minimal import Tokenizer, preprocess, prompt
from nxtp_minimal.config import PROMPT
from nxtp_minimal.training.scenes import KINDS, LABELS, MAX_OBJECTS, Scenes, batches, scene, train_tokenizer


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "demo_tokenizer.model"
    train_tokenizer(path)
    return Tokenizer(path)


def test_vocabulary():
    assert len(KINDS) >= 12 and LABELS == tuple(KINDS)
    assert sum(" " in label for label in LABELS) >= 3
    assert all(label == label.lower() for label in LABELS)


def test_same_seed_same_scene():
    a, la = scene(5, 17)
    b, lb = scene(5, 17)
    assert la == lb and np.array_equal(np.asarray(a), np.asarray(b))
    c, _ = scene(6, 17)
    d, _ = scene(5, 18)
    assert not np.array_equal(np.asarray(a), np.asarray(c)) and not np.array_equal(np.asarray(a), np.asarray(d))


def test_scenes_cover_every_kind():
    counts = dict.fromkeys(LABELS, 0)
    sizes = set()
    for i in range(300):
        image, labels = scene(0, i)
        assert image.size == (64, 64) and image.mode == "RGB"
        assert 1 <= len(labels) <= MAX_OBJECTS and len(set(labels)) == len(labels)
        sizes.add(len(labels))
        for label in labels:
            counts[label] += 1
    assert sizes == set(range(1, MAX_OBJECTS + 1))
    assert min(counts.values()) > 20, counts  # every kind is drawn, none is rare


def test_layout_does_not_depend_on_size():
    # a large rendering of a scene, preprocessed down, is the same picture (README example images)
    small, labels = scene(3, 4, 64)
    large, labels_large = scene(3, 4, 256)
    assert labels == labels_large
    diff = (preprocess(large, 64) - preprocess(small, 64)).abs().mean()
    assert diff < 0.1, diff


def test_dataset_and_batches():
    data = Scenes(2, 10)
    pixels, labels = data[3]
    image, expected = scene(2, 3)
    assert labels == expected and torch.equal(pixels, preprocess(image, 64))
    with pytest.raises(IndexError):
        data[10]
    x, ls = next(batches(2, 4))
    assert x.shape == (4, 3, 64, 64) and ls[3] == expected
    assert torch.equal(next(batches(2, 4, start=3))[0][0], pixels)


def test_tokenizer_conventions(demo_tokenizer):
    tok = demo_tokenizer
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.sp.id_to_piece(tok.delimiter_id) == "," and tok.sp.id_to_piece(tok.answer_id) == "\u2581are"
    assert tok.n_words == tok.sp.vocab_size() + 2
    ids = tok.encode("<|image|>" + PROMPT, bos=True)
    assert ids[0] == tok.bos_id and ids[1] == tok.n_words - 2 and ids[-1] == tok.answer_id
    assert prompt.inference_ids(tok, PROMPT)[:2] == [tok.n_words - 2, tok.bos_id]


def test_labels_tokenize(demo_tokenizer):
    tok = demo_tokenizer
    for label in LABELS:
        pieces = tok.sp.encode(label)
        assert 0 not in pieces, label  # no unknown pieces
        assert len(pieces) == len(label.split()), label  # one piece per word
        assert tok.decode(pieces) == label
    text = "<|image|>" + PROMPT + " hot dog, sun, ice cream"
    ids = tok.encode(text, bos=True, eos=True)
    assert tok.decode(ids[1:-1]) == text and ids.count(tok.delimiter_id) == 2


def test_shipped_tokenizer_is_reproducible(tmp_path):
    shipped = REPO / "weights" / "demo_tokenizer.model"
    if not shipped.is_file():
        pytest.skip("weights/demo_tokenizer.model not built yet")
    train_tokenizer(tmp_path / "t.model")
    assert (tmp_path / "t.model").read_bytes() == shipped.read_bytes()
