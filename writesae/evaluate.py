"""WriteSAE evaluations: single-write substitution, closed-form logit shift, behavioural install.

Section numbers refer to the method specification (writesae_method.md section 4). Every choice the
paper leaves open is a parameter whose default is the paper-faithful reading:

* substitution scale: `"matched_norm"` (App. J: the atom at the native write's Frobenius norm),
  `"coefficient"` (the abstract: the atom's code) or a fraction of the native write's norm;
* KL direction: `"native||edited"` (reference code, `kl_div(native, cond)`) or `"edited||native"`;
* KL position: `"edited"` (the edited token's own next-token distribution, the first read of the
  edited state), `"end"` (the end of the prompt) or `"mean"` (the mean over the rest of the prompt);
* closed form: `method="direct"` (the paper's Eq. 1, direct path) or `"first_order"` (the exact
  derivative through everything after the read, `writesae.closed_form`); eps relative to the
  native write's norm (default) or absolute; direct-path propagator `"gate"` (the paper's scalar
  decay product G) or `"exact"` (the transition product, with the delta rule's erase projections);
* install: additive, at consecutive positions starting at the first generated token, norm
  ||k v^T|| (no beta), key signed by the query, value direction by its first-order effect.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from writesae.stats import bootstrap_mean_ci, r_squared, wilson

__all__ = [
    "SubstitutionResult",
    "evaluate_substitution",
    "closed_form_logit_shift",
    "ClosedFormResult",
    "evaluate_closed_form",
    "InstallResult",
    "evaluate_install",
    "target_direction",
    "install_geometry",
    "median_decays",
    "memory_cell",
    "scale_label",
]

logger = logging.getLogger(__name__)


def _check_model(model: Any, sae: Any, allow_other_model: bool) -> None:
    """`sae.check_model` for an SAE and a model with a config (not for bare directions or the
    read-out stubs of the tests, which have neither a config nor a fingerprint)."""
    if hasattr(sae, "check_model") and getattr(model, "cfg", None) is not None:
        sae.check_model(model, allow_other_model=allow_other_model)


def _layer(sae: Any) -> int:
    return int(sae.cfg.hook_prefix.split(".")[1])


def _kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p || q) from log-probabilities, over the last axis."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


# ------------------------------------------------------------------------------ substitution
@dataclass
class SubstitutionResult:
    """Outcome of the single-write replacement test (section 4.3).

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
        population: per-atom rates when `population=True` (section 4.4): number of atoms, mean of
            per-atom win rates vs deletion with a bootstrap 95% interval, and per-atom rates.
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


def _parse_scale(scale: str | float) -> str | float:
    """ "matched_norm", "coefficient", or a positive fraction of the native write's norm."""
    if scale in ("matched_norm", "coefficient"):
        return scale  # type: ignore[return-value]
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


def _scaled(atom: Tensor, c: Tensor, norm: Tensor, scale: str | float) -> Tensor:
    """The atom [B, d_k, d_v] scaled for substitution: sign(c) ||D|| A/||A|| (matched norm),
    c A (coefficient), or sign(c) f ||D|| A/||A|| (a fraction f of the native norm)."""
    if scale == "coefficient":
        return c.to(atom.dtype)[:, None, None] * atom
    f = 1.0 if scale == "matched_norm" else float(scale)
    sign = torch.where(c < 0, -1.0, 1.0).to(atom.dtype)[:, None, None]
    a_norm = atom.flatten(-2).norm(dim=-1).clamp_min(1e-30)[:, None, None]
    return sign * f * norm[:, None, None] * atom / a_norm


def _fro_cos(a: Tensor, b: Tensor) -> Tensor:
    """Frobenius cosine of [..., d_k, d_v] matrices."""
    num = (a * b).flatten(-2).sum(-1)
    return num / (a.flatten(-2).norm(dim=-1) * b.flatten(-2).norm(dim=-1)).clamp_min(1e-30)


def _dictionary_cosines(sae: Any, W: Tensor) -> Tensor:
    """|<A_j, W>_F| / (||A_j|| ||W||) signed, for every atom j: [B, n_atoms] (W [B, d_k, d_v])."""
    W = W.to(sae.b_enc.dtype)
    try:
        U, V = sae.key_factors.detach(), sae.value_factors.detach()
        inner = torch.einsum("nk,bkn->bn", U, W @ V.T)
        norms = U.norm(dim=-1) * V.norm(dim=-1)
    except (AttributeError, NotImplementedError):
        A = sae.atom_matrices(torch.arange(sae.cfg.n_atoms)).detach().flatten(-2)
        inner = W.flatten(-2) @ A.T
        norms = A.norm(dim=-1)
    return inner / (norms[None] * W.flatten(-2).norm(dim=-1)[:, None]).clamp_min(1e-30)


def _planted(W: Tensor, c: float, g: Tensor, h: Tensor) -> Tensor:
    """A unit rank-1 matrix whose Frobenius cosine to the rank-1 write W is exactly c.

    With W = s k1 v1^T (top singular pair): (sqrt(c) k1 + sqrt(1-c) g)(sqrt(c) v1 + sqrt(1-c) h)^T,
    g (h) a random unit vector orthogonal to k1 (v1).
    """
    Ws = W.double()
    Uw, S, Vh = torch.linalg.svd(Ws)
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


def _codes(model: Any, sae: Any, tokens: Tensor, layer: int, head: int) -> Tensor:
    """SAE codes [batch, pos, n_atoms] of the clean run."""
    prefix = f"blocks.{layer}.attn"
    mixer = model.blocks[layer].attn
    if sae.cfg.input_kind == "state":
        _, cache = model.run_with_cache(tokens, names_filter=[f"{prefix}.hook_state"])
        x = cache[f"{prefix}.hook_state"][:, :, head]
        return sae.encode(x.to(sae.b_enc.dtype))
    names = [f"{prefix}.hook_k", f"{prefix}.hook_v"]
    if mixer.write_strength_hook:
        names.append(f"{prefix}.{mixer.write_strength_hook}")
    _, cache = model.run_with_cache(tokens, names_filter=names)
    key = cache[f"{prefix}.hook_k"][:, :, head]
    if mixer.write_strength_hook:
        s = cache[f"{prefix}.{mixer.write_strength_hook}"][:, :, head]
        key = key * s[..., None]
    return sae.encode_factors(key.to(sae.b_enc.dtype), cache[f"{prefix}.hook_v"][:, :, head])


