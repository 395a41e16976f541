"""`writesae evaluate`: the three evaluations of a saved SAE, as JSON, plots and a report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import typer

from hooked_recurrent import HookedRecurrentModel
from writesae import report
from writesae.cli import options
from writesae.cli.app import (
    app,
    blocks,
    check_out,
    check_text,
    load_model,
    one_line_errors,
    parse_rank_band,
    positive,
    texts,
)
from writesae.evaluate import (
    evaluate_closed_form,
    evaluate_install,
    evaluate_substitution,
    median_decays,
    sae_layer,
)
from writesae.fileio import atomic_dir
from writesae.saes import WriteSAE

__all__ = ["run_evaluations", "evaluate"]


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.time()
    out = fn()
    timings[f"{name}_s"] = round(time.time() - t0, 1)
    return out


def run_evaluations(
    m: HookedRecurrentModel,
    sae: WriteSAE,
    model_name: str,
    tokens: torch.Tensor,
    out: Path,
    which: tuple[bool, bool, bool],
    firings: int,
    seed: int,
    extra: dict[str, Any] | None = None,
    rank_band: tuple[int, int] = (100, 1000),
    scale: str = "matched_norm",
    kl_position: str = "edited",
    final: Path | None = None,
    allow_other_model: bool = False,
) -> dict[str, Any]:
    """Run the evaluations flagged in `which` (substitution, closed form, install) of `sae` on
    `tokens`, write their plots and the report into `out`; returns the results."""
    out.mkdir(parents=True, exist_ok=True)
    layer, head = sae_layer(sae), sae.cfg.head
    results: dict[str, Any] = dict(model=model_name, **(extra or {}))
    results.setdefault("settings", {}).update(
        layer=layer,
        head=head,
        sae=f"{sae.cfg.n_atoms} atoms, k={sae.cfg.k}, input {sae.cfg.input_kind}",
        eval_prompts=f"{tokens.shape[0]} x {tokens.shape[1]} held-out tokens",
        seed=seed,
    )
    if "cell" not in results and layer in m.cfg.recurrent_layers:
        decay = median_decays(m, tokens[:32])[(layer, head)]
        results["cell"] = dict(layer=layer, head=head, median_decay=decay, how="the SAE's cell")
    timings: dict[str, float] = {}
    other: dict[str, Any] = dict(allow_other_model=allow_other_model)
    if which[0]:
        sub = _timed(timings, "substitution", lambda: evaluate_substitution(
            m, sae, tokens, max_firings=firings, positions_per_prompt=max(1, tokens.shape[1] // 4),
            scale=scale, kl_position=kl_position, best_atom=True, planted_cosines=(0.1, 0.5, 0.9),
            sweep_scales=("matched_norm", "coefficient", 0.1), population=True, seed=seed, **other,
        ))  # fmt: skip
        results["substitution"] = sub.to_dict()
        report.plot_substitution(sub, out / "substitution.png")
        report.plot_calibration(sub, out / "calibration.png")
    if which[1]:
        cf = _timed(timings, "closed_form", lambda: evaluate_closed_form(
            m, sae, tokens[:64, :48], n_atoms=8, read_offset=0, **other
        ))  # fmt: skip
        results["closed_form"] = cf.to_dict()
        report.plot_closed_form(cf, out / "closed_form.png")
    if which[2]:
        inst = _timed(timings, "install", lambda: evaluate_install(
            m, sae, tokens[:15, :32], rank_band=rank_band, seed=seed, **other
        ))  # fmt: skip
        results["install"] = inst.to_dict()
        report.plot_install(inst, out / "install.png")
    results["top_atoms"] = report.top_atom_contexts(m, sae, tokens[:32])
    results["timings"] = timings
    path = report.write_report(out, results)
    typer.echo(f"report: {(final / path.name) if final is not None else path}")
    return results


@app.command()
@one_line_errors
def evaluate(
    sae: Path = typer.Option(..., help="Folder of a saved SAE."),
    out: Path = typer.Option(..., help="Folder for results.json, report.md and the plots."),
    model: str | None = options.SAE_MODEL,
    text: Path | None = typer.Option(
        None, help="Held-out text file (default: the shipped sample)."
    ),
    substitution: bool = typer.Option(True, help="Run the substitution win-rate test."),
    closed_form: bool = typer.Option(True, help="Run the closed-form logit-shift test."),
    install: bool = typer.Option(True, help="Run the install-during-generation test."),
    firings: int = typer.Option(600, help="Firings for the substitution test."),
    context: int = typer.Option(64, help="Prompt length in tokens."),
    rank_band: str = typer.Option("100,1000", help="Initial-rank band of install targets."),
    scale: str = typer.Option(
        "matched_norm",
        help="Substitution scale: matched_norm, coefficient, or a fraction of the write's norm.",
    ),
    kl_position: str = typer.Option("edited", help="Substitution KL at: edited, end or mean."),
    seed: int = typer.Option(0, help="Seed for random controls and target choice."),
    overwrite: bool = options.OVERWRITE,
    allow_other_model: bool = typer.Option(
        False,
        "--allow-other-model",
        help="Evaluate on a model other than the one the SAE was trained on.",
    ),
) -> None:
    """Evaluate a saved SAE: JSON results plus a Markdown report with PNG plots."""
    positive("--firings", firings)
    positive("--context", context, 2)
    band = parse_rank_band(rank_band)
    check_text(text)
    if not sae.is_dir():
        raise typer.BadParameter(f"{sae} is not a folder", param_hint="--sae")
    check_out(out, overwrite, "report folder")
    s = cast(WriteSAE, WriteSAE.load(sae))  # load checks the class
    name = model or s.cfg.model_name
    if not name:
        raise typer.BadParameter("the SAE records no model; pass --model")
    m = load_model(name)
    s.check_model(m, allow_other_model=allow_other_model)
    tokens = blocks(m, texts(text, "heldout"), context, None)
    with atomic_dir(out, overwrite, "report folder") as tmp:
        run_evaluations(
            m, s, name, tokens, tmp, (substitution, closed_form, install), firings, seed,
            rank_band=band, scale=scale, kl_position=kl_position, final=out,
            allow_other_model=allow_other_model,
        )  # fmt: skip
