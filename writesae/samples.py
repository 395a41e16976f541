"""Batches of samples as structures of tensors that share their first (row) axis.

A structure is a tensor (states ``[N, d_k, d_v]``), a tuple of tensors such as
:class:`writesae.WriteFactors` ``(key [N, d_k], value [N, d_v])``, or, in a sweep, a dict
``{cell: structure}``. The functions here act on every tensor of a structure at once, so the
shuffle buffer, shard writer and data-parallel exchange handle all kinds of samples alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar, cast

import torch
from torch import Tensor

from writesae import distributed as dp

__all__ = ["Samples", "map_samples", "n_rows", "take_rows", "cat_rows", "exchange"]

Samples = Tensor | tuple | dict
# a structure's own type: tuples (e.g. `WriteFactors`) and dicts come back as they went in
S = TypeVar("S", bound=Samples)


def map_samples(data: S, fn: Callable[[Tensor], Tensor]) -> S:
    """The structure with ``fn`` applied to each of its tensors (tuples keep their type)."""
    if isinstance(data, dict):
        return cast(S, {c: map_samples(v, fn) for c, v in data.items()})
    if isinstance(data, tuple):
        return cast(S, type(data)(*(map_samples(t, fn) for t in data)))
    return cast(S, fn(data))


def n_rows(data: Samples) -> int:
    """Number of samples (rows) in a structure."""
    if isinstance(data, dict):
        return n_rows(next(iter(data.values())))
    return n_rows(data[0]) if isinstance(data, tuple) else data.shape[0]


def take_rows(data: S, idx: Tensor) -> S:
    """The rows ``idx`` of every tensor."""
    return map_samples(data, lambda t: t[idx])


def cat_rows(parts: Sequence[S]) -> S:
    """Structures of one shape concatenated along the rows."""
    first = parts[0]
    if isinstance(first, dict):
        dicts = cast(Sequence[dict], parts)
        return cast(S, {c: cat_rows([p[c] for p in dicts]) for c in first})
    if isinstance(first, tuple):
        tuples = cast(Sequence[tuple], parts)
        return cast(S, type(first)(*(cat_rows([p[i] for p in tuples]) for i in range(len(first)))))
    # the parts have the first's structure: tensors
    return cast(S, torch.cat(list(cast(Sequence[Tensor], parts))))


def exchange(mine: S) -> list[S]:
    """Every rank's structure (same shape, any number of rows), in rank order (``[mine]`` in one
    process)."""
    if not dp.active():
        return [mine]
    gathered: list[list[Tensor]] = []  # per tensor of the structure, one entry per rank

    def gather(t: Tensor) -> Tensor:
        gathered.append(dp.gather_varlen(t))
        return t

    map_samples(mine, gather)
    out: list[S] = []
    for r in range(dp.world_size()):
        leaves = iter([g[r] for g in gathered])
        out.append(map_samples(mine, lambda t: next(leaves)))  # noqa: B023 (used at once)
    return out