@torch.no_grad()
def evaluate_substitution(
    model: Any,
    sae: Any,
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
        population: also report per-atom win rates (section 4.4): each firing counts for every
            atom active there; atoms with at least `min_firings_per_atom` firings (at most
            `max_per_atom` each) enter the mean.
    """
    _check_model(model, sae, allow_other_model)
    scale = _parse_scale(scale)
    sweep = [_parse_scale(s) for s in sweep_scales]
    sweep = [s for s in dict.fromkeys(sweep) if s != scale]
    planted_cosines = [float(c) for c in planted_cosines]
    if any(not 0.0 <= c <= 1.0 for c in planted_cosines):
        raise ValueError(f"planted cosines must lie in [0, 1], got {planted_cosines}")
    if kl_direction not in ("native||edited", "edited||native"):
        raise ValueError("kl_direction must be 'native||edited' or 'edited||native'")
    if kl_position not in KL_POSITIONS:
        raise ValueError(f"kl_position must be one of {KL_POSITIONS}, not {kl_position!r}")
    layer, head = _layer(sae), sae.cfg.head
    write_hook = f"blocks.{layer}.attn.hook_write"
    if write_hook not in model.hook_dict:
        raise ValueError(f"{write_hook} is not a hook of this model (SAE hook {sae.cfg.hook_name})")
    T = tokens.shape[1]
    pos_list = list(range(min_position, T))
    if positions_per_prompt is not None and positions_per_prompt < len(pos_list):
        idx = np.linspace(0, len(pos_list) - 1, positions_per_prompt).round().astype(int)
        pos_list = sorted({pos_list[i] for i in idx})
    names = ["native", "atom", "delete", "random"]
    if best_atom:
        names.append("best_atom")
    names += [f"planted_{c:g}" for c in planted_cosines]
    names += [f"atom_{scale_label(s)}" for s in sweep]
    R = len(names)
    gen = torch.Generator().manual_seed(seed)
    kls: dict[str, list[float]] = {n: [] for n in names[1:]}
    cosines: list[float] = []
    best_cos: list[float] = []
    atoms_active: list[list[int]] = []
    where: list[tuple[int, int]] = []
    limit = max_firings if max_firings is not None else math.inf
    bar = tqdm(
        total=None if limit == math.inf else limit, desc="substitution", disable=not progress
    )

    for start in range(0, tokens.shape[0], batch_size):
        if len(kls["atom"]) >= limit:
            break
        x = tokens[start : start + batch_size]
        B = x.shape[0]
        codes = _codes(model, sae, x, layer, head)  # [B, T, n]
        top = codes.abs().argmax(-1)
        top_c = codes.gather(-1, top[..., None])[..., 0]
        fired = codes.ne(0).any(-1)
        state, prev = None, 0
        for t in pos_list:
            if len(kls["atom"]) >= limit:
                break
            if not bool(fired[:, t].any()):
                continue
            if t > prev:
                _, state = model(x[:, prev:t], state=state, return_state=True)
                prev = t
            atom = sae.atom_matrices(top[:, t]).detach()  # [B, d_k, d_v]
            draws = torch.randn(
                1 + len(planted_cosines), 2, B, max(sae.cfg.d_k, sae.cfg.d_v), generator=gen
            ).double()
            rnd = (draws[0, 0, :, : sae.cfg.d_k], draws[0, 1, :, : sae.cfg.d_v])
            planted_draws = [(d[0, :, : sae.cfg.d_k], d[1, :, : sae.cfg.d_v]) for d in draws[1:]]
            info: dict[str, Tensor] = {}
            conditions = _conditions_hook(
                sae, B, head, atom, top_c[:, t], rnd, scale, best_atom, planted_cosines,
                planted_draws, sweep, info,
            )  # fmt: skip
            stR = None if state is None else _tile(state, R)
            stop = t + 1 if kl_position == "edited" else T
            logits = model.run_with_hooks(
                x[:, t:stop].repeat(R, 1), state=stR, fwd_hooks=[(write_hook, conditions)]
            )
            lp = torch.log_softmax(logits.double(), -1).view(R, B, stop - t, -1)
            if kl_position == "end":
                lp = lp[:, :, -1:]
            for i, name in enumerate(names[1:], start=1):
                if kl_direction == "native||edited":
                    k = _kl(lp[0], lp[i])
                else:
                    k = _kl(lp[i], lp[0])
                k = k.mean(-1)  # one position unless kl_position == "mean"
                for b in range(B):
                    if fired[b, t]:
                        kls[name].append(float(k[b]))
            for b in range(B):
                if fired[b, t]:
                    cosines.append(float(info["cos"][b]))
                    if best_atom:
                        best_cos.append(float(info["best_cos"][b]))
                    atoms_active.append(codes[b, t].nonzero()[:, 0].tolist())
                    where.append((start + b, t))
                    bar.update(1)
    bar.close()

    ka, kd, kr = (np.array(kls[k]) for k in ("atom", "delete", "random"))
    n = len(ka)
    if n == 0:
        raise ValueError("the SAE never fired on these tokens; nothing to evaluate")
    wd, wr = int((ka < kd).sum()), int((ka < kr).sum())
    cos = np.array(cosines)
    edges = np.array(CALIBRATION_EDGES)
    which = np.clip(np.searchsorted(edges, cos, side="right") - 1, 0, len(edges) - 2)
    bins = [_rate(ka[which == i] < kd[which == i]) for i in range(len(edges) - 1)]
    calibration = dict(
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
        planted={f"{c:g}": _rate(np.array(kls[f"planted_{c:g}"]) < kd) for c in planted_cosines},
    )
    sweep_out = {scale_label(scale): dict(_rate(ka < kd), median_kl=float(np.median(ka)))}
    for s in sweep:
        ks = np.array(kls[f"atom_{scale_label(s)}"])
        sweep_out[scale_label(s)] = dict(_rate(ks < kd), median_kl=float(np.median(ks)))
    best = None
    if best_atom:
        kb = np.array(kls["best_atom"])
        best = dict(_rate(kb < kd), median_cosine=float(np.median(best_cos)))
    result = SubstitutionResult(
        n=n,
        wins_vs_delete=wd,
        win_rate_vs_delete=wd / n,
        ci_vs_delete=wilson(wd, n),
        wins_vs_random=wr,
        win_rate_vs_random=wr / n,
        ci_vs_random=wilson(wr, n),
        strict_chain=float(((ka < kd) & (kd < kr)).mean()),
        median_kl={k: float(np.median(v)) for k, v in kls.items()},
        kl=kls,
        firings=where,
        cosine=cosines,
        calibration=calibration,
        best_atom=best,
        scale_sweep=sweep_out,
        settings=dict(
            layer=layer,
            head=head,
            scale=scale_label(scale),
            kl_direction=kl_direction,
            kl_position=kl_position,
            positions_per_prompt=positions_per_prompt,
            min_position=min_position,
            max_firings=max_firings,
            seed=seed,
            n_prompts=int(tokens.shape[0]),
            prompt_length=int(T),
        ),
    )
    if population:
        per_atom: dict[int, list[bool]] = defaultdict(list)
        for f, active in enumerate(atoms_active):
            for a in active:
                if len(per_atom[a]) < max_per_atom:
                    per_atom[a].append(bool(ka[f] < kd[f]))
        rates = {
            a: float(np.mean(v)) for a, v in per_atom.items() if len(v) >= min_firings_per_atom
        }
        vals = np.array(list(rates.values()))
        result.population = dict(
            n_atoms=len(rates),
            n_firings=int(sum(len(per_atom[a]) for a in rates)),
            mean_win_rate_vs_delete=float(vals.mean()) if len(vals) else float("nan"),
            ci=bootstrap_mean_ci(vals, seed=seed) if len(vals) else (float("nan"),) * 2,
            median=float(np.median(vals)) if len(vals) else float("nan"),
            per_atom=rates,
        )
    return result


def _conditions_hook(
    sae: Any,
    B: int,
    head: int,
    atom: Tensor,
    c: Tensor,
    rnd: tuple[Tensor, Tensor],
    scale: str | float,
    best_atom: bool,
    planted_cosines: Sequence[float],
    planted_draws: Sequence[tuple[Tensor, Tensor]],
    sweep: Sequence[str | float],
    info: dict[str, Tensor],
):
    """The write hook of one substitution step: blocks of B rows [native, atom, delete, random,
    (best atom), (planted c ...), (atom at each sweep scale)], edited at the first position only.
    Stores the atom's cosine to the write (and the best atom's) in `info`."""

    def unit_rank1(g: Tensor, h: Tensor) -> Tensor:
        return (g / g.norm(dim=-1, keepdim=True))[:, :, None] * (h / h.norm(dim=-1, keepdim=True))[
            :, None, :
        ]

    def conditions(w: Tensor, hook: Any) -> Tensor:
        native = w[:B, 0, head]
        norm = native.flatten(-2).norm(dim=-1)
        a = atom.to(w.dtype)
        a_scaled = _scaled(a, c, norm, scale)
        a_norm = a_scaled.flatten(-2).norm(dim=-1)[:, None, None]
        info["cos"] = _fro_cos(a_scaled.double(), native.double())
        reps = [a_scaled, torch.zeros_like(native), a_norm * unit_rank1(*rnd).to(w.dtype)]
        if best_atom:
            cos_all = _dictionary_cosines(sae, native)
            j = cos_all.abs().argmax(-1)
            cj = cos_all.gather(-1, j[:, None])[:, 0]
            info["best_cos"] = cj.abs().double()
            best = sae.atom_matrices(j).detach().to(w.dtype)
            best = best / best.flatten(-2).norm(dim=-1).clamp_min(1e-30)[:, None, None]
            reps.append(torch.where(cj < 0, -1.0, 1.0).to(w.dtype)[:, None, None] * a_norm * best)
        for cp, (g, h) in zip(planted_cosines, planted_draws, strict=True):
            reps.append(a_norm * _planted(native, cp, g, h))
        for s in sweep:
            reps.append(_scaled(a, c, norm, s))
        out = w.clone()
        for i, r in enumerate(reps, start=1):
            out[i * B : (i + 1) * B, 0, head] = r
        return out

    return conditions


def _tile(state: Any, n: int) -> Any:
    """The state with the whole batch stacked n times (rows [batch] * n)."""
    from hooked_recurrent.state import RecurrentState

    return RecurrentState(
        state.offset,
        [
            {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in layer.items()}
            for layer in state.layers
        ],
    )


# ------------------------------------------------------------------------------ closed form
CLOSED_FORM_METHODS = ("direct", "first_order")


def _cf_cache(model: Any, tokens: Tensor, layer: int) -> tuple[Tensor, Any]:
    """Clean logits and the cache of the layer's hooks (no d_k x d_v matrices)."""
    prefix = f"blocks.{layer}.attn"
    return model.run_with_cache(
        tokens,
        names_filter=lambda n: (
            n.startswith(prefix + ".hook_") and not n.endswith(("hook_write", "hook_state"))
        ),
    )


