"""Text to ids and back: SentencePiece plus NXTP's special tokens, as the official wrapper does it."""

import os

from sentencepiece import SentencePieceProcessor

from .config import SPECIAL_TOKENS


class Tokenizer:
    """LLaMA's SentencePiece model with `special_tokens` appended after the base vocabulary.

    Special tokens are matched as literal text first; the text between them is encoded by
    SentencePiece piece by piece (official `Tokenizer.encode`). pad is -1, so a padded id selects
    the last embedding row, `<|empty|>`.
    """

    def __init__(self, model_path, special_tokens=SPECIAL_TOKENS):
        model_path = os.fspath(model_path)
        if not os.path.exists(model_path):
            raise FileNotFoundError(
                f"tokenizer file not found: {model_path}. Pass the SentencePiece model (LLaMA's tokenizer.model, "
                "see weights/README.md) or leave it out to use the demo model's."
            )
        try:
            self.sp = SentencePieceProcessor(model_file=model_path)
        except Exception as e:
            raise ValueError(f"{model_path} is not a SentencePiece model ({e})") from None
        self.path = model_path
        self.n_base = self.sp.vocab_size()
        self.special_ids = {t: self.n_base + i for i, t in enumerate(special_tokens)}
        self.special_tokens = {i: t for t, i in self.special_ids.items()}
        self.n_words = self.n_base + len(special_tokens)
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        # The delimiter between labels and the last prompt word; the decoder's sampling and
        # masks look for these ids (official code hard-codes 29892 and 526 for LLaMA).
        self.delimiter_id = self.piece_id(",")
        self.answer_id = self.piece_id("\u2581are")

    def piece_id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
            raise ValueError(f"the tokenizer {self.path} has no piece {piece!r}, which NXTP's prompt needs")
        return i

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list:
        ids, i = [], 0
        while i < len(text):
            # the earliest special token from here; the text before it goes to SentencePiece
            hits = [(text.find(t, i), t) for t in self.special_ids if text.find(t, i) >= 0]
            if not hits:
                break
            j, token = min(hits)
            ids += self.sp.encode(text[i:j]) + [self.special_ids[token]]
            i = j + len(token)
        ids += self.sp.encode(text[i:])
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        parts, run = [], []
        for i in ids:
            if i in self.special_tokens:
                parts += [self.sp.decode(run), self.special_tokens[i]]
                run = []
            else:
                run.append(i)
        return "".join(parts + [self.sp.decode(run)])
