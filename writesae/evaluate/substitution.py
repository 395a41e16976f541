"""The single-write replacement test (paper section 3.2, App. J): at each firing, is the SAE's top
atom a better write than none, and than a random rank-1 write of the same norm?

The edits are the package's interventions: the atom at its substitution scale is
:func:`writesae.interventions.scaled_atom` and the random control
:func:`writesae.interventions.random_rank1`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_recurrent.state import RecurrentState
from writesae.evaluate.common import check_model, kl, sae_codes, sae_layer
from writesae.interventions import random_rank1, scaled_atom
from writesae.protocols import HookLike, ModelLike, SAELike
from writesae.stats import bootstrap_mean_ci, wilson

__all__ = [
    "SubstitutionResult",
    "evaluate_substitution",
    "scale_label",
    "CALIBRATION_EDGES",
    "KL_POSITIONS",
    "frobenius_cosine",
    "planted_rank1",
]


@dataclass
class SubstitutionResult:
    """Outcome of the single-write replacement test (paper section 3.2).

    Attributes:
        n: number of firings evaluated.
        wins_vs_delete, wins_vs_random: firings where KL(atom) < KL(delete) / KL(random).
        win_rate_vs_delete, ci_vs_delete: rate and Wilson 95% interval; likewise vs random.
        strict_chain: fraction with KL(atom) < KL(delete) < KL(random).
        median_kl: median KL per condition ("atom", "delete", "random", and the controls run).
        kl: per-firing KLs per condition (for plots).
        cosine: per firing, the Frobenius cosine of the substituted (signed) atom to the native
            write it replaces.
        calibration: win rate against deletion per bin of that cosine (`edges`, `n`, `wins`,
            `rate`, `ci`), with the planted reference: rank-1 substitutes of known cosine c to the
            write, at the atom condition's norm (`planted`: {c: n, wins, rate, ci}).
        best_atom: the dictionary atom with the largest |cosine| to the write (signed to align),
            at the atom condition's norm: its win rate vs deletion, interval and median cosine.
        scale_sweep: {scale: n, wins, rate, ci, median_kl} of the top atom vs deletion at each
            scale run (the main scale included).
        population: per-atom rates when `population=True` (paper section 3.2, the population
            test): number of atoms, mean of per-atom win rates vs deletion with a bootstrap 95%
            interval, and per-atom rates.
        settings: the parameters used.
    """

    n: int
    wins_vs_delete: int
    win_rate_vs_delete: float
    ci_vs_delete: tuple[float, float]
    wins_vs_random: int
    win_rate_vs_random: float
    ci_vs_random: tuple[float, float]
    strict_chain: float
    median_kl: dict[str, float]
    kl: dict[str, list[float]] = field(repr=False)
    firings: list[tuple[int, int]] = field(default_factory=list, repr=False)
    cosine: list[float] = field(default_factory=list, repr=False)
    calibration: dict[str, Any] | None = None
    best_atom: dict[str, Any] | None = None
    scale_sweep: dict[str, Any] | None = None
    population: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_samples: bool = False) -> dict[str, Any]:
        """The result as a dict (per-firing samples only with `with_samples=True`)."""
        d = asdict(self)
        if not with_samples:
            d.pop("kl")
            d.pop("firings")
            d.pop("cosine")
        return d


#: cosine bins of the calibration curve
CALIBRATION_EDGES = (-1.0, 0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
KL_POSITIONS = ("edited", "end", "mean")
KL_DIRECTIONS = ("native||edited", "edited||native")


def _parse_scale(scale: str | float) -> str | float:
    """ "matched_norm", "coefficient", or a positive fraction of the native write's norm."""
    if scale in ("matched_norm", "coefficient"):
        return scale
    try:
        f = float(scale)
    except (TypeError, ValueError):
        f = float("nan")
    if not f > 0:
        raise ValueError(
            f"scale must be 'matched_norm', 'coefficient' or a positive fraction of the native "
            f"write's norm, not {scale!r}"
        )
    return f


def scale_label(scale: str | float) -> str:
    """A substitution scale as results write it: "matched_norm", "coefficient", "0.1x_norm"."""
    s = _parse_scale(scale)
    return s if isinstance(s, str) else f"{s:g}x_norm"


