"""Tokenizer against the official wrapper's ids (cases.json `tokenizer`); needs LLaMA's tokenizer.model."""

import pytest

from nxtp_minimal import Tokenizer


def test_official_cases(llama_tokenizer, cases):
    tc = cases["tokenizer"]
    assert (llama_tokenizer.n_words, llama_tokenizer.bos_id, llama_tokenizer.eos_id, llama_tokenizer.pad_id) == (
        tc["n_words"], tc["bos_id"], tc["eos_id"], tc["pad_id"],
    )
    for case in tc["cases"]:
        ids = llama_tokenizer.encode(case["text"], bos=case["bos"], eos=case["eos"])
        assert ids == case["ids"], case["text"]
        assert llama_tokenizer.decode(ids) == case["decoded"]


def test_delimiter_and_answer_ids(llama_tokenizer, cases):
    # the ids the official code hard-codes, here read from the tokenizer
    assert llama_tokenizer.delimiter_id == 29892
    assert llama_tokenizer.answer_id == 526


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found: .*nope.model"):
        Tokenizer(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        Tokenizer(junk)
