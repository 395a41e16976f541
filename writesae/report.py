"""Reports: JSON results, PNG plots and a Markdown page for the WriteSAE evaluations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from writesae.evaluate import (
    ClosedFormResult,
    InstallResult,
    SubstitutionResult,
    sae_codes,
    sae_layer,
)
from writesae.protocols import ModelLike, SAELike, TextModelLike
from writesae.train import TrainMetrics

__all__ = [
    "plot_substitution",
    "plot_closed_form",
    "plot_calibration",
    "plot_install",
    "plot_training",
    "top_atom_contexts",
    "write_report",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Lay out, write the PNG at `path`, close the figure; `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def _rate_bars(
    ax: Any,
    names: list[str],
    rates: list[Any],
    cis: list[Any],
    colors: list[str],
) -> None:
    """Bars of `rates` in percent with their (low, high) intervals `cis` as error bars."""
    err = np.array(
        [
            [r - c[0] for r, c in zip(rates, cis, strict=True)],
            [c[1] - r for r, c in zip(rates, cis, strict=True)],
        ]
    )
    ax.bar(names, [100 * r for r in rates], yerr=100 * err, capsize=6, color=colors)


def plot_substitution(sub: SubstitutionResult, path: Path) -> Path:
    """Win-rate bars (atom beats deletion / random) with Wilson 95% intervals."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    names = ["atom beats deletion", "atom beats random"]
    rates = [sub.win_rate_vs_delete, sub.win_rate_vs_random]
    cis = [sub.ci_vs_delete, sub.ci_vs_random]
    _rate_bars(ax, names, rates, cis, ["#3b7dd8", "#7fb2f0"])
    ax.axhline(50, color="gray", ls="--", lw=1, label="chance")
    for i, (r, c) in enumerate(zip(rates, cis, strict=True)):
        ax.text(i, 100 * c[1] + 2, f"{100 * r:.1f}%", ha="center")
    ax.set_ylim(0, 105)
    ax.set_ylabel("win rate (%)")
    ax.set_title(f"single-write substitution, n = {sub.n} firings")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_closed_form(cf: ClosedFormResult, path: Path) -> Path:
    """Predicted against measured logit shifts at the headline eps, one panel per method, with the
    identity line and the zero-parameter R^2."""
    plt = _plt()
    e = np.array(cf.point_eps)
    sel = e == cf.headline_eps if len(e) else slice(None)
    m = np.array(cf.measured)[sel]
    methods = list(cf.predicted_by_method) or ["prediction"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4), squeeze=False)
    unit = "x write norm" if cf.settings.get("eps_scale", "write_norm") == "write_norm" else ""
    for ax, meth in zip(axes[0], methods, strict=True):
        p = np.array(cf.predicted_by_method.get(meth, cf.predicted))[sel]
        ax.scatter(p, m, s=8, alpha=0.5)
        lim = float(max(np.abs(m).max(), 1e-9)) * 1.1
        ax.plot([-lim, lim], [-lim, lim], color="gray", lw=1)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        r2 = cf.r2_by_eps.get(meth, {}).get(cf.headline_eps, float("nan"))
        ax.set_xlabel(f"predicted dlogit ({meth.replace('_', '-')})")
        ax.set_ylabel("measured dlogit")
        ax.set_title(f"{meth.replace('_', '-')}: R$^2$ = {r2:.3f} (eps {cf.headline_eps:g}{unit})")
    return _save(fig, path)


