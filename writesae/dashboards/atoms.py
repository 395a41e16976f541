"""Per-atom summaries for the dashboard, from one `CorpusStats`: firing statistics, histogram,
top-activating contexts, key side, the queries that read the atom, its memory and its nearest
atoms. (The value side, which needs the model's derivatives, is in `value.py`.)"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_recurrent.recurrence import Transition
from writesae.dashboards.corpus import CorpusStats

__all__ = ["AtomCodes", "split_codes", "firing_summary", "contexts", "key_side", "read_side"]
__all__ += ["memory", "nearest"]


@dataclass
class AtomCodes:
    """The nonzero codes of every atom: `pos[i]`, `value[i]` the flat positions (ascending) and
    activations of atom i."""

    pos: list[Tensor]
    value: list[Tensor]


def split_codes(stats: CorpusStats, n_atoms: int) -> AtomCodes:
    """Group the corpus's sparse codes by atom."""
    order = torch.argsort(stats.atom * stats.tokens.numel() + stats.pos)
    counts = torch.bincount(stats.atom, minlength=n_atoms).tolist()
    return AtomCodes(list(stats.pos[order].split(counts)), list(stats.value[order].split(counts)))


def firing_summary(value: Float[Tensor, " n"], n_tokens: int, bins: int) -> dict:
    """Fire rate, mean and max activation, and the histogram of the nonzero activations
    (`bins` equal bins over [0, max], counted with `numpy.histogram`)."""
    v = value.double().numpy()
    if len(v) == 0:
        return dict(fire_rate=0.0, mean_act=0.0, max_act=0.0, hist=[0] * bins, hist_max=0.0)
    top = float(v.max())
    counts, _ = np.histogram(v, bins=bins, range=(0.0, top))
    return dict(
        fire_rate=len(v) / n_tokens,
        mean_act=float(v.mean()),
        max_act=top,
        hist=counts.tolist(),
        hist_max=top,
    )


def _window(T: int, t: int, left: int, right: int) -> tuple[int, int]:
    return max(0, t - left), min(T, t + right + 1)


def contexts(
    stats: CorpusStats,
    pos: Int[Tensor, " n"],
    value: Float[Tensor, " n"],
    n: int,
    left: int,
    right: int,
) -> list[dict]:
    """The atom's `n` top-activating positions, each with its window of tokens and the atom's
    activation at every token of the window."""
    T = stats.tokens.shape[1]
    top = value.topk(min(n, len(value))).indices
    out = []
    for i in top.tolist():
        row, t = divmod(int(pos[i]), T)
        a, b = _window(T, t, left, right)
        flat = torch.arange(row * T + a, row * T + b)
        j = torch.searchsorted(pos, flat).clamp_max(max(len(pos) - 1, 0))
        acts = torch.where(pos[j] == flat, value[j], torch.zeros(()))
        out.append(
            dict(
                act=float(value[i]),
                row=row,
                pos=t,
                start=a,
                tokens=stats.tokens[row, a:b].tolist(),
                acts=acts.tolist(),
            )
        )
    return out


def key_side(stats: CorpusStats, atom: int, n: int, min_count: int) -> list[dict]:
    """The token ids whose write key aligns best with u_i: mean cos(k_t, u_i) over the positions
    holding the token, among tokens seen at least `min_count` times."""
    ok = stats.key_count >= min_count
    mean = torch.where(ok, stats.key_sum[:, atom] / stats.key_count.clamp_min(1), -torch.inf)
    top = mean.topk(min(n, int(ok.sum()))).indices
    return [dict(token=int(t), cos=float(mean[t]), n=int(stats.key_count[t])) for t in top.tolist()]


def read_side(stats: CorpusStats, atom: int, left: int, right: int) -> list[dict]:
    """The positions whose query reads u_i most (largest |<u_i, q_t>|), with their windows."""
    T = stats.tokens.shape[1]
    out = []
    for v, p in zip(stats.read_value[atom].tolist(), stats.read_pos[atom].tolist(), strict=True):
        row, t = divmod(int(p), T)
        a, b = _window(T, t, left, right)
        out.append(dict(value=v, row=row, pos=t, start=a, tokens=stats.tokens[row, a:b].tolist()))
    return out


def _starts(pos: Tensor, value: Tensor, T: int, lag: int, n: int) -> Tensor:
    """The flat positions of the atom's `n` strongest firings that have `lag` tokens after them
    in their sequence."""
    ok = (pos % T) + lag < T
    p, v = pos[ok], value[ok]
    return p[v.topk(min(n, len(v))).indices]


def memory(
    stats: CorpusStats,
    u: Float[Tensor, "n_atoms d_k"],
    codes: AtomCodes,
    lags: tuple[int, ...],
    n_starts: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """How much of a contribution along u_i written at the atom's firings remains `lag` tokens
    later: ||P u_i|| / ||u_i|| with P = A_{t+lag} ... A_{t+1}, averaged over the atom's
    `n_starts` strongest firings with room for `lag` more tokens.

    Returns (decay only, exact transition, number of firings averaged), each `[n_atoms, n_lags]`;
    "decay only" uses the products of the cell's decays (the scalar or per-channel forget gates),
    "exact" the full transitions (with the delta rule's or RWKV-7's erase). NaN where the atom
    has no such firing.
    """
    T = stats.tokens.shape[1]
    n_atoms = u.shape[0]
    shape = (n_atoms, len(lags))
    decay_only = torch.full(shape, torch.nan, dtype=torch.float64)
    exact, count = decay_only.clone(), torch.zeros(shape, dtype=torch.long)
    tr = stats.transition.map(lambda t: t.flatten(0, 1))  # [N, 1, ...]
    for j, lag in enumerate(lags):
        starts = [_starts(codes.pos[i], codes.value[i], T, lag, n_starts) for i in range(n_atoms)]
        owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(starts)])
        if len(owner) == 0:
            continue
        steps = torch.cat(starts)[:, None] + torch.arange(1, lag + 1)  # [n, lag]
        sub = tr.map(lambda t: t[steps])  # [n, lag, 1, ...]  # noqa: B023 (used at once)
        unit = u.double()[owner] / u.double()[owner].norm(dim=-1, keepdim=True)
        for result, tran in ((decay_only, Transition(sub.decay)), (exact, sub)):
            pu = unit[:, None, :, None]  # [n, head 1, d_k, d_v 1]
            for s in range(lag):
                pu = tran.step(pu, s)
            kept = pu[:, 0, :, 0].norm(dim=-1)
            total = torch.zeros(n_atoms, dtype=torch.float64).index_add_(0, owner, kept)
            c = torch.bincount(owner, minlength=n_atoms)
            result[:, j] = torch.where(c > 0, total / c.clamp_min(1), torch.nan)
            count[:, j] = c
    return decay_only, exact, count


def nearest(factors: Float[Tensor, "n_atoms d"], n: int) -> tuple[Tensor, Tensor]:
    """For each row, the `n` other rows of largest |cosine| and their (signed) cosines."""
    f = factors.detach().double()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = f @ f.T
    cos.fill_diagonal_(0.0)
    idx = cos.abs().topk(min(n, cos.shape[0] - 1), dim=-1).indices
    return idx, cos.gather(1, idx)