def _unit_shifts(
    model: Any,
    cache: Any,
    tokens: Tensor,
    layer: int,
    head: int,
    u: Tensor,
    w: Tensor,
    position: int,
    read_position: int,
    token: Tensor,
    method: str,
    propagator: str,
    state: Any = None,
    rows: Tensor | None = None,
) -> Tensor:
    """Predicted logit shift per unit (absolute) eps of the edits u w^T, one per row.

    `u` `[n, d_k]`, `w` `[n, d_v]`, `token` `[n]` or `[n, m]`; returns `[n]` or `[n, m]`. Row i is
    in prompt `rows[i]` of `cache` (default i); `tokens` and `state` are given per row.
    """
    from writesae import closed_form as C

    if method == "direct":
        d_o = C.read_response(
            model, cache, layer, head, position, read_position, u, w, rows, propagator
        )
        # <P u, q_t> is the coefficient of w in dO_t
        coef = (d_o[:, -1] * w.double()).sum(-1) / w.double().pow(2).sum(-1).clamp_min(1e-300)
        out_dir = C.direct_readout(model, layer, head, w, token)
        return coef[:, None] * out_dir if out_dir.dim() == 2 else coef * out_dir
    if method == "first_order":
        d_o = C.read_response(model, cache, layer, head, position, read_position, u, w, rows)
        _, d = C.read_jvp(model, tokens[:, : read_position + 1], layer, head, position, d_o, state)
        d_last = d[:, -1].double()  # [B, vocab]
        if token.dim() == 1:
            return d_last.gather(-1, token[:, None])[:, 0]
        return d_last.gather(-1, token)
    raise ValueError(f"method must be one of {CLOSED_FORM_METHODS}, not {method!r}")


