"""Corpora of every source kind, the deterministic split, tokenizers and the token cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hybrid.data import CorpusError, CorpusSpec, load_corpus, load_documents, split_documents
from hybrid.token_cache import prepare_data, tokenize, train_batch, validation_windows
from hybrid.tokenizer import ByteTokenizer, get_tokenizer

PLAYS = {
    "a.txt": "First document, with words.\n\nA second paragraph of it.",
    "b.txt": "Second document: something else entirely.",
    "c.txt": "Third one, ünïcödé included — to check bytes.",
}


@pytest.fixture
def text_folder(tmp_path):
    folder = tmp_path / "plays"
    folder.mkdir()
    for name, text in PLAYS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_text_folder_is_one_document_per_file(text_folder):
    assert sorted(load_documents(CorpusSpec(str(text_folder)))) == sorted(PLAYS.values())


def test_single_text_file_is_split_into_paragraphs(text_folder):
    docs = load_documents(CorpusSpec(str(text_folder / "a.txt")))
    assert docs == ["First document, with words.", "A second paragraph of it."]


def test_jsonl_json_and_parquet_with_a_text_field(tmp_path):
    rows = [{"body": f"document number {i} " * 3, "id": i} for i in range(5)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    as_json = tmp_path / "docs.json"
    as_json.write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    expected = [r["body"] for r in rows]
    for path in (jsonl, as_json, parquet):
        assert load_documents(CorpusSpec(str(path), text_field="body")) == expected


@pytest.mark.parametrize(
    ("make", "field", "message"),
    [
        (lambda p: p / "missing.txt", "text", "no such file or folder"),
        (
            lambda p: (p / "empty.txt").write_text("\n\n  \n") and p / "empty.txt",
            "text",
            "no non-empty documents",
        ),
        (
            lambda p: (p / "d.jsonl").write_text('{"body": "x"}\n') and p / "d.jsonl",
            "text",
            "text_field='text' is not a column",
        ),
        (lambda p: (p / "notes.md").write_text("x") and p, "text", "found formats none"),
    ],
    ids=["missing", "empty", "no-field", "no-known-format"],
)
def test_bad_corpora_are_named(tmp_path, make, field, message):
    with pytest.raises(CorpusError, match=message):
        load_documents(CorpusSpec(str(make(tmp_path)), text_field=field))


def test_hub_name_while_offline_is_refused_before_any_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match=r"hub is offline \(HF_HUB_OFFLINE"):
        load_documents(CorpusSpec("hub:HuggingFaceFW/fineweb-edu"))


def test_split_is_by_document_and_ignores_input_order():
    docs = [f"doc {i} " + "x" * (10 + i) for i in range(40)]
    a = split_documents("c", docs, 0.1)
    b = split_documents("c", list(reversed(docs)) + docs[:3], 0.1)  # shuffled, duplicated
    assert a.content_hash == b.content_hash and a.val == b.val and a.train == b.train
    assert set(a.val).isdisjoint(a.train) and set(a.val) | set(a.train) == set(docs)
    assert 0.1 * sum(map(len, docs)) <= a.val_chars < 0.1 * sum(map(len, docs)) + 60
    with pytest.raises(CorpusError, match="at least 2"):
        split_documents("c", ["one", "one"], 0.1)


def test_split_agrees_across_processes(text_folder):
    script = textwrap.dedent(f"""
        from hybrid.data import CorpusSpec, load_corpus
        c = load_corpus(CorpusSpec({str(text_folder)!r}, val_fraction=0.3))
        print(c.content_hash, len(c.val))
    """)
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert (
        outputs.pop().split()[0]
        == load_corpus(CorpusSpec(str(text_folder), val_fraction=0.3)).content_hash
    )


def test_token_cache_is_reused_without_tokenizing(text_folder, monkeypatch):
    corpus = load_corpus(CorpusSpec(str(text_folder), val_fraction=0.3))
    first = tokenize(corpus, ByteTokenizer())
    expected_val = "\n\n".join(corpus.val).encode()
    assert bytes(np.asarray(first.val, dtype=np.uint8)) == expected_val

    def refuse(*_):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(ByteTokenizer, "encode_batch", refuse)
    second = tokenize(corpus, ByteTokenizer())
    assert second.directory == first.directory
    assert np.array_equal(second.train, first.train)


def test_bpe_is_trained_cached_and_counts_bytes_exactly(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "naïve", "über"]
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, 200)) for _ in range(12)]
    corpus = split_documents("words", docs, 0.2)
    tok = get_tokenizer("bpe:300", corpus)
    assert 256 < tok.vocab_size <= 300 and tok.name == "bpe300"  # merges can run out
    for text in corpus.val:
        ids = tok.encode_batch([text])[0]
        assert tok.decode(ids) == text
        assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))
        assert len(ids) < len(text.encode()) / 2  # it really merges
    again = get_tokenizer("bpe:300", corpus)
    assert again.path == tok.path
    with pytest.raises(ValueError, match="tokenizer='wordpiece'"):
        get_tokenizer("wordpiece", corpus)


def test_batches_and_validation_windows(text_folder):
    data = prepare_data(CorpusSpec(str(text_folder), val_fraction=0.3))
    x, y = train_batch(data.train, 4, 8, seed=3, step=7)
    assert x.shape == (4, 8) and bool((x[:, 1:] == y[:, :-1]).all())
    x2, _ = train_batch(data.train, 4, 8, seed=3, step=7)
    assert bool((x == x2).all())
    windows = validation_windows(data.val, 5, max_tokens=1000)
    flat = np.asarray(data.val)
    n = windows.shape[0]
    assert np.array_equal(windows[:, 1:].reshape(-1).numpy(), flat[1 : n * 5 + 1])
    with pytest.raises(ValueError, match="longer than the validation split"):
        validation_windows(data.val, len(data.val), 1000, "plays")


def test_builtin_shakespeare():
    docs = load_documents(CorpusSpec("shakespeare"))
    assert len(docs) == 42
    assert any("To be, or not to be" in d for d in docs)
    assert sum(map(len, docs)) > 5_000_000


def test_builtin_austen():
    docs = load_documents(CorpusSpec("austen"))
    assert len(docs) == 269  # chapters of the six novels
    assert any("It is a truth universally acknowledged" in d for d in docs)
    assert sum(map(len, docs)) > 3_900_000


def test_relative_cache_dir_is_made_absolute(tmp_path, monkeypatch):
    # the corpus fetches run pip in their own working directory: a relative HYBRID_CACHE
    # (the README's `HYBRID_CACHE=.data`) must not be resolved against that one
    from hybrid.corpora import cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYBRID_CACHE", ".data")
    assert cache_dir() == tmp_path / ".data"
