"""Shard files of :func:`writesae.save_shards`: one safetensors file per shard, written whole,
and the progress record that lets an interrupted extract resume (one per rank under torchrun)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from writesae import distributed as dp
from writesae.samples import cat_rows, n_rows

__all__ = ["ShardWriter", "progress_record", "write_shard", "replace_json"]


def progress_record(
    path: Path, settings: dict[str, Any], meta: dict[str, Any]
) -> dict[str, Any] | None:
    """An interrupted extract's progress record, if it was made with these settings."""
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is not None and old.get("settings") == settings and old.get("meta") == meta:
        return old
    return None


class ShardWriter:
    """Collects batches and writes them as shards of about ``per_shard`` samples into ``tmp``,
    recording its progress after each shard (``tag`` names this rank's shards under torchrun)."""

    def __init__(self, tmp: Path, done: dict[str, Any], record: dict[str, Any]):
        self.tmp, self.record = tmp, record
        self.tag = f"_r{dp.rank():03d}" if dp.active() else ""
        self.progress_file = tmp / f"progress{self.tag}.json"
        self.names: list[str] = list(done["shards"])
        self.total, self.kind = done["n_samples"], done["kind"]
        self.pending: list[Tensor | tuple] = []

    def add(self, b: Tensor | tuple, per_shard: int) -> None:
        """Queue a batch; write a shard once ``per_shard`` samples are queued."""
        self.kind = "write" if isinstance(b, tuple) else "state"
        self.pending.append(b)
        self.total += n_rows(b)
        if sum(n_rows(p) for p in self.pending) >= per_shard:
            self.flush()

    def flush(self) -> None:
        """Write the queued samples as the next shard and record the progress."""
        if not self.pending:
            return
        name = f"shard{self.tag}_{len(self.names):05d}.safetensors"
        write_shard(self.tmp / name, cat_rows(self.pending), self.kind)
        self.names.append(name)
        self.pending = []
        state = {"shards": self.names, "n_samples": self.total, "kind": self.kind, **self.record}
        replace_json(self.progress_file, state)


def write_shard(path: Path, data: Tensor | tuple, kind: str | None) -> None:
    """One shard file, complete or not at all (written beside, then renamed)."""
    named = data._asdict() if isinstance(data, tuple) else {"state": data}  # key, value
    tensors = {k: t.contiguous() for k, t in named.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"kind": kind})
    os.replace(tmp, path)


def replace_json(path: Path, data: dict[str, Any]) -> None:
    """``path`` holds ``data`` as JSON, replaced whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