@torch.no_grad()
def closed_form_logit_shift(
    model: Any,
    sae: Any,
    layer: int,
    head: int,
    atom: int | Sequence[int],
    position: int,
    token: int | Sequence[int] | Tensor,
    *,
    tokens: Int[Tensor, "batch pos"],
    read_position: int | None = None,
    eps: float = 0.1,
    eps_scale: str = "write_norm",
    method: str = "first_order",
    propagator: str = "gate",
    cache: Any = None,
) -> Tensor:
    """Predicted logit shift of `token` at `read_position` from adding eps u_i w_i^T to the write
    (equivalently the state) of head `head` at `position`, in every prompt (section 4.8).

    * `method="direct"` (the paper's Eq. 1): eps <G u_i, q_t> <W_O^(h) w_i, W_U[token]>, with G
      the product of the head's decays from position+1 to t (`propagator="gate"`, per key channel
      for RWKV-7) or the exact transition product including the erase terms (`"exact"`). It
      treats the per-head norm and gate, the later layers and the final norm as the identity, so
      it is exact only for a linear read-out.
    * `method="first_order"`: eps times the exact derivative of the logit along the edit, through
      everything after the read (see `writesae.closed_form`); forward-mode AD, one pass for all
      prompts. `propagator` is not used (the layer's response is always exact).

    `eps` is relative to the Frobenius norm of the head's native write at `position` in each
    prompt (`eps_scale="write_norm"`, the default: eps = 0.1 edits a tenth of what the token
    wrote) or absolute (`eps_scale="absolute"`). No fitted parameter.

    With a list of atoms, all (atom, prompt) edits run as one batch (one forward pass with a dual
    tensor for `"first_order"`).

    Returns:
        `[batch]` (or `[batch, n_tokens]`) predicted shifts, one per prompt; with a list of atoms,
        `[n_atoms, batch]` (or `[n_atoms, batch, n_tokens]`).
    """
    from writesae.closed_form import EPS_SCALES, native_write_norm, prefix_state

    if eps_scale not in EPS_SCALES:
        raise ValueError(f"eps_scale must be one of {EPS_SCALES}, not {eps_scale!r}")
    if method not in CLOSED_FORM_METHODS:
        raise ValueError(f"method must be one of {CLOSED_FORM_METHODS}, not {method!r}")
    if propagator not in ("gate", "exact"):
        raise ValueError(f"propagator must be 'gate' or 'exact', not {propagator!r}")
    t = position if read_position is None else read_position
    if t < position:
        raise ValueError(f"read_position {t} is before the edited position {position}")
    if cache is None:
        _, cache = _cf_cache(model, tokens, layer)
    B = tokens.shape[0]
    many = not isinstance(atom, int)
    atoms = torch.as_tensor(list(atom) if many else [atom]).long()
    nA = len(atoms)
    rows = torch.arange(B).repeat(nA)  # edit i: atom i // B in prompt i % B
    u = sae.key_factors.detach()[atoms].double().repeat_interleave(B, 0)
    w = sae.value_factors.detach()[atoms].double().repeat_interleave(B, 0)
    tok = torch.as_tensor(token).long()
    scalar_tok = tok.dim() == 0
    tok_b = tok.expand(B * nA) if scalar_tok else tok.expand(B * nA, -1)
    state = None
    if method == "first_order":
        state = prefix_state(model, tokens, position)
        if state is not None and nA > 1:
            state = _tile(state, nA)
    unit = _unit_shifts(
        model, cache, tokens[rows], layer, head, u, w, position, t, tok_b, method, propagator,
        state, rows,
    )  # fmt: skip
    scale = torch.full((B * nA,), float(eps), dtype=torch.float64)
    if eps_scale == "write_norm":
        atom_norm = u.norm(dim=-1) * w.norm(dim=-1)
        scale = scale * native_write_norm(model, cache, layer, head)[rows, position] / atom_norm
    out = scale * unit if scalar_tok else scale[:, None] * unit
    out = out.view(nA, B, *out.shape[1:])
    return out if many else out[0]


