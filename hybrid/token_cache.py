"""Tokenized corpora as memory-mapped arrays, keyed by (corpus hash, tokenizer), and the
batches drawn from them.

`$HYBRID_CACHE/tokens/<corpus hash>-<tokenizer>/{train,val}.bin` hold the documents' tokens
(in content-hash order, joined by the tokens of a blank line); `meta.json` is written last, so
an interrupted run leaves no cache that looks complete. Training windows are a pure function
of (seed, step), so a resumed run sees exactly the batches it would have seen; the
validation windows are the same for every run on the same corpus and tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hybrid.corpora import cache_dir
from hybrid.data import Corpus, CorpusSpec, load_corpus
from hybrid.tokenizer import BPETokenizer, ByteTokenizer, get_tokenizer

SEPARATOR = "\n\n"
ENCODE_BATCH = 64


@dataclass
class TokenData:
    corpus: Corpus
    tokenizer: ByteTokenizer | BPETokenizer
    train: np.ndarray  # memory-mapped token ids
    val: np.ndarray
    directory: Path

    @property
    def key(self) -> str:
        return self.directory.name


def _write_tokens(path: Path, docs: list[str], tokenizer, dtype, label: str) -> int:
    separator = tokenizer.encode_batch([SEPARATOR])[0].astype(dtype)
    count = 0
    with (
        path.open("wb") as out,
        tqdm(total=len(docs), desc=f"tokenizing {label}", unit="doc", leave=False) as bar,
    ):
        for start in range(0, len(docs), ENCODE_BATCH):
            chunk = docs[start : start + ENCODE_BATCH]
            for i, ids in enumerate(tokenizer.encode_batch(chunk)):
                if start + i:
                    separator.tofile(out)
                    count += len(separator)
                ids.astype(dtype).tofile(out)
                count += len(ids)
            bar.update(len(chunk))
    return count


def tokenize(corpus: Corpus, tokenizer) -> TokenData:
    """The corpus' token arrays, from the cache or written to it once."""
    directory = cache_dir() / "tokens" / f"{corpus.content_hash[:16]}-{tokenizer.name}"
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        work = Path(tempfile.mkdtemp(dir=directory.parent))
        try:
            counts = {
                split: _write_tokens(
                    work / f"{split}.bin",
                    getattr(corpus, split),
                    tokenizer,
                    dtype,
                    f"{corpus.name} {split}",
                )
                for split in ("train", "val")
            }
            meta = {
                "corpus": corpus.name,
                "content_hash": corpus.content_hash,
                "tokenizer": tokenizer.name,
                "vocab_size": tokenizer.vocab_size,
                "dtype": np.dtype(dtype).name,
                "tokens": counts,
            }
            (work / "meta.json").write_text(json.dumps(meta, indent=1))
            os.replace(work, directory)
        except OSError:
            if not meta_path.is_file():  # else another worker finished first: use its arrays
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    meta = json.loads(meta_path.read_text())
    arrays = {
        split: np.memmap(
            directory / f"{split}.bin",
            dtype=meta["dtype"],
            mode="r",
            shape=(meta["tokens"][split],),
        )
        for split in ("train", "val")
    }
    return TokenData(corpus, tokenizer, arrays["train"], arrays["val"], directory)


def prepare_data(spec: CorpusSpec, tokenizer: str = "bytes") -> TokenData:
    """Corpus -> split -> tokenizer -> cached token arrays: everything training reads."""
    corpus = load_corpus(spec)
    return tokenize(corpus, get_tokenizer(tokenizer, corpus))


def train_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows (inputs, next-token targets), a pure function of (seed, step)."""
    span = seq_len + 1
    if len(tokens) < span:
        raise ValueError(
            f"seq_len={seq_len} is longer than the training split ({len(tokens)} tokens)"
        )
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - span + 1, batch_size)
    windows = torch.from_numpy(np.stack([tokens[s : s + span] for s in starts]).astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def validation_windows(
    tokens: np.ndarray, seq_len: int, max_tokens: int, corpus_name: str = "corpus"
) -> torch.Tensor:
    """Consecutive (seq_len + 1)-token windows with stride seq_len, so every target token of
    the first `max_tokens` is scored exactly once: (n_windows, seq_len + 1)."""
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"seq_len={seq_len} is longer than the validation split of {corpus_name!r} "
            f"({len(tokens)} tokens); allowed: seq_len < {len(tokens)}"
        )
    n = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(tokens[: n * seq_len + 1])[index].astype(np.int64))
