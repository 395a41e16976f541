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

import contextlib
import itertools
import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard, cast

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from hooked_recurrent.validation import model_fingerprint
from writesae import distributed as dp
from writesae.fileio import atomic_dir, check_target, partial_dir
from writesae.protocols import CacheLike, ModelLike, TextModelLike
from writesae.samples import Samples, cat_rows, exchange, map_samples, n_rows, take_rows
from writesae.shard_files import ShardWriter, progress_record

__all__ = [
    "WriteFactors",
    "TensorSource",
    "ModelSource",
    "ShardSource",
    "save_shards",
    "extract_cell",
    "extract_cells",
    "write_factor_hooks",
    "write_factors",
]

logger = logging.getLogger(__name__)

SHARD_META = "shards.json"


class WriteFactors(NamedTuple):
    """A batch of rank-1 writes ``X_b = key_b value_b^T``."""

    key: Float[Tensor, "B d_k"]
    value: Float[Tensor, "B d_v"]


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


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
        n = n_rows(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tensor | WriteFactors]:
        n = n_rows(self.data)
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
            yield take_rows(self.data, idx)


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


def _cell_hooks(model: ModelLike, layer: int, kind: str) -> list[str]:
    """Hooks holding a layer's samples: ``hook_state``, or :func:`write_factor_hooks`."""
    if kind == "state":
        names = [f"blocks.{layer}.attn.hook_state"]
    elif kind == "write":
        names = write_factor_hooks(model, layer)
    else:
        raise ValueError(f"kind must be 'state' or 'write', got {kind!r}")
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise ValueError(f"model has no hook(s) {missing} (layer {layer} is not recurrent?)")
    return names


