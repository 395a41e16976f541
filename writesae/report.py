"""Reports: JSON results, PNG plots and a Markdown page for the WriteSAE evaluations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "plot_substitution",
    "plot_closed_form",
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


def plot_substitution(sub: Any, path: Path) -> Path:
    """Win-rate bars (atom beats deletion / random) with Wilson 95% intervals."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    names = ["atom beats deletion", "atom beats random"]
    rates = [sub.win_rate_vs_delete, sub.win_rate_vs_random]
    cis = [sub.ci_vs_delete, sub.ci_vs_random]
    err = np.array(
        [
            [r - c[0] for r, c in zip(rates, cis, strict=True)],
            [c[1] - r for r, c in zip(rates, cis, strict=True)],
        ]
    )
    ax.bar(names, [100 * r for r in rates], yerr=100 * err, capsize=6, color=["#3b7dd8", "#7fb2f0"])
    ax.axhline(50, color="gray", ls="--", lw=1, label="chance")
    for i, (r, c) in enumerate(zip(rates, cis, strict=True)):
        ax.text(i, 100 * c[1] + 2, f"{100 * r:.1f}%", ha="center")
    ax.set_ylim(0, 105)
    ax.set_ylabel("win rate (%)")
    ax.set_title(f"single-write substitution, n = {sub.n} firings")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_closed_form(cf: Any, path: Path) -> Path:
    """Predicted against measured logit shifts, with the identity line and R^2."""
    plt = _plt()
    p, m = np.array(cf.predicted), np.array(cf.measured)
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(p, m, s=8, alpha=0.5)
    lim = float(max(np.abs(p).max(), np.abs(m).max(), 1e-9)) * 1.05
    ax.plot([-lim, lim], [-lim, lim], color="gray", lw=1)
    ax.set_xlabel("predicted dlogit (closed form)")
    ax.set_ylabel("measured dlogit")
    ax.set_title(f"closed form: R$^2$ = {cf.r2:.3f} (n = {cf.n_points})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_install(inst: Any, path: Path) -> Path:
    """Target inclusion without and with the install, with Wilson 95% intervals."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    rates = [inst.rate_native, inst.rate_edited]
    cis = [inst.ci_native, inst.ci_edited]
    err = np.array(
        [
            [r - c[0] for r, c in zip(rates, cis, strict=True)],
            [c[1] - r for r, c in zip(rates, cis, strict=True)],
        ]
    )
    ax.bar(
        ["unedited", "install"],
        [100 * r for r in rates],
        yerr=100 * err,
        capsize=6,
        color=["#999999", "#d8773b"],
    )
    ax.set_ylim(0, 105)
    ax.set_ylabel("target in continuation (%)")
    ax.set_title(f"install at {inst.settings['positions']} positions, n = {inst.n}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training(metrics: Any, path: Path) -> Path:
    """FVE, L0 and dead fraction over training."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(9, 2.8))
    for ax, name in zip(axes, ("fve", "l0", "dead_fraction"), strict=True):
        ax.plot(metrics.step, getattr(metrics, name))
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def top_atom_contexts(
    model: Any,
    sae: Any,
    tokens: torch.Tensor,
    n_atoms: int = 8,
    n_contexts: int = 3,
    window: int = 10,
) -> list[dict[str, Any]]:
    """The most frequently firing atoms and, for each, its top-activating contexts."""
    from writesae.evaluate import _codes, _layer

    layer, head = _layer(sae), sae.cfg.head
    codes = torch.cat(
        [_codes(model, sae, tokens[i : i + 16], layer, head) for i in range(0, tokens.shape[0], 16)]
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
            if model.tokenizer is not None:
                left = model.to_string(tokens[b, max(0, t - window) : t])
                tok = model.to_string(tokens[b, t : t + 1])
            else:
                left, tok = str(tokens[b, max(0, t - window) : t].tolist()), str(int(tokens[b, t]))
            ctxs.append({"activation": float(flat[i]), "context": left, "token": tok})
        out.append({"atom": a, "fire_rate": float(freq[a]), "contexts": ctxs})
    return out


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", "\u23ce").replace("`", "'")


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """Write results.json and report.md (with the PNGs already in `out`)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    L = [f"# WriteSAE report: {results.get('model', '')}", ""]
    s = results.get("settings", {})
    if s:
        L += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in s.items()] + [""]
    tr = results.get("training")
    if tr:
        L += [
            "## Training",
            "",
            f"Fraction of variance explained {tr['fve']:.3f}, L0 {tr['l0']:.1f}, dead fraction "
            f"{tr['dead_fraction']:.3f} after {tr['steps']} steps ({tr['samples_per_s']:.0f} "
            "samples/s).",
            "",
            "![training](training.png)",
            "",
        ]
    sub = results.get("substitution")
    if sub:
        lo, hi = sub["ci_vs_delete"]
        rlo, rhi = sub["ci_vs_random"]
        L += [
            "## Substitution (single-write replacement)",
            "",
            f"The top atom at matched Frobenius norm beats deleting the write on "
            f"**{100 * sub['win_rate_vs_delete']:.1f}%** of firings (Wilson 95% interval "
            f"[{100 * lo:.1f}%, {100 * hi:.1f}%], n = {sub['n']}); it beats a random rank-1 write "
            f"of the same norm on {100 * sub['win_rate_vs_random']:.1f}% "
            f"([{100 * rlo:.1f}%, {100 * rhi:.1f}%]). Median KL: "
            + ", ".join(f"{k} {v:.2e}" for k, v in sub["median_kl"].items())
            + ".",
            "",
            "![substitution](substitution.png)",
            "",
        ]
        pop = sub.get("population")
        if pop:
            L += [
                f"Population test: mean per-atom win rate vs deletion "
                f"{100 * pop['mean_win_rate_vs_delete']:.1f}% (bootstrap 95% "
                f"[{100 * pop['ci'][0]:.1f}%, {100 * pop['ci'][1]:.1f}%]) over "
                f"{pop['n_atoms']} atoms and {pop['n_firings']} firings.",
                "",
            ]
    cf = results.get("closed_form")
    if cf:
        L += [
            "## Closed-form logit shift",
            "",
            f"Zero-parameter R^2 = **{cf['r2']:.3f}** over {cf['n_points']} (atom, eps, prompt) "
            f"points; per-cell median {cf['r2_cells']['median']:.3f}; with one fitted scale per "
            f"cell {cf['r2_fitted_scale']:.3f}; sign agreement "
            f"{100 * cf['sign_agreement']:.1f}%.",
            "",
            "![closed form](closed_form.png)",
            "",
        ]
    inst = results.get("install")
    if inst:
        L += [
            "## Install during generation",
            "",
            f"Target tokens of initial rank {inst['settings']['rank_band']} appear in the "
            f"{inst['settings']['max_new_tokens']}-token greedy continuation in "
            f"**{100 * inst['rate_edited']:.1f}%** of trials with the install against "
            f"{100 * inst['rate_native']:.1f}% without (n = {inst['n']}; Wilson 95% "
            f"[{100 * inst['ci_edited'][0]:.1f}%, {100 * inst['ci_edited'][1]:.1f}%] and "
            f"[{100 * inst['ci_native'][0]:.1f}%, {100 * inst['ci_native'][1]:.1f}%]); median "
            f"rank improvement at the first edited step {inst['median_rank_shift']:.0f}.",
            "",
            "![install](install.png)",
            "",
        ]
    atoms = results.get("top_atoms")
    if atoms:
        L += [
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
        L.append("")
    path = out / "report.md"
    path.write_text("\n".join(L))
    return path
