"""The closed-form logit shift of an atom (paper Eq. 1, App. A) against the shift measured by
editing the write, and the zero-parameter R^2 between them.

The mathematics of the two predictions (the direct path and the exact first order) is in
:mod:`writesae.closed_form`; the measured edit is :func:`writesae.interventions.install_hook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_recurrent.state import RecurrentState
from writesae.closed_form import (
    EPS_SCALES,
    direct_readout,
    native_write_norm,
    prefix_state,
    read_jvp,
    read_response,
    run_from,
)
from writesae.evaluate.common import check_model, sae_layer
from writesae.interventions import install_hook
from writesae.protocols import CacheLike, MixerLike, RankOneSAELike, ReadoutModelLike
from writesae.stats import r_squared

__all__ = ["closed_form_logit_shift", "ClosedFormResult", "evaluate_closed_form"]

CLOSED_FORM_METHODS = ("direct", "first_order")
PROPAGATORS = ("gate", "exact")


def _cf_cache(model: ReadoutModelLike, tokens: Tensor, layer: int) -> tuple[Tensor, CacheLike]:
    """Clean logits and the cache of the layer's hooks (no d_k x d_v matrices)."""
    prefix = f"blocks.{layer}.attn"
    return model.run_with_cache(
        tokens,
        names_filter=lambda n: (
            n.startswith(prefix + ".hook_") and not n.endswith(("hook_write", "hook_state"))
        ),
    )


def _unit_shifts(
    model: ReadoutModelLike,
    cache: CacheLike,
    tokens: Tensor,
    layer: int,
    head: int,
    u: Float[Tensor, "n d_k"],
    w: Float[Tensor, "n d_v"],
    position: int,
    read_position: int,
    token: Tensor,
    method: str,
    propagator: str,
    state: RecurrentState | None = None,
    rows: Tensor | None = None,
) -> Tensor:
    """Predicted logit shift per unit (absolute) eps of the edits u w^T, one per row.

    `u` `[n, d_k]`, `w` `[n, d_v]`, `token` `[n]` or `[n, m]`; returns `[n]` or `[n, m]`. Row i is
    in prompt `rows[i]` of `cache` (default i); `tokens` and `state` are given per row.
    """
    if method == "direct":
        d_o = read_response(
            model, cache, layer, head, position, read_position, u, w, rows, propagator
        )
        # <P u, q_t> is the coefficient of w in dO_t
        coef = (d_o[:, -1] * w.double()).sum(-1) / w.double().pow(2).sum(-1).clamp_min(1e-300)
        out_dir = direct_readout(model, layer, head, w, token)
        return coef[:, None] * out_dir if out_dir.dim() == 2 else coef * out_dir
    if method == "first_order":
        d_o = read_response(model, cache, layer, head, position, read_position, u, w, rows)
        _, d = read_jvp(model, tokens[:, : read_position + 1], layer, head, position, d_o, state)
        d_last = d[:, -1].double()  # [B, vocab]
        if token.dim() == 1:
            return d_last.gather(-1, token[:, None])[:, 0]
        return d_last.gather(-1, token)
    raise ValueError(f"method must be one of {CLOSED_FORM_METHODS}, not {method!r}")


def _check_choices(eps_scale: str, methods: Sequence[str], propagator: str) -> None:
    if eps_scale not in EPS_SCALES:
        raise ValueError(f"eps_scale must be one of {EPS_SCALES}, not {eps_scale!r}")
    if not methods or any(m not in CLOSED_FORM_METHODS for m in methods):
        raise ValueError(f"method(s) must be one or more of {CLOSED_FORM_METHODS}, not {methods}")
    if propagator not in PROPAGATORS:
        raise ValueError(f"propagator must be 'gate' or 'exact', not {propagator!r}")


