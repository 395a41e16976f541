"""Activation sources for SAE training: in-memory tensors, a model streamed through a shuffle
buffer, and safetensors shards on disk.

Every source is an iterable whose ``__iter__`` runs one epoch and yields batches that
:func:`writesae.train` accepts:

* input kind ``"state"``: ``[B, d_k, d_v]`` tensors (the state S_t of one head),
* input kind ``"write"``: :class:`WriteFactors` ``(key [B, d_k], value [B, d_v])`` with the write
  ``X = key value^T``, ``key = strength * k`` (``hook_k`` times ``hook_beta`` / ``hook_dt`` or 1),
  ``value = hook_v``; the ``d_k x d_v`` matrix is never built.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from hooked_recurrent.validation import model_fingerprint
from writesae.fileio import atomic_dir, check_target, partial_dir
from writesae.protocols import CacheLike, ModelLike

__all__ = [
    "WriteFactors",
    "TensorSource",
    "ModelSource",
    "ShardSource",
    "save_shards",
    "extract_cell",
    "write_factor_hooks",
    "write_factors",
]

logger = logging.getLogger(__name__)

SHARD_META = "shards.json"


class WriteFactors(NamedTuple):
    """A batch of rank-1 writes ``X_b = key_b value_b^T``."""

    key: Float[Tensor, "B d_k"]
    value: Float[Tensor, "B d_v"]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _n(data: Tensor | WriteFactors) -> int:
    return data.key.shape[0] if isinstance(data, WriteFactors) else data.shape[0]


def _take(data: Tensor | WriteFactors, idx: Tensor) -> Tensor | WriteFactors:
    if isinstance(data, WriteFactors):
        return WriteFactors(data.key[idx], data.value[idx])
    return data[idx]


def _cat(parts: Sequence[Tensor | WriteFactors]) -> Tensor | WriteFactors:
    if isinstance(parts[0], WriteFactors):
        return WriteFactors(torch.cat([p.key for p in parts]), torch.cat([p.value for p in parts]))
    return torch.cat(list(parts))


class TensorSource:
    """Batches from tensors in memory.

    Args:
        data: states ``[N, d_k, d_v]``, or ``(key [N, d_k], value [N, d_v])`` write factors.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch (seeded; epoch e uses ``seed + e``).
        drop_last: drop a final short batch.
    """

    def __init__(
        self,
        data: Tensor | tuple[Tensor, Tensor] | WriteFactors,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ):
        if isinstance(data, tuple | list) and not isinstance(data, WriteFactors):
            data = WriteFactors(*data)
        if isinstance(data, WriteFactors) and data.key.shape[0] != data.value.shape[0]:
            raise ValueError(
                f"key has {data.key.shape[0]} samples but value has {data.value.shape[0]}"
            )
        if isinstance(data, Tensor) and data.ndim != 3:
            raise ValueError(f"states must be [N, d_k, d_v], got shape {tuple(data.shape)}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"TensorSource: batch_size={batch_size!r}; expected an int >= 1")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self._epoch = 0

    def __len__(self) -> int:
        n = _n(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tensor | WriteFactors]:
        n = _n(self.data)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self._epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        self._epoch += 1
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            if self.drop_last and idx.numel() < self.batch_size:
                break
            yield _take(self.data, idx)


def _select_positions(p: int, positions: Any) -> Tensor:
    """Positions (within a block of length p) to keep: None = all, 'last', int, slice, list."""
    if positions is None:
        return torch.arange(p)
    if positions == "last":
        return torch.tensor([p - 1])
    if isinstance(positions, int):
        return torch.tensor([positions % p])
    if isinstance(positions, slice):
        return torch.arange(p)[positions]
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    pos = pos[(pos < p) & (pos >= -p)] % p
    return pos


def _check_cell(model: ModelLike, layer: object, head: object, kind: object) -> None:
    """The cell (layer, head) and input kind exist in ``model``."""
    if kind not in ("state", "write"):
        raise ValueError(f"kind={kind!r}; expected 'state' or 'write'")
    if not _is_int(layer):
        raise TypeError(f"layer={layer!r}; expected an int")
    if not _is_int(head):
        raise TypeError(f"head={head!r}; expected an int")
    cfg = getattr(model, "cfg", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        rec = [i for i, t in enumerate(types) if t == "recurrent"]
        if layer not in rec:
            raise ValueError(f"layer={layer} is not a recurrent layer; recurrent layers: {rec}")
    n_heads = getattr(cfg, "n_heads", None)
    if n_heads is not None and not 0 <= head < n_heads:
        raise ValueError(f"head={head} out of range; the model has {n_heads} state heads")


def _check_positions(positions: Any, p: int) -> None:
    """Positions select at least one position and none beyond a block of ``p`` tokens."""
    if positions is None or positions == "last":
        return
    if isinstance(positions, slice):
        if len(range(p)[positions]) == 0:
            raise ValueError(f"positions={positions} selects nothing in blocks of {p} tokens")
        return
    if isinstance(positions, str):
        raise ValueError(f"positions={positions!r}; expected None, 'last', int, slice or list")
    pos = [positions] if _is_int(positions) else list(positions)
    if not pos:
        raise ValueError("positions is empty; expected None (all), 'last', an int, slice or list")
    bad = [q for q in pos if not _is_int(q) or not -p <= q < p]
    if bad:
        raise ValueError(
            f"positions {bad[:5]} lie outside blocks of context_len={p} tokens "
            f"(accepted: -{p} <= position < {p})"
        )


def write_factor_hooks(model: ModelLike, layer: int) -> list[str]:
    """The hooks whose activations give layer ``layer``'s writes as factors: ``hook_k``,
    ``hook_v`` and the mixer's write strength (``hook_beta``, ``hook_dt``) where it has one."""
    prefix = f"blocks.{layer}.attn"
    names = [f"{prefix}.hook_k", f"{prefix}.hook_v"]
    strength = getattr(model.blocks[layer].attn, "write_strength_hook", None)
    if strength is not None:
        names.append(f"{prefix}.{strength}")
    return names


