"""Batches of samples as structures of tensors that share their first (row) axis.

A structure is a tensor (states ``[N, d_k, d_v]``), a tuple of tensors such as
:class:`writesae.WriteFactors` ``(key [N, d_k], value [N, d_v])``, or, in a sweep, a dict
``{cell: structure}``. The functions here act on every tensor of a structure at once, so the
shuffle buffer, shard writer and data-parallel exchange handle all kinds of samples alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from writesae import distributed as dp

__all__ = ["Samples", "map_samples", "n_rows", "take_rows", "cat_rows", "exchange"]

Samples = Tensor | tuple | dict


def map_samples(data: Samples, fn: Callable[[Tensor], Tensor]) -> Samples:
    """The structure with ``fn`` applied to each of its tensors (tuples keep their type)."""
    if isinstance(data, dict):
        return {c: map_samples(v, fn) for c, v in data.items()}
    if isinstance(data, tuple):
        return type(data)(*(map_samples(t, fn) for t in data))
    return fn(data)


def n_rows(data: Samples) -> int:
    """Number of samples (rows) in a structure."""
    if isinstance(data, dict):
        return n_rows(next(iter(data.values())))
    return n_rows(data[0]) if isinstance(data, tuple) else data.shape[0]


def take_rows(data: Samples, idx: Tensor) -> Samples:
    """The rows ``idx`` of every tensor."""
    return map_samples(data, lambda t: t[idx])


def cat_rows(parts: Sequence[Samples]) -> Samples:
    """Structures of one shape concatenated along the rows."""
    first = parts[0]
    if isinstance(first, dict):
        return {c: cat_rows([p[c] for p in parts]) for c in first}
    if isinstance(first, tuple):
        return type(first)(*(cat_rows([p[i] for p in parts]) for i in range(len(first))))
    return torch.cat(list(parts))


def exchange(mine: Samples) -> list[Samples]:
    """Every rank's structure (same shape, any number of rows), in rank order (``[mine]`` in one
    process)."""
    if not dp.active():
        return [mine]
    gathered: list[list[Tensor]] = []  # per tensor of the structure, one entry per rank
    map_samples(mine, lambda t: gathered.append(dp.gather_varlen(t)) or t)
    out = []
    for r in range(dp.world_size()):
        leaves = iter([g[r] for g in gathered])
        out.append(map_samples(mine, lambda t: next(leaves)))  # noqa: B023 (used at once)
    return out