def frobenius_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Frobenius cosine of [..., d_k, d_v] matrices."""
    num = (a * b).flatten(-2).sum(-1)
    return num / (a.flatten(-2).norm(dim=-1) * b.flatten(-2).norm(dim=-1)).clamp_min(1e-30)


def _dictionary_cosines(sae: SAELike, W: Tensor) -> Tensor:
    """|<A_j, W>_F| / (||A_j|| ||W||) signed, for every atom j: [B, n_atoms] (W [B, d_k, d_v])."""
    W = W.to(sae.b_enc.dtype)
    U, V = getattr(sae, "key_factors", None), getattr(sae, "value_factors", None)
    if U is not None and V is not None:  # rank-1 atoms: no d_k x d_v matrix per atom
        U, V = U.detach(), V.detach()
        inner = torch.einsum("nk,bkn->bn", U, W @ V.T)
        norms = U.norm(dim=-1) * V.norm(dim=-1)
    else:
        A = sae.atom_matrices(torch.arange(sae.cfg.n_atoms)).detach().flatten(-2)
        inner = W.flatten(-2) @ A.T
        norms = A.norm(dim=-1)
    return inner / (norms[None] * W.flatten(-2).norm(dim=-1)[:, None]).clamp_min(1e-30)


def planted_rank1(W: Tensor, c: float, g: Tensor, h: Tensor) -> Tensor:
    """A unit rank-1 matrix whose Frobenius cosine to the rank-1 write W is exactly c.

    With W = s k1 v1^T (top singular pair): (sqrt(c) k1 + sqrt(1-c) g)(sqrt(c) v1 + sqrt(1-c) h)^T,
    g (h) a random unit vector orthogonal to k1 (v1).
    """
    Uw, _, Vh = torch.linalg.svd(W.double())
    k1, v1 = Uw[..., :, 0], Vh[..., 0, :]
    g = g.double() - (g.double() * k1).sum(-1, keepdim=True) * k1
    h = h.double() - (h.double() * v1).sum(-1, keepdim=True) * v1
    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    a = math.sqrt(c) * k1 + math.sqrt(1 - c) * g
    b = math.sqrt(c) * v1 + math.sqrt(1 - c) * h
    return (a[..., :, None] * b[..., None, :]).to(W.dtype)


def _rate(wins: np.ndarray) -> dict[str, Any]:
    n, k = int(len(wins)), int(np.sum(wins))
    return dict(n=n, wins=k, rate=k / n if n else float("nan"), ci=list(wilson(k, n)))


@dataclass
class _Plan:
    """What one substitution run does: its conditions and where it looks."""

    scale: str | float
    sweep: list[str | float]
    planted: list[float]
    best_atom: bool
    kl_direction: str
    kl_position: str
    positions: list[int]
    seed: int

    @property
    def names(self) -> list[str]:
        """Condition names in batch-block order ("native" first)."""
        names = ["native", "atom", "delete", "random"] + ["best_atom"] * self.best_atom
        names += [f"planted_{c:g}" for c in self.planted]
        return names + [f"atom_{scale_label(s)}" for s in self.sweep]


@dataclass
class _Firings:
    """Per-firing records gathered over the run."""

    kls: dict[str, list[float]]
    cosines: list[float] = field(default_factory=list)
    best_cos: list[float] = field(default_factory=list)
    atoms_active: list[list[int]] = field(default_factory=list)
    where: list[tuple[int, int]] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Firings recorded so far."""
        return len(self.kls["atom"])


def _plan(
    scale: str | float,
    sweep_scales: Sequence[str | float],
    planted_cosines: Sequence[float],
    best_atom: bool,
    kl_direction: str,
    kl_position: str,
    n_positions: int,
    positions_per_prompt: int | None,
    min_position: int,
    seed: int,
) -> _Plan:
    """Check the arguments of :func:`evaluate_substitution` and fix the conditions."""
    scale = _parse_scale(scale)
    sweep = [s for s in dict.fromkeys(_parse_scale(s) for s in sweep_scales) if s != scale]
    planted = [float(c) for c in planted_cosines]
    if any(not 0.0 <= c <= 1.0 for c in planted):
        raise ValueError(f"planted cosines must lie in [0, 1], got {planted}")
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError("kl_direction must be 'native||edited' or 'edited||native'")
    if kl_position not in KL_POSITIONS:
        raise ValueError(f"kl_position must be one of {KL_POSITIONS}, not {kl_position!r}")
    pos_list = list(range(min_position, n_positions))
    if positions_per_prompt is not None and positions_per_prompt < len(pos_list):
        idx = np.linspace(0, len(pos_list) - 1, positions_per_prompt).round().astype(int)
        pos_list = sorted({pos_list[i] for i in idx})
    return _Plan(
        scale, sweep, planted, best_atom, kl_direction, kl_position, pos_list, seed
    )  # fmt: skip


