"""Atom dashboards: static HTML pages that show what each rank-1 atom u_i w_i^T of a WriteSAE
reads and writes, and that open in any browser from disk, with no server and no network.

`dashboard(sae, model, tokens, out)` writes `out/index.html`, its script and style, and
`out/data.js` (the data, one JSON object assigned to `window.WRITESAE_DASHBOARD`; a browser
opening a page from disk may not fetch a separate `.json` file, but it runs a local script).
`load_data(out)` reads that object back in Python. (The package is `writesae.dashboards`, plural,
so that `writesae.dashboard` can be the function.)

Per atom: fire rate, mean activation, share of the explained variance, substitution win rate
(when given), a histogram of its nonzero activations, its top-activating contexts with every
token's activation, the key side (tokens whose write key k_t aligns with u_i; queries q_t that
read u_i most), the value side (`value.py`), its memory (`atoms.memory`) and its nearest atoms by
u and by w.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from writesae.dashboards import atoms as A
from writesae.dashboards.corpus import CorpusStats, corpus_pass, sae_layer
from writesae.dashboards.value import direct_effect, first_order_effect
from writesae.protocols import ConfiguredModelLike, RankOneSAELike

__all__ = ["DashboardConfig", "dashboard", "write_dashboard", "load_data", "DATA_PREFIX"]

logger = logging.getLogger(__name__)
DATA_PREFIX = "window.WRITESAE_DASHBOARD = "
STATIC_FILES = ("index.html", "dashboard.js", "dashboard.css")


@dataclass
class DashboardConfig:
    """What the dashboard shows and how much of it.

    Attributes:
        n_contexts: top-activating contexts per atom.
        left, right: tokens shown before and after the firing token.
        bins: histogram bins over [0, the atom's largest activation].
        n_tokens: promoted, suppressed and key-side tokens per atom.
        key_min_count: a token must occur this often to be listed on the key side.
        n_reads: the strongest queries (|<u_i, q_t>|) kept per atom.
        value_contexts: top-activating positions the first-order value effect is averaged over.
        memory_lags: lags (tokens) at which the memory of a contribution is measured.
        memory_starts: firings per atom the memory is averaged over.
        n_nearest: nearest atoms listed by u and by w cosine.
        batch_tokens: tokens per model pass.
    """

    n_contexts: int = 10
    left: int = 12
    right: int = 4
    bins: int = 24
    n_tokens: int = 10
    key_min_count: int = 3
    n_reads: int = 6
    value_contexts: int = 3
    memory_lags: tuple[int, ...] = (1, 4, 16, 64)
    memory_starts: int = 16
    n_nearest: int = 5
    batch_tokens: int = 8192

    def __post_init__(self) -> None:
        for name in ("n_contexts", "bins", "n_tokens", "key_min_count", "n_reads"):
            if getattr(self, name) < 1:
                raise ValueError(f"DashboardConfig.{name} must be >= 1, not {getattr(self, name)}")
        if self.value_contexts < 1 or self.memory_starts < 1 or self.batch_tokens < 1:
            raise ValueError("value_contexts, memory_starts and batch_tokens must be >= 1")
        if min(self.left, self.right, self.n_nearest) < 0 or min(self.memory_lags) < 1:
            raise ValueError("left, right, n_nearest must be >= 0 and every memory lag >= 1")


def _r(x: float | Tensor, digits: int = 5) -> float | None:
    """A float rounded to `digits` significant digits (None for NaN: JSON has no NaN)."""
    x = float(x)
    return None if x != x else float(f"{x:.{digits}g}")


def _vocab(model: ConfiguredModelLike) -> list[str]:
    n = model.cfg.d_vocab
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"<{i}>" for i in range(n)]
    return [tok.decode([i]) for i in range(n)]


def _check(sae: Any, model: Any, tokens: Tensor) -> None:
    if not hasattr(sae, "key_factors") or not hasattr(sae, "value_factors"):
        raise TypeError(
            f"the dashboard needs a rank-1 WriteSAE (key_factors u_i, value_factors w_i); got "
            f"{type(sae).__name__}"
        )
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise ValueError("tokens must be an integer tensor [n_seq, pos]")
    layer = sae_layer(sae)
    if layer not in model.cfg.recurrent_layers:
        raise ValueError(
            f"the SAE's layer {layer} is not a recurrent layer of the model "
            f"(recurrent layers: {list(model.cfg.recurrent_layers)})"
        )


def _tokens(effect: Tensor, other: Tensor, n: int, largest: bool) -> list[dict]:
    top = effect.topk(n, largest=largest).indices.tolist()
    return [dict(token=t, value=_r(effect[t]), other=_r(other[t])) for t in top]


def _value_side(
    model: ConfiguredModelLike,
    sae: RankOneSAELike,
    stats: CorpusStats,
    codes: A.AtomCodes,
    cfg: DashboardConfig,
):
    """First-order and direct-path effects `[n_atoms, vocab]` (see `value.py`)."""
    T = stats.tokens.shape[1]
    sites = []
    for p, v in zip(codes.pos, codes.value, strict=True):
        top = p[v.topk(min(cfg.value_contexts, len(v))).indices].tolist()
        sites.append([divmod(int(x), T) for x in top])
    layer, head, w = sae_layer(sae), sae.cfg.head, sae.value_factors.detach()
    first = first_order_effect(model, stats.tokens, layer, head, w, sites)
    return first, direct_effect(model, layer, head, w), sites


def _atom_record(i: int, stats, codes, extra: dict, cfg: DashboardConfig) -> dict[str, Any]:
    """Everything the atom page shows for atom i, as plain JSON."""
    s = A.firing_summary(codes.value[i], stats.tokens.numel(), cfg.bins)
    first, direct = extra["first"][i], extra["direct"][i]
    n = cfg.n_tokens
    ctx = A.contexts(stats, codes.pos[i], codes.value[i], cfg.n_contexts, cfg.left, cfg.right)
    for c in ctx:
        c["act"], c["acts"] = _r(c["act"]), [_r(a) for a in c["acts"]]
    reads = A.read_side(stats, i, cfg.left, cfg.right)
    for r in reads:
        r["value"] = _r(r["value"])
    keys = A.key_side(stats, i, n, cfg.key_min_count)
    for k in keys:
        k["cos"] = _r(k["cos"])
    win = extra["win_rates"].get(i)
    return dict(
        atom=i,
        fire_rate=_r(s["fire_rate"]),
        mean_act=_r(s["mean_act"]),
        max_act=_r(s["max_act"]),
        fve_share=_r(stats.fve_drop[i] / stats.fve) if stats.fve > 0 else None,
        fve_drop=_r(stats.fve_drop[i]),
        win_rate=None if win is None else _r(win),
        dead=s["fire_rate"] == 0,
        hist=s["hist"],
        contexts=ctx,
        value_sites=[list(x) for x in extra["sites"][i]],
        key_tokens=keys,
        reads=reads,
        promoted=_tokens(first, direct, n, True),
        suppressed=_tokens(first, direct, n, False),
        direct_promoted=_tokens(direct, first, n, True),
        direct_suppressed=_tokens(direct, first, n, False),
        memory=dict(
            decay=[_r(x) for x in extra["mem"][0][i]],
            exact=[_r(x) for x in extra["mem"][1][i]],
            n=extra["mem"][2][i].tolist(),
        ),
        near_u=[dict(atom=int(a), cos=_r(c)) for a, c in zip(*extra["near_u"][i], strict=True)],
        near_w=[dict(atom=int(a), cos=_r(c)) for a, c in zip(*extra["near_w"][i], strict=True)],
    )


def _meta(
    model: ConfiguredModelLike,
    sae: RankOneSAELike,
    stats: CorpusStats,
    cfg: DashboardConfig,
    name: str | None,
) -> dict:
    c = sae.cfg
    return dict(
        model=name or getattr(c, "model_name", None) or "",
        layer=sae_layer(sae),
        head=c.head,
        n_atoms=c.n_atoms,
        k=c.k,
        input_kind=c.input_kind,
        n_seq=stats.tokens.shape[0],
        context=stats.tokens.shape[1],
        n_tokens=stats.tokens.numel(),
        fve=_r(stats.fve),
        bins=cfg.bins,
        memory_lags=list(cfg.memory_lags),
        left=cfg.left,
        right=cfg.right,
    )


@torch.no_grad()
def dashboard(
    sae: RankOneSAELike,
    model: ConfiguredModelLike,
    tokens: Int[Tensor, "n_seq pos"],
    out: str | Path,
    *,
    win_rates: dict[int, float] | None = None,
    config: DashboardConfig | None = None,
    model_name: str | None = None,
) -> Path:
    """Write the atom dashboard of `sae` over `tokens` to the folder `out`; returns
    `out/index.html`. Open it in a browser (`file://`); nothing is fetched from the network.

    Args:
        sae: a rank-1 WriteSAE (state or write input) for a recurrent layer of `model`.
        model: the HookedRecurrentModel it was trained on.
        tokens: the corpus `[n_seq, pos]`; the memory at lag L needs sequences longer than L.
        out: the folder (created; existing dashboard files in it are replaced).
        win_rates: per-atom substitution win rates against deletion, where computed (the
            population test's `per_atom`), shown in the table.
        config: what to show and how much (`DashboardConfig`).
        model_name: the model's name for the page title (default: the SAE's record).
    """
    cfg = config or DashboardConfig()
    _check(sae, model, tokens)
    stats = corpus_pass(model, sae, tokens, n_reads=cfg.n_reads, batch_tokens=cfg.batch_tokens)
    n_atoms = sae.key_factors.shape[0]
    codes = A.split_codes(stats, n_atoms)
    first, direct, sites = _value_side(model, sae, stats, codes, cfg)
    extra = dict(
        first=first,
        direct=direct,
        sites=sites,
        win_rates={int(k): float(v) for k, v in (win_rates or {}).items()},
        mem=A.memory(stats, sae.key_factors.detach(), codes, cfg.memory_lags, cfg.memory_starts),
        near_u=list(zip(*A.nearest(sae.key_factors, cfg.n_nearest), strict=True)),
        near_w=list(zip(*A.nearest(sae.value_factors, cfg.n_nearest), strict=True)),
    )
    data = dict(
        meta=_meta(model, sae, stats, cfg, model_name),
        vocab=_vocab(model),
        atoms=[_atom_record(i, stats, codes, extra, cfg) for i in range(n_atoms)],
    )
    return write_dashboard(data, out)


def write_dashboard(data: dict[str, Any], out: str | Path) -> Path:
    """Write `data` as `out/data.js` beside the page's static files; returns `out/index.html`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    static = resources.files("writesae.dashboards") / "static"
    for name in STATIC_FILES:
        with resources.as_file(static / name) as src:
            shutil.copyfile(src, out / name)
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    (out / "data.js").write_text(DATA_PREFIX + text + ";\n", encoding="utf-8")
    logger.info("dashboard of %d atoms written to %s", len(data["atoms"]), out)
    return out / "index.html"


def load_data(out: str | Path) -> dict[str, Any]:
    """The data object of a dashboard folder (`out/data.js`), as Python."""
    text = (Path(out) / "data.js").read_text(encoding="utf-8").strip()
    if not text.startswith(DATA_PREFIX):
        raise ValueError(f"{out}/data.js is not a dashboard data file (no {DATA_PREFIX!r})")
    return json.loads(text[len(DATA_PREFIX) :].rstrip(";"))