def _headline(eps_values: list[float], headline_eps: float | None) -> float:
    """The eps whose R^2 is the headline: the given one, else 0.1 if run, else the middle one."""
    if headline_eps is None:
        headline_eps = 0.1 if 0.1 in eps_values else eps_values[len(eps_values) // 2]
    if headline_eps not in eps_values:
        raise ValueError(f"headline_eps {headline_eps} is not one of eps_values {eps_values}")
    return headline_eps


@torch.no_grad()
def closed_form_logit_shift(
    model: ReadoutModelLike,
    sae: RankOneSAELike,
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
    cache: CacheLike | None = None,
) -> Tensor:
    """Predicted logit shift of `token` at `read_position` from adding eps u_i w_i^T to the write
    (equivalently the state) of head `head` at `position`, in every prompt (paper Eq. 1, App. A).

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
    _check_choices(eps_scale, [method], propagator)
    t = position if read_position is None else read_position
    if t < position:
        raise ValueError(f"read_position {t} is before the edited position {position}")
    if cache is None:
        _, cache = _cf_cache(model, tokens, layer)
    B = tokens.shape[0]
    many = not isinstance(atom, int)
    atoms = torch.as_tensor([atom] if isinstance(atom, int) else list(atom)).long()
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
            state = state.tile(nA)
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
    """Predicted against measured logit shifts (paper Eq. 1, App. A), for each prediction method.

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


@dataclass
class _Points:
    """Every (atom, eps, prompt) point: the measured shift, each method's prediction, the direct
    path's prediction (for the fitted-scale statistics), and where the point came from."""

    measured: np.ndarray
    predicted: dict[str, np.ndarray]
    direct: np.ndarray
    eps: np.ndarray
    eps_index: np.ndarray
    cell: np.ndarray
    prompt: np.ndarray
    median_write_norm: float


def _measure(
    model: ReadoutModelLike,
    sae: RankOneSAELike,
    tokens: Tensor,
    atoms: Sequence[int],
    readout: Tensor,
    eps_values: Sequence[float],
    eps_scale: str,
    methods: Sequence[str],
    t0: int,
    t: int,
    propagator: str,
    progress: bool,
) -> _Points:
    """Each atom's predicted shifts (once per atom: they are linear in eps) and measured ones
    (one edited run per eps) of its eval token at read position `t`."""
    layer, head = sae_layer(sae), sae.cfg.head
    B = tokens.shape[0]
    _, cache = _cf_cache(model, tokens, layer)
    state = prefix_state(model, tokens, t0)
    logits0 = run_from(model, tokens[:, : t + 1], t0, state=state)[:, -1].double()
    wnorm = native_write_norm(model, cache, layer, head)[:, t0]
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("m", "d", "e", "i", "c", "p", *methods)}
    bar = tqdm(total=len(atoms) * len(eps_values), desc="closed form", disable=not progress)
    for ci, a in enumerate(atoms):
        tok = int(readout[:, a].abs().argmax())
        u = sae.key_factors[a].detach().double()
        w = sae.value_factors[a].detach().double()
        uB, wB, tokB = u.expand(B, -1), w.expand(B, -1), torch.full((B,), tok, dtype=torch.long)
        args = (model, cache, tokens, layer, head, uB, wB, t0, t, tokB)
        unit = {m: _unit_shifts(*args, m, propagator, state) for m in methods}
        d_unit = unit["direct"] if "direct" in unit else _unit_shifts(*args, "direct", propagator)
        for ei, eps in enumerate(eps_values):
            scale = torch.full((B,), eps, dtype=torch.float64)
            if eps_scale == "write_norm":
                scale = scale * wnorm / float(u.norm() * w.norm())
            edit = install_hook(sae, (u, w), t0, scale)
            hooks = [(sae.cfg.write_hook_name, edit)]
            logits = run_from(model, tokens[:, : t + 1], t0, hooks, state)[:, -1].double()
            out["m"].append((logits[:, tok] - logits0[:, tok]).numpy())
            for m in methods:
                out[m].append((scale * unit[m]).numpy())
            out["d"].append((scale * d_unit).numpy())
            out["e"].append(np.full(B, eps))
            out["i"].append(np.full(B, ei))
            out["c"].append(np.full(B, ci))
            out["p"].append(np.arange(B))
            bar.update(1)
    bar.close()
    cat = {k: np.concatenate(v) for k, v in out.items()}
    predicted = {m: cat[m] for m in methods}
    return _Points(
        cat["m"], predicted, cat["d"], cat["e"], cat["i"], cat["c"], cat["p"],
        float(wnorm.median()),
    )  # fmt: skip