def plot_calibration(sub: SubstitutionResult, path: Path) -> Path:
    """Win rate against deletion by the atom's cosine to the write it replaces, with the planted
    rank-1 reference curve (substitutes of known cosine at the same norm) and the best-atom
    control."""
    plt = _plt()
    cal = sub.calibration
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    edges = np.array(cal["edges"])
    mids = np.array(cal.get("bin_median_cosine", (edges[:-1] + edges[1:]) / 2), dtype=float)
    ok = np.array(cal["n"]) > 0
    rate = np.array(cal["rate"], dtype=float)
    ci = np.array(cal["ci"], dtype=float)
    ax.errorbar(
        mids[ok],
        100 * rate[ok],
        yerr=100 * np.abs(np.stack([rate[ok] - ci[ok, 0], ci[ok, 1] - rate[ok]])),
        fmt="o-",
        capsize=4,
        color="#3b7dd8",
        label="top atom (bins at their median cosine)",
    )
    for x, r, n in zip(mids[ok], rate[ok], np.array(cal["n"])[ok], strict=True):
        ax.annotate(f"n={n}", (x, 100 * r), textcoords="offset points", xytext=(4, -12), fontsize=7)
    if cal.get("planted"):
        cs = sorted(cal["planted"], key=float)
        pr = [100 * cal["planted"][c]["rate"] for c in cs]
        ax.plot(
            [float(c) for c in cs], pr, "s--", color="#d8773b", label="planted rank-1 of cosine c"
        )
    if sub.best_atom:
        b = sub.best_atom
        ax.errorbar(
            [b["median_cosine"]],
            [100 * b["rate"]],
            yerr=[[100 * (b["rate"] - b["ci"][0])], [100 * (b["ci"][1] - b["rate"])]],
            fmt="D",
            color="#2a9d3f",
            capsize=4,
            label="best dictionary atom (at its median cosine)",
        )
    ax.axhline(50, color="gray", ls=":", lw=1)
    ax.set_xlim(min(-0.3, float(np.nanmin(mids[ok])) - 0.05) if ok.any() else -0.3, 1.02)
    ax.set_ylim(0, 105)
    ax.set_xlabel("cosine of the substitute to the native write")
    ax.set_ylabel("beats deletion (%)")
    ax.set_title(f"substitution calibration ({sub.settings['scale']}, n = {sub.n})")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_install(inst: InstallResult, path: Path) -> Path:
    """Target inclusion without and with the install, with Wilson 95% intervals."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    rates = [inst.rate_native, inst.rate_edited]
    cis = [inst.ci_native, inst.ci_edited]
    _rate_bars(ax, ["unedited", "install"], rates, cis, ["#999999", "#d8773b"])
    ax.set_ylim(0, 105)
    ax.set_ylabel("target in continuation (%)")
    ax.set_title(f"install at {inst.settings['positions']} positions, n = {inst.n}")
    return _save(fig, path)


def plot_training(metrics: TrainMetrics, path: Path) -> Path:
    """FVE, L0 and dead fraction over training."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(9, 2.8))
    for ax, name in zip(axes, ("fve", "l0", "dead_fraction"), strict=True):
        ax.plot(metrics.step, getattr(metrics, name))
        ax.set_title(name)
        ax.set_xlabel("step")
    return _save(fig, path)


