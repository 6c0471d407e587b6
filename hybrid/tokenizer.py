"""Tokenizers: raw bytes (vocab 256, the default, nothing to train) and a byte-level BPE
trained on a corpus' training split with the `tokenizers` library, cached by corpus hash and
vocab size. Each reports the UTF-8 bytes every token stands for, so bits per byte can be
computed exactly for any tokenizer."""

from __future__ import annotations

import tempfile
from functools import cached_property
from pathlib import Path

import numpy as np

from hybrid.corpora import cache_dir
from hybrid.data import Corpus


class ByteTokenizer:
    """UTF-8 bytes as tokens."""

    name = "bytes"
    vocab_size = 256

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    @cached_property
    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)


def _byte_alphabet() -> dict[str, int]:
    """The printable stand-in character of every byte used by byte-level BPE vocabularies:
    printable Latin-1 bytes stand for themselves, the rest map to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


class BPETokenizer:
    """Byte-level BPE (no special tokens); `path` is its saved `tokenizers` JSON."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.path = path
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.name = path.stem.split("-")[0]  # bpeVOCAB; the corpus hash keys the caches

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    @cached_property
    def token_bytes(self) -> np.ndarray:
        alphabet = _byte_alphabet()
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, index in self._tok.get_vocab().items():
            if not all(c in alphabet for c in token):
                raise ValueError(f"{self.path} is not a byte-level BPE: token {token!r}")
            lengths[index] = len(token)  # one stand-in character per byte
        return lengths


def check_tokenizer_spec(spec: str) -> None:
    """Raise ValueError unless `spec` names a tokenizer `get_tokenizer` can build: `bytes`
    or `bpe:VOCAB` with 256 < VOCAB <= 65536 (checked before any corpus is read)."""
    if spec == "bytes":
        return
    kind, _, size = spec.partition(":")
    if kind != "bpe" or not size.isdigit():
        raise ValueError(f"tokenizer={spec!r} is invalid; allowed: 'bytes' or 'bpe:VOCAB'")
    if not 256 < int(size) <= 65536:
        raise ValueError(f"tokenizer={spec!r} is invalid; allowed: bpe:VOCAB, 256 < VOCAB <= 65536")


def train_bpe(corpus: Corpus, vocab_size: int) -> BPETokenizer:
    """Train (or load from the cache) a byte-level BPE on `corpus.train`."""
    check_tokenizer_spec(f"bpe:{vocab_size}")
    target = cache_dir() / "tokenizers" / f"bpe{vocab_size}-{corpus.content_hash[:16]}.json"
    if not target.is_file():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus.train, trainer)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".json", delete=False) as f:
            tok.save(f.name)
        Path(f.name).replace(target)
    return BPETokenizer(target)


def get_tokenizer(spec: str, corpus: Corpus) -> ByteTokenizer | BPETokenizer:
    """`bytes` (default) or `bpe:VOCAB`, e.g. `bpe:4096`."""
    check_tokenizer_spec(spec)
    if spec == "bytes":
        return ByteTokenizer()
    return train_bpe(corpus, int(spec.partition(":")[2]))