def _conditions_hook(
    plan: _Plan,
    sae: SAELike,
    atom: Float[Tensor, "B d_k d_v"],
    c: Float[Tensor, " B"],
    rnd: Float[Tensor, "B d_k d_v"],
    planted_draws: Sequence[tuple[Tensor, Tensor]],
    info: dict[str, Tensor],
) -> Callable[[Tensor, HookLike], Tensor]:
    """The write hook of one substitution step: blocks of B rows [native, atom, delete, random,
    (best atom), (planted c ...), (atom at each sweep scale)], edited at the first position only.
    Stores the atom's cosine to the write (and the best atom's) in `info`."""
    B, head = atom.shape[0], sae.cfg.head

    def conditions(w: Tensor, hook: HookLike) -> Tensor:
        native = w[:B, 0, head]
        norm = native.flatten(-2).norm(dim=-1)
        a = atom.to(w.dtype)
        a_scaled = scaled_atom(a, c, norm, plan.scale)
        a_norm = a_scaled.flatten(-2).norm(dim=-1)[:, None, None]
        info["cos"] = frobenius_cosine(a_scaled.double(), native.double())
        reps = [a_scaled, torch.zeros_like(native), a_norm * rnd.to(w.dtype)]
        if plan.best_atom:
            cos_all = _dictionary_cosines(sae, native)
            j = cos_all.abs().argmax(-1)
            cj = cos_all.gather(-1, j[:, None])[:, 0]
            info["best_cos"] = cj.abs().double()
            best = sae.atom_matrices(j).detach().to(w.dtype)
            best = best / best.flatten(-2).norm(dim=-1).clamp_min(1e-30)[:, None, None]
            reps.append(torch.where(cj < 0, -1.0, 1.0).to(w.dtype)[:, None, None] * a_norm * best)
        for cp, (g, h) in zip(plan.planted, planted_draws, strict=True):
            reps.append(a_norm * planted_rank1(native, cp, g, h))
        for s in plan.sweep:
            reps.append(scaled_atom(a, c, norm, s))
        out = w.clone()
        for i, r in enumerate(reps, start=1):
            out[i * B : (i + 1) * B, 0, head] = r
        return out

    return conditions


