"""Text corpora for `extract`, `train` and `sweep`: a text file, a folder of files, or a Hugging
Face dataset, tokenised as a stream.

:class:`Corpus` is re-iterable (every epoch reads the data again) and yields one token tensor per
piece of text, with the tokenizer's separator (its EOS token, else its SEP token) after the last
piece of every document; :class:`writesae.ModelSource` concatenates the pieces and cuts them into
fixed-length contexts, so documents are packed with the separator between them. Nothing holds
more than one piece (a jsonl record, a parquet row, about 1 MiB of a text file) at a time.

Documents:

* a ``.txt`` file (or any file that is not ``.jsonl`` / ``.parquet``): the whole file;
* a ``.jsonl`` file: the ``text_field`` of every line's JSON object;
* a ``.parquet`` file: the ``text_field`` column, one document per row (needs ``pyarrow``);
* a folder: every ``.txt``, ``.jsonl`` and ``.parquet`` file below it, in sorted path order;
* anything else: a Hugging Face dataset id, streamed with ``datasets.load_dataset(id,
  split=split, streaming=True)`` (needs ``datasets`` and a connection, or a local cache).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["Corpus", "documents", "SUFFIXES"]

logger = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".parquet")
_CHUNK = 1 << 20  # characters of a text file read at a time


def _text_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """A text file in pieces of about ``_CHUNK`` characters, cut after a newline."""
    with path.open(encoding="utf-8", errors="replace") as f:
        rest = ""
        while chunk := f.read(_CHUNK):
            rest += chunk
            cut = rest.rfind("\n") + 1
            if cut:
                yield rest[:cut], False
                rest = rest[cut:]
        yield rest, True


def _jsonl_pieces(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or field not in row:
                raise ValueError(f"{path}:{i + 1}: no field {field!r} (set text_field)")
            yield str(row[field]), True


def _parquet_pieces(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    f = pq.ParquetFile(path)
    if field not in f.schema_arrow.names:
        raise ValueError(f"{path}: no column {field!r}; columns: {f.schema_arrow.names}")
    for batch in f.iter_batches(columns=[field], batch_size=256):
        for text in batch.column(0).to_pylist():
            yield str(text), True


def _hf_pieces(name: str, field: str, split: str) -> Iterator[tuple[str, bool]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{name!r} is not a file or folder; streaming it as a Hugging Face dataset needs "
            "`datasets` (pip install datasets)"
        ) from None
    try:
        rows = datasets.load_dataset(name, split=split, streaming=True)
        it = iter(rows)
        first = next(it, None)
    except Exception as e:  # the datasets library raises many kinds for "cannot reach it"
        raise OSError(
            f"{name!r} is not a file or folder, and streaming it as a Hugging Face dataset "
            f"failed ({type(e).__name__}: {e}). Offline: pass a local .txt/.jsonl/.parquet "
            "file or folder instead"
        ) from None
    if first is not None:
        yield _row_text(first, field, name), True
    for row in it:
        yield _row_text(row, field, name), True


def _row_text(row: Any, field: str, name: str) -> str:
    if field not in row:
        raise ValueError(f"dataset {name!r}: rows have no field {field!r}; fields: {list(row)}")
    return str(row[field])


def documents(
    data: str | Path, text_field: str = "text", split: str = "train"
) -> Iterator[tuple[str, bool]]:
    """Pieces of text ``(piece, ends_document)`` of a file, folder or dataset (module doc)."""
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
    elif path.is_file():
        files = [path]
    elif path.exists() or str(data).startswith((".", "/")) or str(data).endswith(SUFFIXES):
        raise FileNotFoundError(f"{data}: not a file or folder")
    else:
        yield from _hf_pieces(str(data), text_field, split)
        return
    for f in files:
        if f.suffix == ".jsonl":
            yield from _jsonl_pieces(f, text_field)
        elif f.suffix == ".parquet":
            yield from _parquet_pieces(f, text_field)
        else:
            yield from _text_pieces(f)


def _separator(tokenizer: Any) -> int | None:
    for name in ("eos_token_id", "sep_token_id"):
        sep = getattr(tokenizer, name, None)
        if isinstance(sep, int):
            return sep
    return None


class Corpus:
    """Token tensors of a corpus, with the tokenizer's separator closing every document.

    Args:
        data: a text file, a folder, or a Hugging Face dataset id (module docstring).
        tokenizer: a Hugging Face tokenizer (e.g. ``model.tokenizer``); no special tokens are
            added except the separator.
        text_field: the field / column holding the text (jsonl, parquet, datasets).
        split: the dataset split (Hugging Face datasets only).
    """

    def __init__(
        self, data: str | Path, tokenizer: Any, text_field: str = "text", split: str = "train"
    ):
        if tokenizer is None:
            raise ValueError("Corpus: the model has no tokenizer; give one to tokenise the data")
        self.data, self.tokenizer, self.text_field, self.split = data, tokenizer, text_field, split
        self.separator = _separator(tokenizer)
        if self.separator is None:
            logger.warning("the tokenizer defines no EOS/SEP token: documents are packed as is")

    def __iter__(self) -> Iterator[Tensor]:
        for piece, last in documents(self.data, self.text_field, self.split):
            ids = self.tokenizer.encode(piece, add_special_tokens=False)
            if last and self.separator is not None:
                ids = [*ids, self.separator]
            if ids:
                yield torch.tensor(ids, dtype=torch.long)