@dataclass
class ClosedFormResult:
    """Predicted against measured logit shifts (section 4.8), for each prediction method.

    Attributes:
        r2: zero-parameter R^2 of the first-order prediction (or of the only method run) at
            `headline_eps`, over all (atom, prompt) points of that eps.
        r2_direct: zero-parameter R^2 of the paper's direct-path formula at `headline_eps`
            (NaN when not run).
        headline_eps: the eps of `r2` and `r2_direct` (relative to the native write's norm unless
            `settings["eps_scale"]` is "absolute").
        r2_by_eps: {method: {eps: R^2}}, zero parameters, each over the (atom, prompt) points of
            one eps.
        r2_cells: per (atom, eps) cell R^2 across prompts, of the headline method: median, IQR,
            all values.
        linearity_r2: the paper's fitted-G R^2 (App. A): one least-squares scale G per (prompt,
            atom, token) across the eps values, on the direct-path formula. It checks that the
            measured shift is linear in eps, not that the formula predicts it.
        r2_fitted_scale: R^2 of the direct path with one least-squares scale per (atom, eps) cell.
        sign_agreement: {method: fraction of headline-eps points where prediction and measurement
            share a sign}.
        predicted, measured, point_eps: every point of the headline method (all eps values);
            `predicted_by_method` has each method's predictions for the same points.
    """

    r2: float
    r2_direct: float
    headline_eps: float
    r2_by_eps: dict[str, dict[float, float]]
    r2_cells: dict[str, Any]
    linearity_r2: float
    r2_fitted_scale: float
    sign_agreement: dict[str, float]
    n_points: int
    predicted: list[float] = field(repr=False)
    measured: list[float] = field(repr=False)
    point_eps: list[float] = field(repr=False, default_factory=list)
    predicted_by_method: dict[str, list[float]] = field(repr=False, default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_samples: bool = False) -> dict[str, Any]:
        """The result as a dict (the scatter points only with `with_samples=True`)."""
        d = asdict(self)
        d["r2_by_eps"] = {m: {str(e): r for e, r in v.items()} for m, v in self.r2_by_eps.items()}
        if not with_samples:
            for k in ("predicted", "measured", "point_eps", "predicted_by_method"):
                d.pop(k)
        return d