def write_factors(
    model: ModelLike,
    cache: CacheLike,
    layer: int,
    head: int,
    positions: Tensor | slice = slice(None),
) -> WriteFactors:
    """One head's writes ``X_t = key_t value_t^T`` as factors, from a cache of
    :func:`write_factor_hooks`: ``key = strength * hook_k``, ``value = hook_v``, each
    ``[batch, len(positions), d]`` in the cache's dtype."""
    names = write_factor_hooks(model, layer)
    key = cache[names[0]][:, positions, head]
    if len(names) == 3:
        key = key * cache[names[2]][:, positions, head][..., None]
    return WriteFactors(key, cache[names[1]][:, positions, head])


def extract_cell(
    model: ModelLike,
    tokens: Tensor,
    layer: int,
    head: int,
    kind: str = "state",
    positions: Any = None,
) -> Tensor | WriteFactors:
    """Per-position samples of one cell (layer, head) from one forward pass.

    Returns states ``[b * P, d_k, d_v]`` (kind ``state``) or write factors with
    ``key = strength * hook_k`` and ``value = hook_v`` (kind ``write``), P = selected positions.
    """
    if kind == "state":
        names = [f"blocks.{layer}.attn.hook_state"]
    elif kind == "write":
        names = write_factor_hooks(model, layer)
    else:
        raise ValueError(f"kind must be 'state' or 'write', got {kind!r}")
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise ValueError(f"model has no hook(s) {missing} (layer {layer} is not recurrent?)")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    pos = _select_positions(tokens.shape[-1], positions)
    n_heads = cache[names[0]].shape[2]
    if not 0 <= head < n_heads:
        raise ValueError(f"head {head} out of range: {names[0]} has {n_heads} heads")
    if kind == "state":
        s = cache[names[0]][:, pos, head]
        return s.reshape(-1, *s.shape[-2:]).float()
    k, v = write_factors(model, cache, layer, head, pos)
    return WriteFactors(k.reshape(-1, k.shape[-1]).float(), v.reshape(-1, v.shape[-1]).float())