def extract_cells(
    model: ModelLike,
    tokens: Tensor,
    cells: Sequence[tuple[int, int]],
    kind: str = "state",
    positions: Any = None,
) -> dict[tuple[int, int], Tensor | WriteFactors]:
    """Per-position samples of several cells ``(layer, head)`` from one forward pass.

    Returns ``{cell: samples}`` with the samples of :func:`extract_cell` for every cell.
    """
    names = {layer: _cell_hooks(model, layer, kind) for layer, _ in cells}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=sum(names.values(), []))
    pos = _select_positions(tokens.shape[-1], positions)
    out: dict[tuple[int, int], Tensor | WriteFactors] = {}
    for layer, head in cells:
        n_heads = cache[names[layer][0]].shape[2]
        if not 0 <= head < n_heads:
            raise ValueError(f"head {head} out of range: {names[layer][0]} has {n_heads} heads")
        if kind == "state":
            s = cache[names[layer][0]][:, pos, head]
            out[layer, head] = s.reshape(-1, *s.shape[-2:]).float()
            continue
        k, v = write_factors(model, cache, layer, head, pos)
        out[layer, head] = WriteFactors(
            k.reshape(-1, k.shape[-1]).float(), v.reshape(-1, v.shape[-1]).float()
        )
    return out


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
    return extract_cells(model, tokens, [(layer, head)], kind, positions)[layer, head]


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
        share: under ``torchrun``, every rank runs the model on its share of the block batches
            and (True) the ranks exchange samples so that each yields the single-process stream,
            or (False) each yields only its own samples (see ``_rounds``).
        drop_last: drop the last samples of an epoch that do not fill a batch (False: yield them
            as a short batch; extraction keeps every sample).
        cells: several cells ``[(layer, head), ...]`` (``layer`` and ``head`` are then ignored):
            one forward pass per block batch serves them all, and every batch is a dict
            ``{cell: samples}`` shuffled with one permutation, so each cell's stream equals that
            of a one-cell source with the same seed (used by :func:`writesae.sweep`).
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
        share: bool = True,
        drop_last: bool = True,
        cells: Sequence[tuple[int, int]] | None = None,
    ):
        self.cells = [(layer, head)] if cells is None else [tuple(c) for c in cells]
        self._dict_batches = cells is not None
        if not self.cells:
            raise ValueError("ModelSource: cells is empty; give at least one (layer, head)")
        for cell_layer, cell_head in self.cells:
            _check_cell(model, cell_layer, cell_head, kind)
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
        self.share, self.drop_last = share, drop_last
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
                # texts as strings need a model with a tokenizer (token ids do not)
                toks = cast(TextModelLike, self.model).to_tokens(item)
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

    def _extract(self, block: Tensor) -> Samples:
        """The samples of one block batch (on the CPU)."""
        if self.device is not None:
            block = block.to(self.device)
        s = extract_cells(self.model, block, self.cells, self.kind, self.positions)
        s = map_samples(s, lambda t: t.cpu())
        return s if self._dict_batches else s[self.cells[0]]

    def _rounds(self) -> Iterator[Samples]:
        """The samples of every block batch, in order.

        Under ``torchrun`` with W ranks the block batches go round in groups of W: rank r runs
        the model on the r-th of each group only. With ``share`` the ranks then exchange their
        samples, so every rank yields the single-process stream; without it each rank yields its
        own block batches' samples (distributed extraction: the ranks' union is the stream).
        """
        w, r = dp.world_size(), dp.rank()
        self.tokens_seen = 0
        blocks = self._blocks()
        while group := list(itertools.islice(blocks, w)):
            self.tokens_seen += sum(b.numel() for b in group)
            if w == 1:
                yield self._extract(group[0])
                continue
            # a rank without a block in the last group contributes no rows of the right shapes
            if r < len(group):
                mine = self._extract(group[r])
            else:
                mine = take_rows(self._extract(group[0][:1, :1]), torch.arange(0))
            # one item per block batch, so the shuffle buffer fills as in one process
            for s in exchange(mine) if self.share else [mine]:
                if n_rows(s):
                    yield s

    def _samples(self) -> Iterator[Samples]:
        seen = 0
        for s in self._rounds():
            if self.max_samples is not None:
                s = take_rows(s, torch.arange(min(n_rows(s), self.max_samples - seen)))
            seen += n_rows(s)
            yield s
            if self.max_samples is not None and seen >= self.max_samples:
                return

    def __iter__(self) -> Iterator[Tensor | WriteFactors]:
        g = torch.Generator().manual_seed(self.seed + self._epoch)
        self._epoch += 1
        buf: Tensor | WriteFactors | None = None
        for s in self._samples():
            buf = s if buf is None else cat_rows([buf, s])
            while n_rows(buf) >= self.buffer_size:
                buf = take_rows(buf, torch.randperm(n_rows(buf), generator=g))
                half = (self.buffer_size // 2 // self.batch_size) * self.batch_size
                for i in range(0, half, self.batch_size):
                    yield take_rows(buf, torch.arange(i, i + self.batch_size))
                buf = take_rows(buf, torch.arange(half, n_rows(buf)))
        if buf is not None and n_rows(buf) > 0:
            buf = take_rows(buf, torch.randperm(n_rows(buf), generator=g))
            end = n_rows(buf) if not self.drop_last else n_rows(buf) - self.batch_size + 1
            for i in range(0, end, self.batch_size):
                yield take_rows(buf, torch.arange(i, min(i + self.batch_size, n_rows(buf))))


def _skip(source: Iterable[Any], n: int) -> Iterator[Any]:
    """``source`` without its first ``n`` samples."""
    for b in source:
        if isinstance(b, tuple | list) and not isinstance(b, WriteFactors):
            b = WriteFactors(*b)
        if n >= n_rows(b):
            n -= n_rows(b)
            continue
        if n:
            b = take_rows(b, torch.arange(n, n_rows(b)))
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

    Under ``torchrun`` every rank writes the samples its source gives (a :class:`ModelSource`
    with ``share=False`` gives each rank its own block batches) as ``shard_r{rank}_{i}``, with
    its own progress record; rank 0 writes ``shards.json`` listing every rank's shards.
    """
    if not _is_int(samples_per_shard) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard!r}; expected an int >= 1")
    if max_samples is not None and (not _is_int(max_samples) or max_samples < 1):
        raise ValueError(f"max_samples={max_samples!r}; expected None or an int >= 1")
    if max_samples is not None and dp.active():
        raise ValueError("save_shards: max_samples is for one process; leave it out with torchrun")
    directory = check_target(directory, overwrite, "shard folder")
    meta = {**getattr(source, "provenance", lambda: {})(), **(metadata or {})}
    record = {
        "settings": {"samples_per_shard": samples_per_shard, "max_samples": max_samples},
        "meta": meta,
    }
    part = partial_dir(directory)
    tag = f"_r{dp.rank():03d}" if dp.active() else ""
    if dp.is_main() and part.exists():
        if not (resume and progress_record(part / f"progress{tag}.json", **record)):
            if resume:
                logger.warning("%s: the interrupted extract had other settings; restarting", part)
            shutil.rmtree(part)
    dp.barrier()  # rank 0 has cleared a stale partial folder before anyone writes
    fresh = dict(shards=[], n_samples=0, kind=None)
    done = (resume and progress_record(part / f"progress{tag}.json", **record)) or fresh
    if done["shards"]:
        logger.info("resuming %s after %d shard(s)", directory, len(done["shards"]))
    keep = atomic_dir(directory, overwrite, "shard folder", tmp=part) if dp.is_main() else None
    with keep or contextlib.nullcontext(part) as tmp:
        part.mkdir(parents=True, exist_ok=True)
        w = ShardWriter(tmp, done, record)
        if max_samples is None or w.total < max_samples:
            for b in _skip(source, w.total):
                if max_samples is not None:
                    b = take_rows(b, torch.arange(min(n_rows(b), max_samples - w.total)))
                w.add(b, samples_per_shard)
                if max_samples is not None and w.total >= max_samples:
                    break
            w.flush()
        w.progress_file.unlink(missing_ok=True)
        ranks = dp.gather_objects((w.names, w.total, w.kind))
        names = [n for r in ranks for n in r[0]]
        total, kind = sum(r[1] for r in ranks), next((r[2] for r in ranks if r[2]), None)
        if total == 0:
            raise ValueError("save_shards: the source gave no samples; nothing to write")
        full = {"kind": kind, "input_kind": kind, "n_samples": total, "shards": names, **meta}
        if hasattr(source, "tokens_seen") and "n_tokens" not in full:
            full["n_tokens"] = source.tokens_seen
        if dp.is_main():
            (tmp / SHARD_META).write_text(json.dumps(full, indent=2))
    dp.barrier()  # the folder is in place before any rank returns
    return [directory / n for n in names]


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
                data = take_rows(data, torch.randperm(n_rows(data), generator=g))
            data = data if rest is None else cat_rows([rest, data])
            full = (n_rows(data) // self.batch_size) * self.batch_size
            for j in range(0, full, self.batch_size):
                yield take_rows(data, torch.arange(j, j + self.batch_size))
            rest = take_rows(data, torch.arange(full, n_rows(data)))
