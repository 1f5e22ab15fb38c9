"""A small offline word-level tokenizer for synthetic text (no downloads, no merges to learn).

Text is split into words with their leading space (" hello"), single digits (" 4", "2": every number is spelled
digit by digit, so a 6-digit secret is 6 tokens whatever its value), punctuation and newlines. Decoding joins the
tokens, so ``decode(encode(text)) == text`` for any text whose pieces are all in the vocabulary; pieces that are
not become ``<unk>``.

**Build the vocabulary from public text** (templates, name lists, a public corpus), not from the private training
data: a vocabulary learnt from private data is itself a release about it (it lists every rare word, such as a
user's name, that occurs in it) and is not covered by DP-SGD's guarantee.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

#: Words with their leading space, single digits (with or without a leading space), punctuation, newlines.
TOKEN_PATTERN = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\n|\s")

PAD, EOS, UNK = "<pad>", "<|endoftext|>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)


def split_text(text: str) -> list[str]:
    """The pieces of ``text`` (their concatenation is ``text``)."""
    return TOKEN_PATTERN.findall(text)


class SimpleTokenizer:
    """Word-level tokenizer: ids 0, 1, 2 are ``<pad>``, ``<|endoftext|>`` (begins and ends every document, as in
    GPT-2) and ``<unk>``; then the 20 digit pieces and the vocabulary's pieces."""

    def __init__(self, pieces: Sequence[str]) -> None:
        vocab = list(SPECIAL_TOKENS)
        seen = set(vocab)
        for piece in pieces:
            if piece not in seen:
                seen.add(piece)
                vocab.append(piece)
        self.vocab = vocab
        self.ids = {piece: i for i, piece in enumerate(vocab)}
        self.pad_token_id = self.ids[PAD]
        self.eos_token_id = self.ids[EOS]
        self.bos_token_id = self.eos_token_id
        self.unk_token_id = self.ids[UNK]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "SimpleTokenizer":
        """A tokenizer whose vocabulary is every piece of ``texts`` (public text!) plus all digits, in first-seen
        order."""
        digits = [d for d in "0123456789"] + [f" {d}" for d in "0123456789"]
        pieces = list(digits)
        for text in texts:
            pieces.extend(split_text(text))
        return cls(pieces)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, starting with ``<|endoftext|>`` when ``add_special_tokens`` (the model's
        beginning-of-document context) and ending with it when ``add_eos``."""
        ids = [self.ids.get(piece, self.unk_token_id) for piece in split_text(text)]
        if add_special_tokens:
            ids = [self.bos_token_id, *ids]
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        special = {self.pad_token_id, self.eos_token_id} if skip_special_tokens else set()
        return "".join(self.vocab[int(i)] for i in ids if int(i) not in special)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``dptrain_tokenizer.json`` into ``directory`` (next to a model's ``save_pretrained`` files)."""
        path = Path(directory) / "dptrain_tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"type": "dptrain.SimpleTokenizer", "vocab": self.vocab}))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "SimpleTokenizer":
        path = Path(directory)
        if path.is_dir():
            path = path / "dptrain_tokenizer.json"
        data = json.loads(path.read_text())
        if data.get("type") != "dptrain.SimpleTokenizer" or list(data["vocab"][:3]) != list(SPECIAL_TOKENS):
            raise ValueError(f"{path} is not a dptrain SimpleTokenizer file")
        return cls(data["vocab"][3:])