@torch.no_grad()
def evaluate_closed_form(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    atoms: Sequence[int] | None = None,
    n_atoms: int = 8,
    eps_values: Sequence[float] = (0.01, 0.1, 1.0),
    eps_scale: str = "write_norm",
    headline_eps: float | None = None,
    methods: Sequence[str] = ("first_order", "direct"),
    position: int | None = None,
    read_offset: int = 0,
    propagator: str = "gate",
    progress: bool = True,
    allow_other_model: bool = False,
) -> ClosedFormResult:
    """R^2 of `closed_form_logit_shift` against shifts measured by editing the write.

    For each atom (default: the `n_atoms` with the largest decoder read-out norm
    ||W_U W_O w_i||) and each eps, eps u_i w_i^T is added to the SAE head's write at `position`
    (default: the middle of the prompts) in every prompt (with `eps_scale="write_norm"`, eps times
    that prompt's native write norm); the logit of the atom's eval token (the token with the
    largest |<W_O w_i, W_U[tok]>|, the paper's top-1 eval token) is measured at
    `position + read_offset` with the model itself and compared with each method's prediction.
    Both predictions are linear in eps: the first-order one is computed once per atom.
    """
    _check_model(model, sae, allow_other_model)
    from writesae.closed_form import EPS_SCALES, native_write_norm, prefix_state, run_from

    if eps_scale not in EPS_SCALES:
        raise ValueError(f"eps_scale must be one of {EPS_SCALES}, not {eps_scale!r}")
    methods = list(methods)
    if not methods or any(m not in CLOSED_FORM_METHODS for m in methods):
        raise ValueError(f"methods must be a non-empty subset of {CLOSED_FORM_METHODS}")
    eps_values = [float(e) for e in eps_values]
    if headline_eps is None:
        headline_eps = 0.1 if 0.1 in eps_values else eps_values[len(eps_values) // 2]
    if headline_eps not in eps_values:
        raise ValueError(f"headline_eps {headline_eps} is not one of eps_values {eps_values}")
    layer, head = _layer(sae), sae.cfg.head
    prefix = f"blocks.{layer}.attn"
    B, T = tokens.shape
    t0 = T // 2 if position is None else position
    t = t0 + read_offset
    if not 0 <= t0 <= t < T:
        raise ValueError(f"positions {t0}..{t} outside prompts of length {T}")
    W_O = model.blocks[layer].attn.head_output_weight(head).double()
    W_U = model.unembed.weight.double()
    readout = W_U @ (W_O @ sae.value_factors.double().T)  # [vocab, n_atoms]
    if atoms is None:
        atoms = readout.norm(dim=0).argsort(descending=True)[:n_atoms].tolist()
    _, cache = _cf_cache(model, tokens, layer)
    state = prefix_state(model, tokens, t0)
    logits0 = run_from(model, tokens[:, : t + 1], t0, state=state)[:, -1].double()
    wnorm = native_write_norm(model, cache, layer, head)[:, t0]
    head_m = "first_order" if "first_order" in methods else methods[0]
    pts: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    direct_unit: list[np.ndarray] = []
    meas: list[np.ndarray] = []
    eps_of: list[np.ndarray] = []
    cell_of: list[np.ndarray] = []
    prompt_of: list[np.ndarray] = []
    bar = tqdm(total=len(atoms) * len(eps_values), desc="closed form", disable=not progress)
    for ci, a in enumerate(atoms):
        tok = int(readout[:, a].abs().argmax())
        u = sae.key_factors[a].detach().double()
        w = sae.value_factors[a].detach().double()
        uB, wB = u.expand(B, -1), w.expand(B, -1)
        tokB = torch.full((B,), tok, dtype=torch.long)
        unit = {
            m: _unit_shifts(
                model, cache, tokens, layer, head, uB, wB, t0, t, tokB, m, propagator, state
            )
            for m in methods
        }
        d_unit = (
            unit["direct"]
            if "direct" in unit
            else _unit_shifts(
                model, cache, tokens, layer, head, uB, wB, t0, t, tokB, "direct", propagator
            )
        )
        atom_norm = float(u.norm() * w.norm())
        for eps in eps_values:
            scale = torch.full((B,), eps, dtype=torch.float64)
            if eps_scale == "write_norm":
                scale = scale * wnorm / atom_norm

            def add(wr: Tensor, hook: Any, u=u, w=w, scale=scale) -> Tensor:
                on = (hook.positions == t0).nonzero()
                if len(on) == 0:
                    return wr
                wr = wr.clone()
                edit = scale[:, None, None] * torch.outer(u, w)
                wr[:, int(on[0, 0]), head] += edit.to(wr.dtype)
                return wr

            logits = run_from(
                model, tokens[:, : t + 1], t0, [(f"{prefix}.hook_write", add)], state
            )[:, -1].double()
            meas.append((logits[:, tok] - logits0[:, tok]).numpy())
            for m in methods:
                pts[m].append((scale * unit[m]).numpy())
            direct_unit.append((scale * d_unit).numpy())
            eps_of.append(np.full(B, eps))
            cell_of.append(np.full(B, ci))
            prompt_of.append(np.arange(B))
            bar.update(1)
    bar.close()
    m_all = np.concatenate(meas)
    e_all = np.concatenate(eps_of)
    c_all, p_all = np.concatenate(cell_of), np.concatenate(prompt_of)
    pred = {m: np.concatenate(v) for m, v in pts.items()}
    d_all = np.concatenate(direct_unit)
    hl = e_all == headline_eps
    r2_by_eps = {
        m: {e: r_squared(m_all[e_all == e], pred[m][e_all == e]) for e in eps_values}
        for m in methods
    }
    cells = []
    fit_y, fit_p = [], []
    for ci in range(len(atoms)):
        for e in eps_values:
            sel = (c_all == ci) & (e_all == e)
            cells.append(r_squared(m_all[sel], pred[head_m][sel]))
            pd_ = d_all[sel]
            denom = float(pd_ @ pd_)
            s = float(pd_ @ m_all[sel]) / denom if denom > 0 else 0.0
            fit_y.append(m_all[sel])
            fit_p.append(s * pd_)
    # the paper's fitted G: one scale per (prompt, atom) across the eps values (App. A)
    lin_y, lin_p = [], []
    for ci in range(len(atoms)):
        for b in range(B):
            sel = (c_all == ci) & (p_all == b)
            pd_ = d_all[sel]
            denom = float(pd_ @ pd_)
            g = float(pd_ @ m_all[sel]) / denom if denom > 0 else 0.0
            lin_y.append(m_all[sel])
            lin_p.append(g * pd_)
    finite = np.array([c for c in cells if np.isfinite(c)])
    return ClosedFormResult(
        r2=r2_by_eps[head_m][headline_eps],
        r2_direct=r2_by_eps["direct"][headline_eps] if "direct" in methods else float("nan"),
        headline_eps=headline_eps,
        r2_by_eps=r2_by_eps,
        r2_cells=dict(
            method=head_m,
            median=float(np.median(finite)) if len(finite) else float("nan"),
            iqr=[float(np.quantile(finite, 0.25)), float(np.quantile(finite, 0.75))]
            if len(finite)
            else [float("nan")] * 2,
            values=[float(c) for c in cells],
        ),
        linearity_r2=r_squared(np.concatenate(lin_y), np.concatenate(lin_p)),
        r2_fitted_scale=r_squared(np.concatenate(fit_y), np.concatenate(fit_p)),
        sign_agreement={
            m: float((np.sign(pred[m][hl]) == np.sign(m_all[hl])).mean()) for m in methods
        },
        n_points=len(m_all),
        predicted=pred[head_m].tolist(),
        measured=m_all.tolist(),
        point_eps=e_all.tolist(),
        predicted_by_method={m: v.tolist() for m, v in pred.items()},
        settings=dict(
            layer=layer,
            head=head,
            atoms=list(map(int, atoms)),
            eps_values=list(eps_values),
            eps_scale=eps_scale,
            methods=methods,
            position=t0,
            read_position=t,
            propagator=propagator,
            n_prompts=int(B),
            median_write_norm=float(wnorm.median()),
        ),
    )


# ------------------------------------------------------------------------------ install
def target_direction(model: Any, layer: int, head: int, token: int) -> Tensor:
    """v*_T = W_O^(h)T W_U[T] / ||.||: the value-side direction that most raises token T's logit
    through the direct path (section 4.10)."""
    W_O = model.blocks[layer].attn.head_output_weight(head).float()
    v = W_O.T @ model.unembed.weight[token].float()
    return v / v.norm().clamp_min(1e-12)


INSTALL_DIRECTIONS = ("first_order", "direct")


@torch.enable_grad()
def install_geometry(
    model: Any,
    seq: Int[Tensor, "1 pos"],
    layer: int,
    head: int,
    target: int,
    start: int,
    positions: int,
) -> dict[str, Any]:
    """What the install needs and what bounds it, from one forward and backward pass on `seq`.

    * `direction` `[positions, d_v]`: per position s in `start..start+positions-1`, the unit value
      direction of the head's read that raises sum_s log p(target | s) fastest to first order,
      through the per-head norm and gate, the later layers and the final norm (the gradient of
      that sum with respect to the read, normalised);
    * `gap`: logit(top) - logit(target) at `start` (0 when the target is top);
    * `bound`: the most that rewriting this head's normalised output at `start` can change that gap
      on the direct path (W_O, then the final norm linearised at its current scale): with c the
      head's read-out of the gap's gradient, sqrt(d_v) ||c|| - <c, n_now>. Only for mixers with a
      per-head gated RMSNorm (Qwen3.5 Gated DeltaNet); NaN otherwise.
    """
    prefix = f"blocks.{layer}.attn"
    last = f"blocks.{len(model.blocks) - 1}.hook_resid_post"
    box: dict[str, Tensor] = {}

    def on_read(o: Tensor, hook: Any) -> Tensor:
        box["read"] = o.detach()
        box["d_read"] = torch.zeros_like(o, requires_grad=True)
        return o + box["d_read"]

    def on_resid(r: Tensor, hook: Any) -> Tensor:
        box["d_resid"] = torch.zeros_like(r, requires_grad=True)
        return r + box["d_resid"]

    def grab(name: str):
        def fn(x: Tensor, hook: Any) -> Tensor:
            box[name] = x.detach()
            return x

        return fn

    hooks = [(f"{prefix}.hook_read", on_read), (last, on_resid)]
    mixer = model.blocks[layer].attn
    from hooked_recurrent.components.gated_deltanet import GatedDeltaNet

    gdn = isinstance(mixer, GatedDeltaNet)  # per-head gated RMSNorm: o -> norm_w rms(o) silu(z)
    if gdn:
        hooks.append((f"{prefix}.hook_gate", grab("gate")))
    logits = model.run_with_hooks(seq, fwd_hooks=hooks)[0].float()  # [pos, vocab]
    window = slice(start, start + positions)
    logp = torch.log_softmax(logits[window], -1)[:, target].sum()
    (g_read,) = torch.autograd.grad(logp, box["d_read"], retain_graph=True)
    g = g_read[0, window, head].float()
    direction = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    lg = logits[start].detach()
    top = int(lg.argmax())
    gap = float(lg[top] - lg[target])
    bound = float("nan")
    if gdn:
        (g_res,) = torch.autograd.grad(logits[start, target] - logits[start, top], box["d_resid"])
        d_f = g_res[0, start].double()  # d gap / d final residual
        W_O = mixer.head_output_weight(head).detach().double()
        z = box["gate"][0, start, head].double()
        o = box["read"][0, start, head].double()
        n_now = o * torch.rsqrt(o.pow(2).mean() + mixer.eps)
        c = mixer.norm_w.detach().double() * torch.nn.functional.silu(z) * (W_O.T @ d_f)
        bound = float(math.sqrt(o.shape[-1]) * c.norm() - (c * n_now).sum())
    return dict(direction=direction.detach(), gap=gap, bound=bound, top=top)


@dataclass
class InstallResult:
    """Target inclusion with and without the install (section 4.11).

    Attributes:
        n: number of (prompt, target) trials.
        included_edited, included_native: trials whose continuation contains the target.
        rate_edited, rate_native: the same as fractions, with Wilson 95% intervals.
        median_rank_shift: median of (unedited rank - installed rank) of the target at the first
            edited position (same position, same input tokens; positive = the install raised it).
        rank_improved: fraction of trials where that rank improved.
        median_gap, median_bound: at the first edited position, the median logit gap from the top
            token to the target, and the median of the most one head can change it on the direct
            path (`install_geometry`; NaN where the family has no per-head gated norm).
        n_reachable: trials whose gap is below the bound; `rate_edited_reachable` and
            `rate_native_reachable` are the inclusion rates among them.
    """

    n: int
    included_edited: int
    included_native: int
    rate_edited: float
    rate_native: float
    ci_edited: tuple[float, float]
    ci_native: tuple[float, float]
    median_rank_shift: float
    rank_improved: float = float("nan")
    median_gap: float = float("nan")
    median_bound: float = float("nan")
    n_reachable: int = 0
    rate_edited_reachable: float = float("nan")
    rate_native_reachable: float = float("nan")
    settings: dict[str, Any] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self, with_samples: bool = False) -> dict[str, Any]:
        """The result as a dict (per-trial records only with `with_samples=True`)."""
        d = asdict(self)
        if not with_samples:
            d.pop("trials")
        return d


