"""Corpora through Hugging Face `datasets`, split deterministically by document.

A corpus is named by one string: a built-in name (`shakespeare`, `austen`; see
hybrid.corpora), a local file or folder (`.txt`, `.json`/`.jsonl`, `.parquet`), or
`hub:NAME` for a hub data set (only then is anything fetched from a hub). Documents are
deduplicated, ordered by content hash and the validation split is taken from the front of
that order, so the split depends on the content alone: two runs or two workers always agree,
and `Corpus.content_hash` records it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybrid.corpora import BUILTIN_CORPORA, builtin_corpus_file, cache_dir

HUB_PREFIX = "hub:"
LOCAL_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


class CorpusError(ValueError):
    """A corpus that cannot be used, named with what is wrong; raised before training."""


@dataclass(frozen=True)
class CorpusSpec:
    """source: built-in name, local path or `hub:NAME`. text_field: column holding the text
    (json, parquet, hub). hub_config / hub_split / streaming: passed to `load_dataset`;
    streaming needs max_documents. val_fraction: share of characters held out."""

    source: str
    text_field: str = "text"
    hub_config: str | None = None
    hub_split: str = "train"
    streaming: bool = False
    max_documents: int | None = None
    val_fraction: float = 0.05

    @classmethod
    def from_settings(cls, settings: Any) -> CorpusSpec:
        """From anything holding `corpus` and the other fields as attributes: the CLI's
        arguments, the search file's `data` section."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
        return cls(settings.corpus, **{n: getattr(settings, n) for n in names})

    def __post_init__(self) -> None:
        if not self.source.strip() or self.source.strip() == HUB_PREFIX:
            raise CorpusError(
                f"corpus={self.source!r} is invalid; allowed: a built-in name, a local file or "
                "folder, or hub:NAME"
            )
        hub_only = {"hub_config": None, "hub_split": "train", "streaming": False}
        for name, default in hub_only.items():  # they would be ignored: refuse them
            if getattr(self, name) != default and not self.source.startswith(HUB_PREFIX):
                raise CorpusError(
                    f"{name}={getattr(self, name)!r} is invalid for corpus {self.source!r}; "
                    f"allowed: only with a {HUB_PREFIX}NAME corpus"
                )
        if not 0 < self.val_fraction < 1:
            raise CorpusError(f"val_fraction={self.val_fraction!r} is invalid; allowed: 0 < x < 1")
        if self.max_documents is not None and self.max_documents < 2:
            raise CorpusError(
                f"max_documents={self.max_documents!r} is invalid; allowed: >= 2 (a train and "
                "a validation document)"
            )


@dataclass(frozen=True)
class Corpus:
    name: str
    train: list[str] = field(repr=False)
    val: list[str] = field(repr=False)
    content_hash: str

    @property
    def train_chars(self) -> int:
        return sum(len(d) for d in self.train)

    @property
    def val_chars(self) -> int:
        return sum(len(d) for d in self.val)


def load_corpus(spec: CorpusSpec) -> Corpus:
    """Load, clean and split the documents of `spec`."""
    return split_documents(spec.source, load_documents(spec), spec.val_fraction)


def load_documents(spec: CorpusSpec) -> list[str]:
    """Every document's text, through `datasets`."""
    source = spec.source
    if source in BUILTIN_CORPORA:
        texts = _dataset_texts("json", [builtin_corpus_file(source)], "text", source)
    elif source.startswith(HUB_PREFIX):
        texts = _hub_texts(spec)
    else:
        texts = _local_texts(Path(source).expanduser(), spec.text_field)
    if spec.max_documents is not None:
        texts = texts[: spec.max_documents]
    docs = [t for t in texts if t and t.strip()]
    if not docs:
        raise CorpusError(f"corpus {source!r} has no non-empty documents")
    return docs


def _dataset_texts(
    builder: str, files: list[Path], text_field: str, name: str, **kwargs
) -> list[str]:
    import datasets

    dataset = datasets.load_dataset(
        builder,
        data_files=[str(f) for f in files],
        split="train",
        cache_dir=str(cache_dir() / "datasets"),
        **kwargs,
    )
    return _column(dataset, text_field, name)