class ModelSource:
    """Samples streamed from a model through a shuffle buffer; nothing touches disk.

    Texts (or token sequences) are concatenated without separators and cut into blocks of
    ``context_len`` tokens (the paper's packing); each block batch runs once through
    ``model.run_with_cache`` with only the needed hooks, and the selected positions of one head
    go into a buffer of ``buffer_size`` samples. When the buffer is full it is shuffled and its
    first half is emitted as batches.

    Args:
        model: a hooked recurrent model (:class:`writesae.protocols.ModelLike`).
        texts: iterable of strings (tokenised with ``model.to_tokens``) or token sequences.
        layer: the cell's layer (a recurrent layer).
        head: the cell's state head.
        kind: ``"state"`` or ``"write"`` (write factors, never the matrix).
        positions: positions within each block to keep (None = all, ``"last"``, list, slice).
        context_len: block length in tokens; ``model_batch_size`` blocks per forward pass.
        max_samples: stop after this many samples per epoch (None = exhaust ``texts``).
    """

    def __init__(
        self,
        model: ModelLike,
        texts: Iterable[Any],
        layer: int,
        head: int,
        kind: str = "state",
        positions: Any = None,
        batch_size: int = 256,
        buffer_size: int = 16384,
        context_len: int = 256,
        model_batch_size: int = 8,
        max_samples: int | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
    ):
        _check_cell(model, layer, head, kind)
        for name, v in (
            ("batch_size", batch_size),
            ("buffer_size", buffer_size),
            ("context_len", context_len),
            ("model_batch_size", model_batch_size),
        ):
            if not _is_int(v) or v < 1:
                raise ValueError(f"ModelSource: {name}={v!r}; expected an int >= 1")
        if max_samples is not None and (not _is_int(max_samples) or max_samples < 1):
            raise ValueError(f"ModelSource: max_samples={max_samples!r}; expected None or int >= 1")
        if isinstance(texts, str):
            raise TypeError("ModelSource: texts is one str; pass a list of texts, e.g. [text]")
        _check_positions(positions, context_len)
        self.model, self.texts = model, texts
        self.layer, self.head, self.kind, self.positions = layer, head, kind, positions
        self.tokens_seen = 0
        self.batch_size, self.buffer_size = batch_size, max(buffer_size, 2 * batch_size)
        self.context_len, self.model_batch_size = context_len, model_batch_size
        self.max_samples, self.seed, self.device = max_samples, seed, device
        self._epoch = 0

    def provenance(self) -> dict[str, Any]:
        """Where the samples come from: model name and fingerprint, layer, head, input kind."""
        cfg = getattr(self.model, "cfg", None)
        return {
            "model": getattr(cfg, "model_name", "") or type(self.model).__name__,
            "model_fingerprint": model_fingerprint(self.model),
            "layer": self.layer,
            "head": self.head,
            "kind": self.kind,
            "input_kind": self.kind,
            "context_len": self.context_len,
        }

    def _token_stream(self) -> Iterator[Tensor]:
        for item in self.texts:
            if isinstance(item, str):
                toks = self.model.to_tokens(item)
            else:
                toks = torch.as_tensor(item)
            yield toks.reshape(-1).long()

    def _blocks(self) -> Iterator[Tensor]:
        carry = torch.zeros(0, dtype=torch.long)
        rows: list[Tensor] = []
        for toks in self._token_stream():
            carry = torch.cat([carry, toks])
            while carry.numel() >= self.context_len:
                rows.append(carry[: self.context_len])
                carry = carry[self.context_len :]
                if len(rows) == self.model_batch_size:
                    yield torch.stack(rows)
                    rows = []
        if rows:
            yield torch.stack(rows)

    def _samples(self) -> Iterator[Tensor | WriteFactors]:
        seen = 0
        self.tokens_seen = 0
        for block in self._blocks():
            self.tokens_seen += block.numel()
            if self.device is not None:
                block = block.to(self.device)
            s = extract_cell(self.model, block, self.layer, self.head, self.kind, self.positions)
            if isinstance(s, WriteFactors):
                s = WriteFactors(s.key.cpu(), s.value.cpu())
            else:
                s = s.cpu()
            if self.max_samples is not None:
                s = _take(s, torch.arange(min(_n(s), self.max_samples - seen)))
            seen += _n(s)
            yield s
            if self.max_samples is not None and seen >= self.max_samples:
                return

    def __iter__(self) -> Iterator[Tensor | WriteFactors]:
        g = torch.Generator().manual_seed(self.seed + self._epoch)
        self._epoch += 1
        buf: Tensor | WriteFactors | None = None
        for s in self._samples():
            buf = s if buf is None else _cat([buf, s])
            while _n(buf) >= self.buffer_size:
                buf = _take(buf, torch.randperm(_n(buf), generator=g))
                half = (self.buffer_size // 2 // self.batch_size) * self.batch_size
                for i in range(0, half, self.batch_size):
                    yield _take(buf, torch.arange(i, i + self.batch_size))
                buf = _take(buf, torch.arange(half, _n(buf)))
        if buf is not None and _n(buf) > 0:
            buf = _take(buf, torch.randperm(_n(buf), generator=g))
            for i in range(0, _n(buf) - self.batch_size + 1, self.batch_size):
                yield _take(buf, torch.arange(i, i + self.batch_size))


def _skip(source: Iterable[Any], n: int) -> Iterator[Any]:
    """``source`` without its first ``n`` samples."""
    for b in source:
        if isinstance(b, tuple | list) and not isinstance(b, WriteFactors):
            b = WriteFactors(*b)
        if n >= _n(b):
            n -= _n(b)
            continue
        if n:
            b = _take(b, torch.arange(n, _n(b)))
            n = 0
        yield b


def save_shards(
    source: Iterable[Tensor | WriteFactors],
    directory: str | Path,
    samples_per_shard: int = 65536,
    max_samples: int | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> list[Path]:
    """Write batches from ``source`` to ``shard_{i:05d}.safetensors`` files plus ``shards.json``.

    States are stored under ``"state"``, write factors under ``"key"`` and ``"value"``.
    ``shards.json`` records the input kind, the sample count, the shard names, the source's
    provenance (for a :class:`ModelSource`: model name and fingerprint, layer, head, input kind,
    tokens run) and ``metadata``.

    The shards collect in the sibling folder ``.{name}.partial`` (each shard renamed into it when
    complete), which becomes ``directory`` at the end. An existing ``directory`` is an error unless
    ``overwrite=True``. After an interruption, ``resume=True`` keeps the complete shards and
    continues from the next one: the source is replayed and its first samples skipped (a
    deterministic source gives the same shards as an uninterrupted run).
    """
    if not _is_int(samples_per_shard) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard!r}; expected an int >= 1")
    if max_samples is not None and (not _is_int(max_samples) or max_samples < 1):
        raise ValueError(f"max_samples={max_samples!r}; expected None or an int >= 1")
    directory = check_target(directory, overwrite, "shard folder")
    meta = {**getattr(source, "provenance", lambda: {})(), **(metadata or {})}
    settings = {"samples_per_shard": samples_per_shard, "max_samples": max_samples}
    part = partial_dir(directory)
    done = _resume_point(part, settings, meta, resume)
    paths = [directory / n for n in done["shards"]]
    pending: list[Tensor | WriteFactors] = []
    count, total, kind = 0, done["n_samples"], done["kind"]

    with atomic_dir(directory, overwrite, "shard folder", tmp=part) as tmp:

        def flush() -> None:
            nonlocal pending, count
            if not pending:
                return
            name = f"shard_{len(paths):05d}.safetensors"
            _write_shard(tmp / name, _cat(pending), kind)
            paths.append(directory / name)
            pending, count = [], 0
            progress = dict(shards=[p.name for p in paths], n_samples=total, kind=kind)
            _replace_json(tmp / _PROGRESS, {**progress, "settings": settings, "meta": meta})

        if max_samples is None or total < max_samples:
            for b in _skip(source, total):
                kind = "write" if isinstance(b, WriteFactors) else "state"
                if max_samples is not None:
                    b = _take(b, torch.arange(min(_n(b), max_samples - total)))
                pending.append(b)
                count += _n(b)
                total += _n(b)
                if count >= samples_per_shard:
                    flush()
                if max_samples is not None and total >= max_samples:
                    break
            flush()
        if total == 0:
            raise ValueError("save_shards: the source gave no samples; nothing to write")
        full = {"kind": kind, "input_kind": kind, "n_samples": total}
        full = {**full, "shards": [p.name for p in paths], **meta}
        if hasattr(source, "tokens_seen") and "n_tokens" not in full:
            full["n_tokens"] = source.tokens_seen
        (tmp / SHARD_META).write_text(json.dumps(full, indent=2))
        (tmp / _PROGRESS).unlink()
    return paths


_PROGRESS = "progress.json"


def _resume_point(
    part: Path, settings: dict[str, Any], meta: dict[str, Any], resume: bool
) -> dict[str, Any]:
    """The progress of an interrupted extract in ``part`` when resuming it with the same settings
    and provenance (else ``part`` is removed and the extract starts over)."""
    progress_file = part / _PROGRESS
    done: dict[str, Any] = {"shards": [], "n_samples": 0, "kind": None}
    if part.exists():
        old = json.loads(progress_file.read_text()) if progress_file.is_file() else None
        same = old is not None and old.get("settings") == settings and old.get("meta") == meta
        if resume and same:
            done = old
            logger.info("resuming %s after %d shard(s)", part, len(done["shards"]))
        else:
            if resume:
                logger.warning(
                    "%s: the interrupted extract had other settings or provenance; starting over",
                    part,
                )
            shutil.rmtree(part)
    return done


def _write_shard(path: Path, data: Tensor | WriteFactors, kind: str | None) -> None:
    """One shard file, complete or not at all (written beside, then renamed)."""
    if isinstance(data, WriteFactors):
        tensors = {"key": data.key.contiguous(), "value": data.value.contiguous()}
    else:
        tensors = {"state": data.contiguous()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"kind": kind})
    os.replace(tmp, path)


