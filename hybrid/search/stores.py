"""Checks of the two store addresses a search file names (`search.storage`, `tracking.uri`),
made when the file is read: a typo there otherwise surfaces as a storage or MLflow traceback
after a study was created, or after minutes of retries."""

from __future__ import annotations

from pathlib import Path

STORAGE_SCHEMES = ("journal:PATH", "sqlite:///PATH", "postgresql://...")
TRACKING_SCHEMES = ("sqlite:///PATH", "postgresql://...", "mysql://...", "a folder or file:PATH",
                    "http(s)://HOST:PORT (a tracking server)")  # fmt: skip


def check_storage(url: str) -> None:
    """Raise ValueError unless `url` is an Optuna storage this project opens, in a folder that
    exists where it is a local file."""
    if url.startswith("journal:"):
        _check_folder(url, url.removeprefix("journal:"))
    elif url.startswith("sqlite:///"):
        _check_folder(url, url.removeprefix("sqlite:///"))
    elif not url.startswith(("postgresql://", "postgresql+", "mysql")):
        raise ValueError(f"{url!r} is invalid; allowed: {', '.join(STORAGE_SCHEMES)}")


def check_tracking_uri(uri: str) -> None:
    """Raise ValueError unless MLflow can keep runs at `uri` (a database URL, a local folder or
    `file:` URI, or a tracking server), in a folder that exists where it is a local database."""
    scheme, colon, _ = uri.partition(":")
    if not colon or len(scheme) == 1:  # a plain path (or a Windows drive): a file store
        return
    if uri.startswith("sqlite:///"):
        _check_folder(uri, uri.removeprefix("sqlite:///"))
        return
    if scheme.split("+")[0] in ("postgresql", "mysql", "mssql", "file", "http", "https"):
        return
    raise ValueError(f"{uri!r} is invalid; allowed: {', '.join(TRACKING_SCHEMES)}")


def _check_folder(url: str, path: str) -> None:
    if not path:
        raise ValueError(f"{url!r} names no file")
    folder = Path(path).expanduser().parent
    if not folder.is_dir():
        raise ValueError(f"{url!r}: folder {str(folder)!r} does not exist")