def _column(dataset, text_field: str, name: str) -> list[str]:
    columns = dataset.column_names or []
    if text_field not in columns:
        raise CorpusError(
            f"text_field={text_field!r} is not a column of corpus {name!r}; allowed: {columns}"
        )
    return list(dataset[text_field])


def _local_texts(path: Path, text_field: str) -> list[str]:
    if not path.exists():
        raise CorpusError(
            f"corpus {str(path)!r}: no such file or folder; allowed: a local file or folder, "
            f"a built-in corpus {sorted(BUILTIN_CORPORA)}, or {HUB_PREFIX}NAME"
        )
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [f for f in files if f.suffix.lower() in LOCAL_FORMATS]
    formats = {LOCAL_FORMATS[f.suffix.lower()] for f in files}
    if len(formats) != 1:
        found = sorted(formats) or "none"
        raise CorpusError(
            f"corpus {str(path)!r}: found formats {found}; allowed: files of exactly one "
            f"format among {sorted(LOCAL_FORMATS)}"
        )
    builder = formats.pop()
    files = [f for f in files if f.stat().st_size > 0]  # `datasets` cannot read an empty file
    if not files:
        return []
    if builder == "text":
        # several files: one document per file; a single file: one per blank-line paragraph
        sample_by = "document" if len(files) > 1 else "paragraph"
        return _dataset_texts("text", files, "text", str(path), sample_by=sample_by)
    return _dataset_texts(builder, files, text_field, str(path))


def _hub_texts(spec: CorpusSpec) -> list[str]:
    name = spec.source[len(HUB_PREFIX) :]
    offline = [
        v
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
    ]
    if offline:
        raise CorpusError(
            f"corpus {spec.source!r} is a hub data set, but the hub is offline ({offline[0]} is "
            f"set); allowed offline: local files or {sorted(BUILTIN_CORPORA)}"
        )
    if spec.streaming and spec.max_documents is None:
        raise CorpusError(f"corpus {spec.source!r}: streaming needs max_documents")
    import datasets

    try:
        dataset = datasets.load_dataset(
            name,
            spec.hub_config,
            split=spec.hub_split,
            streaming=spec.streaming,
            cache_dir=str(cache_dir() / "datasets"),
        )
    except Exception as error:  # datasets raises many types for unreachable or unknown sets
        raise CorpusError(f"corpus {spec.source!r} could not be loaded: {error}") from error
    if spec.streaming:
        dataset = dataset.take(spec.max_documents)
        first = next(iter(dataset), {})
        if spec.text_field not in first:
            raise CorpusError(
                f"text_field={spec.text_field!r} is not a column of corpus {spec.source!r}; "
                f"allowed: {sorted(first)}"
            )
        return [row[spec.text_field] for row in dataset]
    return _column(dataset, spec.text_field, spec.source)


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def split_documents(name: str, docs: list[str], val_fraction: float) -> Corpus:
    """Deduplicate, order by content hash, and hold out documents from the front of that
    order until they reach `val_fraction` of the characters (at least one each side)."""
    by_hash = dict(sorted((hashlib.sha256(d.encode()).hexdigest(), d) for d in docs))
    if len(by_hash) < 2:
        raise CorpusError(
            f"corpus {name!r} has {len(by_hash)} distinct document(s); allowed: at least 2 "
            "(a train and a validation document)"
        )
    hashes = list(by_hash)
    target = val_fraction * sum(len(d) for d in by_hash.values())
    n_val, held = 0, 0
    while n_val < len(hashes) - 1 and (n_val == 0 or held < target):
        held += len(by_hash[hashes[n_val]])
        n_val += 1
    val, train = hashes[:n_val], hashes[n_val:]
    return Corpus(
        name=name,
        train=[by_hash[h] for h in train],
        val=[by_hash[h] for h in val],
        content_hash=_digest(["train", *train, "val", *val]),
    )