@torch.no_grad()
def evaluate_install(
    model: Any,
    sae_or_direction: Any,
    prompts: Int[Tensor, "batch pos"],
    targets: Sequence[int] | None = None,
    *,
    layer: int | None = None,
    head: int | None = None,
    positions: int = 3,
    scale: float = 3.0,
    direction: str = "first_order",
    rank_band: tuple[int, int] = (100, 1000),
    n_targets: int = 2,
    max_new_tokens: int = 20,
    seed: int = 0,
    progress: bool = True,
    allow_other_model: bool = False,
) -> InstallResult:
    """Install a target direction during greedy decoding and count target inclusion.

    For each prompt and target token T (default: `n_targets` tokens whose rank under the unedited
    model's next-token distribution at the end of the prompt lies in `rank_band`), the write of the
    head at `positions` consecutive positions s, starting with the first generated token, gets

        scale * ||k_s v_s^T||_F * sign(k^_s . q_s) k^_s v*^T        (additive)

    added: the norm of the native write without its strength (beta for Qwen3.5, dt for Mamba-2),
    as the paper defines it (section 4.11); the native key, signed so that the installed term reads
    positively at s; and v* per position, by `direction`: `"first_order"` (default: the value
    direction that raises log p(T) over the window fastest to first order through the per-head
    norm, gate, later layers and final norm, computed on the unedited continuation; see
    `install_geometry`) or `"direct"` (W_O^T W_U[T] normalised, the paper's direct path). A `[d_v]`
    tensor instead of an SAE installs that fixed direction (give `layer` and `head`).

    The `max_new_tokens` greedy continuation is checked for T against the unedited one; the
    target's rank is compared at the first edited position in both runs (same input tokens), and
    the logit gap to the top token there is reported beside the most this head can change it.
    """
    _check_model(model, sae_or_direction, allow_other_model)
    if direction not in INSTALL_DIRECTIONS:
        raise ValueError(f"direction must be one of {INSTALL_DIRECTIONS}, not {direction!r}")
    if isinstance(sae_or_direction, Tensor):
        if layer is None or head is None:
            raise ValueError("installing a direction tensor needs layer= and head=")
        fixed_dir = sae_or_direction.float()
    else:
        layer = _layer(sae_or_direction) if layer is None else layer
        head = sae_or_direction.cfg.head if head is None else head
        fixed_dir = None
    prefix = f"blocks.{layer}.attn"
    P = prompts.shape[1]
    gen = torch.Generator().manual_seed(seed)
    trials = []
    native_out = model.generate(prompts, max_new_tokens, stop_at_eos=False, verbose=False)
    first_logits = model(prompts)[:, -1].float()
    bar = tqdm(total=prompts.shape[0], desc="install", disable=not progress)
    for b in range(prompts.shape[0]):
        ranks = first_logits[b].argsort(descending=True).argsort()
        if targets is None:
            band = ((ranks >= rank_band[0]) & (ranks < rank_band[1])).nonzero()[:, 0]
            pick = band[torch.randperm(len(band), generator=gen)[:n_targets]].tolist()
        else:
            pick = list(targets)
        seq = native_out[b : b + 1, : P + positions]
        same = native_out[b : b + 1, : P + 1]
        native_at_P = model(same)[0, P].float()
        for T_ in pick:
            geo = install_geometry(model, seq, layer, head, T_, P, positions)
            if fixed_dir is not None:
                v_dir = fixed_dir[None].expand(positions, -1)
            elif direction == "direct":
                v_dir = target_direction(model, layer, head, T_)[None].expand(positions, -1)
            else:
                v_dir = geo["direction"]
            grabbed: dict[str, Tensor] = {}

            def grab(name: str, g=grabbed):
                def fn(x: Tensor, hook: Any) -> Tensor:
                    g[name] = x[:, :, head]
                    return x

                return fn

            def install(w: Tensor, hook: Any, v_dir=v_dir, g=grabbed) -> Tensor:
                rel = hook.positions - P
                on = (rel >= 0) & (rel < positions)
                if not bool(on.any()):
                    return w
                k, q, v = g["k"][:, on].float(), g["q"][:, on].float(), g["v"][:, on].float()
                norm = (k.norm(dim=-1) * v.norm(dim=-1))[..., None, None]  # ||k v^T||, no beta
                k_hat = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                sign = torch.where((k_hat * q).sum(-1) < 0, -1.0, 1.0)[..., None]
                vd = v_dir[rel[on]].to(w.device)  # [n_on, d_v]
                w = w.clone()
                add = scale * norm * (sign * k_hat)[..., :, None] * vd[None, :, None, :]
                w[:, on, head] = w[:, on, head] + add.to(w.dtype)
                return w

            hooks = [
                (f"{prefix}.hook_q", grab("q")),
                (f"{prefix}.hook_k", grab("k")),
                (f"{prefix}.hook_v", grab("v")),
                (f"{prefix}.hook_write", install),
            ]
            edited = model.generate(
                prompts[b : b + 1],
                max_new_tokens,
                stop_at_eos=False,
                verbose=False,
                fwd_hooks=hooks,
            )
            step_logits = model.run_with_hooks(same, fwd_hooks=hooks)[0, P].float()
            native_rank = int((native_at_P > native_at_P[T_]).sum())
            edited_rank = int((step_logits > step_logits[T_]).sum())
            trials.append(
                dict(
                    prompt=b,
                    target=int(T_),
                    initial_rank=int(ranks[T_]),
                    native_rank_first_edit=native_rank,
                    edited_rank_first_edit=edited_rank,
                    gap=geo["gap"],
                    bound=geo["bound"],
                    included_edited=bool((edited[0, P:] == T_).any()),
                    included_native=bool((native_out[b, P:] == T_).any()),
                )
            )
        bar.update(1)
    bar.close()
    n = len(trials)
    ie = sum(t["included_edited"] for t in trials)
    i_n = sum(t["included_native"] for t in trials)
    shifts = [t["native_rank_first_edit"] - t["edited_rank_first_edit"] for t in trials]
    reach = [t for t in trials if t["gap"] < t["bound"]]
    return InstallResult(
        n=n,
        included_edited=ie,
        included_native=i_n,
        rate_edited=ie / n if n else float("nan"),
        rate_native=i_n / n if n else float("nan"),
        ci_edited=wilson(ie, n),
        ci_native=wilson(i_n, n),
        median_rank_shift=float(np.median(shifts)) if shifts else float("nan"),
        rank_improved=float(np.mean([s > 0 for s in shifts])) if shifts else float("nan"),
        median_gap=float(np.median([t["gap"] for t in trials])) if n else float("nan"),
        median_bound=float(np.median([t["bound"] for t in trials])) if n else float("nan"),
        n_reachable=len(reach),
        rate_edited_reachable=float(np.mean([t["included_edited"] for t in reach]))
        if reach
        else float("nan"),
        rate_native_reachable=float(np.mean([t["included_native"] for t in reach]))
        if reach
        else float("nan"),
        settings=dict(
            layer=layer,
            head=head,
            positions=positions,
            scale=scale,
            direction="fixed" if fixed_dir is not None else direction,
            key="native k^ signed by k^.q",
            norm="||k v^T||_F (no write strength)",
            rank_band=list(rank_band),
            n_targets=n_targets,
            max_new_tokens=max_new_tokens,
            seed=seed,
        ),
        trials=trials,
    )