def _fitted_scale_r2(pts: _Points, groups: np.ndarray) -> float:
    """R^2 of the direct path with one least-squares scale per group of points."""
    ys, ps = [], []
    for g in np.unique(groups):
        sel = groups == g
        pd_ = pts.direct[sel]
        denom = float(pd_ @ pd_)
        s = float(pd_ @ pts.measured[sel]) / denom if denom > 0 else 0.0
        ys.append(pts.measured[sel])
        ps.append(s * pd_)
    return r_squared(np.concatenate(ys), np.concatenate(ps))


def _cell_r2(pts: _Points, method: str, n_atoms: int, eps_values: Sequence[float]) -> dict:
    """Per (atom, eps) cell R^2 across prompts of one method: median, IQR, all values."""
    cells = []
    for ci in range(n_atoms):
        for e in eps_values:
            sel = (pts.cell == ci) & (pts.eps == e)
            cells.append(r_squared(pts.measured[sel], pts.predicted[method][sel]))
    finite = np.array([c for c in cells if np.isfinite(c)])
    nan2 = [float("nan")] * 2
    return dict(
        method=method,
        median=float(np.median(finite)) if len(finite) else float("nan"),
        iqr=[float(np.quantile(finite, q)) for q in (0.25, 0.75)] if len(finite) else nan2,
        values=[float(c) for c in cells],
    )


@torch.no_grad()
def evaluate_closed_form(
    model: ReadoutModelLike,
    sae: RankOneSAELike,
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
    check_model(model, sae, allow_other_model)
    methods = list(methods)
    _check_choices(eps_scale, methods, propagator)
    eps_values = [float(e) for e in eps_values]
    headline_eps = _headline(eps_values, headline_eps)
    layer, head = sae_layer(sae), sae.cfg.head
    B, T = tokens.shape
    t0 = T // 2 if position is None else position
    t = t0 + read_offset
    if not 0 <= t0 <= t < T:
        raise ValueError(f"positions {t0}..{t} outside prompts of length {T}")
    W_O = cast(MixerLike, model.blocks[layer].attn).head_output_weight(head).double()
    readout = model.unembed.weight.double() @ (W_O @ sae.value_factors.double().T)  # [vocab, n]
    if atoms is None:
        atoms = readout.norm(dim=0).argsort(descending=True)[:n_atoms].tolist()
    pts = _measure(
        model, sae, tokens, atoms, readout, eps_values, eps_scale, methods, t0, t, propagator,
        progress,
    )  # fmt: skip
    settings = dict(
        layer=layer, head=head, atoms=list(map(int, atoms)), eps_values=list(eps_values),
        eps_scale=eps_scale, methods=methods, position=t0, read_position=t,
        propagator=propagator, n_prompts=int(B), median_write_norm=pts.median_write_norm,
    )  # fmt: skip
    head_m = "first_order" if "first_order" in methods else methods[0]
    at_eps = {e: pts.eps == e for e in eps_values}
    r2_by_eps = {
        m: {e: r_squared(pts.measured[sel], pts.predicted[m][sel]) for e, sel in at_eps.items()}
        for m in methods
    }
    hl = at_eps[headline_eps]
    return ClosedFormResult(
        r2=r2_by_eps[head_m][headline_eps],
        r2_direct=r2_by_eps["direct"][headline_eps] if "direct" in methods else float("nan"),
        headline_eps=headline_eps,
        r2_by_eps=r2_by_eps,
        r2_cells=_cell_r2(pts, head_m, len(atoms), eps_values),
        # the paper's fitted G: one scale per (prompt, atom) across the eps values (App. A)
        linearity_r2=_fitted_scale_r2(pts, pts.cell * B + pts.prompt),
        r2_fitted_scale=_fitted_scale_r2(pts, pts.cell * len(eps_values) + pts.eps_index),
        sign_agreement={
            m: float((np.sign(pts.predicted[m][hl]) == np.sign(pts.measured[hl])).mean())
            for m in methods
        },
        n_points=len(pts.measured),
        predicted=pts.predicted[head_m].tolist(),
        measured=pts.measured.tolist(),
        point_eps=pts.eps.tolist(),
        predicted_by_method={m: v.tolist() for m, v in pts.predicted.items()},
        settings=settings,
    )