def _step(
    plan: _Plan,
    model: ModelLike,
    sae: SAELike,
    x: Tensor,
    t: int,
    state: RecurrentState | None,
    top: Tensor,
    top_c: Tensor,
    random_seed: int,
    gen: torch.Generator,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Every condition at position t of the prompts `x`, from the clean `state` before t, in one
    batch: the KL of each edited condition against the native one, [n_conditions - 1, B]."""
    B, T = x.shape
    d_k, d_v = sae.cfg.d_k, sae.cfg.d_v
    R = len(plan.names)
    atom = sae.atom_matrices(top[:, t]).detach()  # [B, d_k, d_v]
    rnd = random_rank1(B, [t], d_k, d_v, random_seed)[:, 0]
    draws = torch.randn(len(plan.planted), 2, B, max(d_k, d_v), generator=gen).double()
    planted_draws = [(d[0, :, :d_k], d[1, :, :d_v]) for d in draws]
    info: dict[str, Tensor] = {}
    conditions = _conditions_hook(plan, sae, atom, top_c[:, t], rnd, planted_draws, info)
    stop = t + 1 if plan.kl_position == "edited" else T
    write_hook = sae.cfg.write_hook_name
    logits = model.run_with_hooks(
        x[:, t:stop].repeat(R, 1),
        state=None if state is None else state.tile(R),
        fwd_hooks=[(write_hook, conditions)],
    )
    lp = torch.log_softmax(logits.double(), -1).view(R, B, stop - t, -1)
    if plan.kl_position == "end":
        lp = lp[:, :, -1:]
    if plan.kl_direction == "native||edited":
        kls = kl(lp[:1], lp[1:])
    else:
        kls = kl(lp[1:], lp[:1])
    return kls.mean(-1), info  # the mean over one position unless kl_position == "mean"


def _collect(
    plan: _Plan,
    model: ModelLike,
    sae: SAELike,
    tokens: Tensor,
    batch_size: int,
    limit: int | float,
    progress: bool,
) -> _Firings:
    """Run every condition at every firing (up to `limit`), prompts in batches advancing from one
    firing position to the next."""
    layer, head = sae_layer(sae), sae.cfg.head
    gen = torch.Generator().manual_seed(plan.seed)
    rec = _Firings({n: [] for n in plan.names[1:]})
    bar = tqdm(
        total=None if limit == math.inf else limit, desc="substitution", disable=not progress
    )
    for start in range(0, tokens.shape[0], batch_size):
        x = tokens[start : start + batch_size]
        codes = sae_codes(model, sae, x, layer, head)  # [B, T, n]
        top = codes.abs().argmax(-1)
        top_c = codes.gather(-1, top[..., None])[..., 0]
        fired = codes.ne(0).any(-1)
        state, prev = None, 0
        for t in plan.positions:
            if rec.n >= limit:
                break
            if not bool(fired[:, t].any()):
                continue
            if t > prev:
                _, state = model(x[:, prev:t], state=state, return_state=True)
                prev = t
            # the random control of the batch starting at prompt `start` draws with seed seed+start
            kls, info = _step(plan, model, sae, x, t, state, top, top_c, plan.seed + start, gen)
            for b in fired[:, t].nonzero()[:, 0].tolist():
                for i, name in enumerate(plan.names[1:]):
                    rec.kls[name].append(float(kls[i, b]))
                rec.cosines.append(float(info["cos"][b]))
                if plan.best_atom:
                    rec.best_cos.append(float(info["best_cos"][b]))
                rec.atoms_active.append(codes[b, t].nonzero()[:, 0].tolist())
                rec.where.append((start + b, t))
                bar.update(1)
        if rec.n >= limit:
            break
    bar.close()
    return rec


def _calibration(rec: _Firings, plan: _Plan, kd: np.ndarray, ka: np.ndarray) -> dict[str, Any]:
    """Win rate against deletion per bin of the atom's cosine to the write, and the planted
    reference curve."""
    cos = np.array(rec.cosines)
    edges = np.array(CALIBRATION_EDGES)
    which = np.clip(np.searchsorted(edges, cos, side="right") - 1, 0, len(edges) - 2)
    bins = [_rate(ka[which == i] < kd[which == i]) for i in range(len(edges) - 1)]
    return dict(
        edges=list(CALIBRATION_EDGES),
        n=[b["n"] for b in bins],
        wins=[b["wins"] for b in bins],
        rate=[b["rate"] for b in bins],
        ci=[b["ci"] for b in bins],
        bin_median_cosine=[
            float(np.median(cos[which == i])) if (which == i).any() else float("nan")
            for i in range(len(edges) - 1)
        ],
        median_cosine=float(np.median(cos)),
        planted={f"{c:g}": _rate(np.array(rec.kls[f"planted_{c:g}"]) < kd) for c in plan.planted},
    )


def _population(
    rec: _Firings, wins: np.ndarray, max_per_atom: int, min_firings: int, seed: int
) -> dict[str, Any]:
    """Per-atom win rates against deletion: each firing counts for every atom active there."""
    per_atom: dict[int, list[bool]] = defaultdict(list)
    for f, active in enumerate(rec.atoms_active):
        for a in active:
            if len(per_atom[a]) < max_per_atom:
                per_atom[a].append(bool(wins[f]))
    rates = {a: float(np.mean(v)) for a, v in per_atom.items() if len(v) >= min_firings}
    vals = np.array(list(rates.values()))
    return dict(
        n_atoms=len(rates),
        n_firings=int(sum(len(per_atom[a]) for a in rates)),
        mean_win_rate_vs_delete=float(vals.mean()) if len(vals) else float("nan"),
        ci=bootstrap_mean_ci(vals, seed=seed) if len(vals) else (float("nan"),) * 2,
        median=float(np.median(vals)) if len(vals) else float("nan"),
        per_atom=rates,
    )


def _result(rec: _Firings, plan: _Plan, settings: dict[str, Any]) -> SubstitutionResult:
    """The summary of the recorded firings."""
    ka, kd, kr = (np.array(rec.kls[k]) for k in ("atom", "delete", "random"))
    n = len(ka)
    if n == 0:
        raise ValueError("the SAE never fired on these tokens; nothing to evaluate")
    wd, wr = int((ka < kd).sum()), int((ka < kr).sum())
    sweep_out = {scale_label(plan.scale): dict(_rate(ka < kd), median_kl=float(np.median(ka)))}
    for s in plan.sweep:
        ks = np.array(rec.kls[f"atom_{scale_label(s)}"])
        sweep_out[scale_label(s)] = dict(_rate(ks < kd), median_kl=float(np.median(ks)))
    best = None
    if plan.best_atom:
        best = dict(
            _rate(np.array(rec.kls["best_atom"]) < kd), median_cosine=float(np.median(rec.best_cos))
        )
    return SubstitutionResult(
        n=n,
        wins_vs_delete=wd,
        win_rate_vs_delete=wd / n,
        ci_vs_delete=wilson(wd, n),
        wins_vs_random=wr,
        win_rate_vs_random=wr / n,
        ci_vs_random=wilson(wr, n),
        strict_chain=float(((ka < kd) & (kd < kr)).mean()),
        median_kl={k: float(np.median(v)) for k, v in rec.kls.items()},
        kl=rec.kls,
        firings=rec.where,
        cosine=rec.cosines,
        calibration=_calibration(rec, plan, kd, ka),
        best_atom=best,
        scale_sweep=sweep_out,
        settings=settings,
    )


@torch.no_grad()
def evaluate_substitution(
    model: ModelLike,
    sae: SAELike,
    tokens: Int[Tensor, "batch pos"],
    *,
    max_firings: int | None = 1000,
    positions_per_prompt: int | None = None,
    min_position: int = 1,
    scale: str | float = "matched_norm",
    kl_direction: str = "native||edited",
    kl_position: str = "edited",
    best_atom: bool = False,
    planted_cosines: Sequence[float] = (),
    sweep_scales: Sequence[str | float] = (),
    population: bool = False,
    max_per_atom: int = 30,
    min_firings_per_atom: int = 5,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    allow_other_model: bool = False,
) -> SubstitutionResult:
    """Single-write replacement test: at each firing, is the top atom a better write than none?

    At a firing (prompt b, position t: the SAE has a nonzero code at t for its head), the native
    write D of the SAE's head at t is replaced, one condition at a time, by:

    * atom: the top atom A = u_j w_j^T, scaled by `scale`: `"matched_norm"` (sign(c) ||D||_F
      A/||A||, App. J), `"coefficient"` (c A, the abstract) or a float f (sign(c) f ||D||_F
      A/||A||, a fraction of the native norm);
    * delete: nothing (the write removed);
    * random: a random rank-1 matrix g h^T at the atom condition's Frobenius norm;

    and optional controls, each at the atom condition's norm, so that only the direction differs:
    `best_atom` (the dictionary atom with the largest |cosine| to D, signed to align with it: what
    the dictionary could do at best), `planted_cosines` (rank-1 substitutes whose cosine to D is
    exactly c: the reference curve for the win rate against cosine), and `sweep_scales` (the top
    atom at other scales, against the same deletion).

    Each condition is scored by the KL divergence between the native and the edited next-token
    distributions (`kl_direction`), at `kl_position`: `"edited"` (position t, the first read of the
    edited write), `"end"` (the last position of the prompt) or `"mean"` (the mean over t to the
    end of the prompt). The conditions reuse the clean prefix: the model state before t is
    computed once (prompts advance in batches from one firing position to the next) and all
    conditions run from it in one batch (one step for `"edited"`, to the end of the prompt
    otherwise).

    Args:
        tokens: held-out prompts `[batch, pos]` (equal length).
        max_firings: stop after this many firings (None: all).
        positions_per_prompt: evaluate this many positions per prompt, spread evenly from
            `min_position` (None: every position). Fewer positions cost fewer steps.
        population: also report per-atom win rates (paper section 3.2): each firing counts for
            every atom active there; atoms with at least `min_firings_per_atom` firings (at most
            `max_per_atom` each) enter the mean.
    """
    check_model(model, sae, allow_other_model)
    if sae.cfg.write_hook_name not in model.hook_dict:
        raise ValueError(
            f"{sae.cfg.write_hook_name} is not a hook of this model (SAE hook {sae.cfg.hook_name})"
        )
    settings = dict(
        layer=sae_layer(sae), head=sae.cfg.head, scale=scale_label(scale),
        kl_direction=kl_direction, kl_position=kl_position,
        positions_per_prompt=positions_per_prompt, min_position=min_position,
        max_firings=max_firings, seed=seed, n_prompts=int(tokens.shape[0]),
        prompt_length=int(tokens.shape[1]),
    )  # fmt: skip
    plan = _plan(
        scale, sweep_scales, planted_cosines, best_atom, kl_direction, kl_position,
        tokens.shape[1], positions_per_prompt, min_position, seed,
    )  # fmt: skip
    limit = float(max_firings) if max_firings is not None else math.inf
    rec = _collect(plan, model, sae, tokens, batch_size, limit, progress)
    result = _result(rec, plan, settings)
    if population:
        wins = np.array(rec.kls["atom"]) < np.array(rec.kls["delete"])
        result.population = _population(rec, wins, max_per_atom, min_firings_per_atom, seed)
    return result