def _replace_json(path: Path, data: dict[str, Any]) -> None:
    """``path`` holds ``data`` as JSON, replaced whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class ShardSource:
    """Batches read back from :func:`save_shards` output (shard order and contents shuffled)."""

    def __init__(
        self, directory: str | Path, batch_size: int = 256, shuffle: bool = True, seed: int = 0
    ):
        self.directory = Path(directory)
        meta_path = self.directory / SHARD_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not found; write shards with save_shards()")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e})") from e
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"ShardSource: batch_size={batch_size!r}; expected an int >= 1")
        self.paths = [self.directory / n for n in self.meta["shards"]]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self._epoch = 0

    def _load(self, p: Path) -> Tensor | WriteFactors:
        try:
            t = load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{p}: cannot read shard ({e})") from e
        if "state" in t:
            return t["state"]
        if "key" in t and "value" in t:
            return WriteFactors(t["key"], t["value"])
        raise ValueError(f"{p}: shard has tensors {sorted(t)}, expected 'state' or 'key'+'value'")

    def __iter__(self) -> Iterator[Tensor | WriteFactors]:
        g = torch.Generator().manual_seed(self.seed + self._epoch)
        self._epoch += 1
        order = (
            torch.randperm(len(self.paths), generator=g) if self.shuffle else range(len(self.paths))
        )
        rest: Tensor | WriteFactors | None = None
        for i in order:
            data = self._load(self.paths[int(i)])
            if self.shuffle:
                data = _take(data, torch.randperm(_n(data), generator=g))
            data = data if rest is None else _cat([rest, data])
            full = (_n(data) // self.batch_size) * self.batch_size
            for j in range(0, full, self.batch_size):
                yield _take(data, torch.arange(j, j + self.batch_size))
            rest = _take(data, torch.arange(full, _n(data)))
