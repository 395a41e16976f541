"""Folders written whole or not at all: a temporary sibling, renamed into place when complete.

Every folder the library or the CLI writes (a saved SAE, activation shards, a report, a training
checkpoint) goes through :func:`atomic_dir`. An existing non-empty target is an error naming
``overwrite`` unless ``overwrite=True``; with it the old folder is replaced whole, never file by
file: it is renamed aside, the complete new one renamed into place, then the old one deleted. An
existing empty folder is simply replaced. An exception (or Ctrl-C) inside the block removes the
temporary folder and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "check_target", "partial_dir"]


def check_target(path: str | Path, overwrite: bool = False, what: str = "output") -> Path:
    """Raise if ``path`` cannot become a new folder: it exists and is not empty (without
    ``overwrite``), or it or a parent is a file. Returns the path. The CLI calls it before any
    work, so that the error comes first."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise FileExistsError(f"{what} {path} exists and is not a folder; choose another path")
        if not overwrite and any(path.iterdir()):
            raise FileExistsError(
                f"{what} {path} already exists; pass --overwrite (overwrite=True in Python) to "
                "replace it, or choose another path"
            )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{what} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise PermissionError(f"{what} {path}: cannot write in {parent}")
            break
    return path


def partial_dir(path: str | Path) -> Path:
    """The fixed temporary sibling ``.{name}.partial`` where resumable work (extract) collects."""
    path = Path(path)
    return path.parent / f".{path.name}.partial"


def _replace(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to ``path``, replacing an existing folder in one rename."""
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(
    path: str | Path, overwrite: bool = False, what: str = "output", tmp: Path | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``path``; on success rename it to ``path``.

    Args:
        path: the folder to create.
        overwrite: replace an existing ``path`` (whole); without it an existing one is an error.
        what: the word for the folder in error messages (e.g. "SAE folder").
        tmp: use this folder (created if missing, kept on failure) instead of a fresh temporary
            one: the resumable case, see :func:`partial_dir`.
    """
    path = check_target(path, overwrite, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = tmp is not None
    if tmp is None:
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True, exist_ok=keep)
    try:
        yield tmp
        check_target(path, overwrite, what)  # nobody created it meanwhile
        _replace(tmp, path)
    except BaseException:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