@torch.no_grad()
def top_atom_contexts(
    model: ModelLike,
    sae: SAELike,
    tokens: torch.Tensor,
    n_atoms: int = 8,
    n_contexts: int = 3,
    window: int = 10,
) -> list[dict[str, Any]]:
    """The most frequently firing atoms and, for each, its top-activating contexts."""
    layer, head = sae_layer(sae), sae.cfg.head
    codes = torch.cat(
        [
            sae_codes(model, sae, tokens[i : i + 16], layer, head)
            for i in range(0, tokens.shape[0], 16)
        ]
    )  # [N, T, n]
    freq = codes.ne(0).float().mean((0, 1))
    order = freq.argsort(descending=True)[:n_atoms].tolist()
    out = []
    for a in order:
        flat = codes[..., a].flatten()
        best = flat.topk(min(n_contexts, flat.numel())).indices
        ctxs = []
        for i in best.tolist():
            b, t = divmod(i, codes.shape[1])
            text_model = cast(TextModelLike, model)  # a model with a `tokenizer` (maybe None)
            if text_model.tokenizer is not None:
                left = text_model.to_string(tokens[b, max(0, t - window) : t])
                tok = text_model.to_string(tokens[b, t : t + 1])
            else:
                left, tok = str(tokens[b, max(0, t - window) : t].tolist()), str(int(tokens[b, t]))
            ctxs.append({"activation": float(flat[i]), "context": left, "token": tok})
        out.append({"atom": a, "fire_rate": float(freq[a]), "contexts": ctxs})
    return out


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", "\u23ce").replace("`", "'")


def _training_md(tr: dict[str, Any]) -> list[str]:
    return [
        "## Training",
        "",
        f"Fraction of variance explained {tr['fve']:.3f}, L0 {tr['l0']:.1f}, dead fraction "
        f"{tr['dead_fraction']:.3f} after {tr['steps']} steps ({tr['samples_per_s']:.0f} "
        "samples/s).",
        "",
        "![training](training.png)",
        "",
    ]


def _cell_md(cell: dict[str, Any]) -> list[str]:
    return [
        "## Cell",
        "",
        f"Layer {cell['layer']}, head {cell['head']}: median decay (forget gate) "
        f"**{cell['median_decay']:.3g}** on the held-out text ({cell['how']}). A cell whose "
        "median decay is near 0 keeps nothing between tokens: its state is its current write.",
        "",
    ]


def _substitution_md(sub: dict[str, Any]) -> list[str]:
    lo, hi = sub["ci_vs_delete"]
    rlo, rhi = sub["ci_vs_random"]
    st = sub["settings"]
    where = {
        "edited": "at the edited token",
        "end": "at the end of the prompt",
        "mean": "averaged over the rest of the prompt",
    }[st.get("kl_position", "edited")]
    L = [
        "## Substitution (single-write replacement)",
        "",
        f"The top atom (scale: {st['scale']}) beats deleting the write on "
        f"**{100 * sub['win_rate_vs_delete']:.1f}%** of firings (Wilson 95% interval "
        f"[{100 * lo:.1f}%, {100 * hi:.1f}%], n = {sub['n']}); it beats a random rank-1 write "
        f"of the same norm on {100 * sub['win_rate_vs_random']:.1f}% "
        f"([{100 * rlo:.1f}%, {100 * rhi:.1f}%]). KL({st['kl_direction']}) {where}. "
        "Median KL: " + ", ".join(f"{k} {v:.2e}" for k, v in sub["median_kl"].items()) + ".",
        "",
        "![substitution](substitution.png)",
        "",
    ]
    if sub.get("calibration"):
        L += _calibration_md(sub["calibration"], sub.get("best_atom"))
    sw = sub.get("scale_sweep")
    if sw and len(sw) > 1:
        L += [
            "### Scale sweep",
            "",
            "| scale of the top atom | beats deletion | Wilson 95% | median KL |",
            "|---|---:|---|---:|",
        ]
        for k, v in sw.items():
            L.append(
                f"| {k} | {100 * v['rate']:.1f}% | [{100 * v['ci'][0]:.1f}%, "
                f"{100 * v['ci'][1]:.1f}%] | {v['median_kl']:.2e} |"
            )
        L.append("")
    pop = sub.get("population")
    if pop:
        L += [
            f"Population test: mean per-atom win rate vs deletion "
            f"{100 * pop['mean_win_rate_vs_delete']:.1f}% (bootstrap 95% "
            f"[{100 * pop['ci'][0]:.1f}%, {100 * pop['ci'][1]:.1f}%]) over "
            f"{pop['n_atoms']} atoms and {pop['n_firings']} firings.",
            "",
        ]
    return L


def _calibration_md(cal: dict[str, Any], b: dict[str, Any] | None) -> list[str]:
    L = [
        "### Calibration",
        "",
        "A win rate means little without the substitute's geometry: it rises with the "
        "cosine of the substitute to the write it replaces. Median cosine of the top atom "
        f"to the write: **{cal['median_cosine']:.2f}**.",
        "",
        "| cosine to the write | firings | beats deletion | Wilson 95% |",
        "|---|---:|---:|---|",
    ]
    e = cal["edges"]
    for i, n in enumerate(cal["n"]):
        if n:
            L.append(
                f"| [{e[i]:g}, {e[i + 1]:g}) | {n} | {100 * cal['rate'][i]:.1f}% | "
                f"[{100 * cal['ci'][i][0]:.1f}%, {100 * cal['ci'][i][1]:.1f}%] |"
            )
    if cal.get("planted"):
        L += [
            "",
            "Planted reference (rank-1 substitutes of exactly cosine c to the write, at "
            "the atom condition's norm): "
            + ", ".join(
                f"c = {c}: {100 * v['rate']:.1f}% (n = {v['n']})"
                for c, v in sorted(cal["planted"].items(), key=lambda kv: float(kv[0]))
            )
            + ".",
        ]
    if b:
        L += [
            "",
            f"Best dictionary atom (largest |cosine| to the write, median "
            f"{b['median_cosine']:.2f}), same norm: beats deletion on "
            f"{100 * b['rate']:.1f}% ([{100 * b['ci'][0]:.1f}%, {100 * b['ci'][1]:.1f}%]).",
        ]
    return L + ["", "![calibration](calibration.png)", ""]


def _closed_form_md(cf: dict[str, Any]) -> list[str]:
    cs = cf["settings"]
    unit = " x the native write's norm" if cs.get("eps_scale") == "write_norm" else ""
    L = [
        "## Closed-form logit shift",
        "",
        f"Edits eps u w^T of the write at position {cs['position']}, logit of each atom's "
        f"top read-out token at position {cs['read_position']}, {cs['n_prompts']} prompts x "
        f"{len(cs['atoms'])} atoms. Zero fitted parameters, eps = "
        f"{cf['headline_eps']:g}{unit}:",
        "",
        f"first-order R^2 = {cf['r2']:.3f}",
        "",
        f"direct-path R^2 = {cf['r2_direct']:.3f} (the paper's formula, which treats the "
        "per-head norm and gate, later layers and final norm as the identity)",
        "",
        "| eps | " + " | ".join(f"{m} R^2" for m in cf["r2_by_eps"]) + " |",
        "|---|" + "---:|" * len(cf["r2_by_eps"]),
    ]
    for e in cs["eps_values"]:
        L.append(
            f"| {e:g} | " + " | ".join(f"{v[str(e)]:.3f}" for v in cf["r2_by_eps"].values()) + " |"
        )
    return L + [
        "",
        f"Linearity check (the paper's fitted G, one scale per prompt and atom across eps): "
        f"R^2 = {cf['linearity_r2']:.3f}; it shows the shift is linear in eps, not that a "
        "formula predicts it. Sign agreement at the headline eps: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in cf["sign_agreement"].items())
        + ".",
        "",
        "![closed form](closed_form.png)",
        "",
    ]


def _install_md(inst: dict[str, Any]) -> list[str]:
    ist = inst["settings"]
    return [
        "## Install during generation",
        "",
        f"Target tokens of initial rank {ist['rank_band']} appear in the "
        f"{ist['max_new_tokens']}-token greedy continuation in "
        f"**{100 * inst['rate_edited']:.1f}%** of trials with the install against "
        f"{100 * inst['rate_native']:.1f}% without (n = {inst['n']}; Wilson 95% "
        f"[{100 * inst['ci_edited'][0]:.1f}%, {100 * inst['ci_edited'][1]:.1f}%] and "
        f"[{100 * inst['ci_native'][0]:.1f}%, {100 * inst['ci_native'][1]:.1f}%]). Install: "
        f"{ist['scale']} x {ist['norm']} x {ist['key']} x value direction "
        f"({ist['direction']}), at {ist['positions']} positions.",
        "",
        f"At the first edited position the target's rank improved in "
        f"{100 * inst['rank_improved']:.0f}% of trials (median improvement "
        f"{inst['median_rank_shift']:.0f} ranks, same position and input in both runs).",
        "",
        f"Can one head do it? Median logit gap from the top token to the target there: "
        f"**{inst['median_gap']:.2f}**; median of the most this head can change that gap "
        f"(its normalised output rewritten, direct path): **{inst['median_bound']:.2f}**. "
        f"{inst['n_reachable']} of {inst['n']} trials have a gap below the bound"
        + (
            f" (inclusion among them {100 * inst['rate_edited_reachable']:.0f}% with the "
            f"install, {100 * inst['rate_native_reachable']:.0f}% without)."
            if inst["n_reachable"]
            else "; where the gap exceeds the bound the install cannot make the target the "
            "top token on its own."
        ),
        "",
        "![install](install.png)",
        "",
    ]


def _top_atoms_md(atoms: list[dict[str, Any]]) -> list[str]:
    L = [
        "## Top atoms",
        "",
        "| atom | fire rate | top-activating contexts (firing token in **bold**) |",
        "|---:|---:|---|",
    ]
    for a in atoms:
        ctx = "<br>".join(
            f"{_md_escape(c['context'])}**{_md_escape(c['token'])}** ({c['activation']:.2f})"
            for c in a["contexts"]
        )
        L.append(f"| {a['atom']} | {100 * a['fire_rate']:.1f}% | {ctx} |")
    return L + [""]


def _dashboard_md(link: str) -> list[str]:
    return [
        "## Atom dashboard",
        "",
        f"[Open the atom dashboard]({link}) in a browser (static files: no server, no network): "
        "every atom's contexts, histogram, key and value sides, memory and nearest atoms.",
        "",
    ]


_SECTIONS = (
    ("training", _training_md),
    ("cell", _cell_md),
    ("substitution", _substitution_md),
    ("closed_form", _closed_form_md),
    ("install", _install_md),
    ("dashboard", _dashboard_md),
    ("top_atoms", _top_atoms_md),
)


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """Write results.json and report.md (with the PNGs already in `out`)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    L = [f"# WriteSAE report: {results.get('model', '')}", ""]
    s = results.get("settings", {})
    if s:
        L += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in s.items()] + [""]
    for key, section in _SECTIONS:
        if results.get(key):
            L += section(results[key])
    path = out / "report.md"
    path.write_text("\n".join(L))
    return path