# ------------------------------------------------------------------------------ choice of cell
@torch.no_grad()
def median_decays(model: Any, tokens: Int[Tensor, "batch pos"]) -> dict[tuple[int, int], float]:
    """Median forget gate (decay) of every recurrent (layer, head) over `tokens`.

    The decay is `hook_decay`: alpha_t for Qwen3.5, exp(dt_t A_h) for Mamba-2, and for RWKV-7 the
    mean over key channels of exp(w_t). A head whose median decay is near 0 keeps nothing from one
    token to the next: its state is its current write.
    """
    layers = list(model.cfg.recurrent_layers)
    names = [f"blocks.{layer}.attn.hook_decay" for layer in layers]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    out = {}
    for layer, name in zip(layers, names, strict=True):
        d = cache[name].double()
        if d.dim() == 4:
            d = d.mean(-1)
        for h in range(d.shape[-1]):
            out[(layer, h)] = float(d[..., h].median())
    return out


def memory_cell(
    model: Any, tokens: Int[Tensor, "batch pos"], layers: Sequence[int] | None = None
) -> tuple[int, int, float]:
    """The (layer, head) with the largest median decay among `layers` (default: the last half of
    the recurrent layers), and that median: a cell whose state remembers past writes."""
    rec = list(model.cfg.recurrent_layers)
    layers = rec[len(rec) // 2 :] if layers is None else list(layers)
    dec = median_decays(model, tokens)
    (layer, head), d = max(((k, v) for k, v in dec.items() if k[0] in layers), key=lambda kv: kv[1])
    return layer, head, d
