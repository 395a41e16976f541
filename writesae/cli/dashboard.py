"""`writesae dashboard`: the atom dashboard of a saved SAE (static HTML, opens from disk)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from writesae.cli import options
from writesae.cli.app import (
    app,
    blocks,
    check_out,
    load_model,
    one_line_errors,
    positive,
    texts,
)
from writesae.dashboards import dashboard as write_dashboard
from writesae.fileio import atomic_dir
from writesae.saes import WriteSAE

__all__ = ["dashboard", "report_win_rates"]


def report_win_rates(report: Path) -> dict[int, float]:
    """Per-atom substitution win rates against deletion from a report's `results.json` (the
    population test's `per_atom`); empty when the report has none."""
    path = report / "results.json"
    if not path.is_file():
        raise typer.BadParameter(f"{path} not found", param_hint="--report")
    sub = json.loads(path.read_text()).get("substitution") or {}
    per_atom = (sub.get("population") or {}).get("per_atom") or {}
    return {int(k): float(v) for k, v in per_atom.items()}


@app.command()
@one_line_errors
def dashboard(
    sae: Path = typer.Option(..., help="Folder of a saved WriteSAE."),
    out: Path = typer.Option(..., help="Folder for index.html and its data."),
    model: str | None = options.SAE_MODEL,
    data: Path | None = typer.Option(
        None, help="Text file (default: the shipped held-out sample, then the training sample)."
    ),
    n_tokens: int = typer.Option(100_000, help="Tokens of text to run (at most)."),
    context: int = typer.Option(128, help="Tokens per sequence."),
    report: Path | None = typer.Option(
        None, help="Report folder of `writesae evaluate` whose per-atom win rates to show."
    ),
    overwrite: bool = options.OVERWRITE,
    allow_other_model: bool = typer.Option(
        False, "--allow-other-model", help="Run on a model other than the SAE's."
    ),
) -> None:
    """Write a static HTML dashboard of every atom (open OUT/index.html in a browser).

    The folder is self-contained: it needs no server and no network.
    """
    positive("--n-tokens", n_tokens)
    positive("--context", context, 2)
    if not sae.is_dir():
        raise typer.BadParameter(f"{sae} is not a folder", param_hint="--sae")
    win_rates = report_win_rates(report) if report is not None else None
    check_out(out, overwrite, "dashboard folder")
    s = WriteSAE.load(sae)
    name = model or s.cfg.model_name
    if not name:
        raise typer.BadParameter("the SAE records no model; pass --model")
    m = load_model(name)
    s.check_model(m, allow_other_model=allow_other_model)
    text = texts(data, "heldout") + ([] if data is not None else texts(None, "train"))
    tokens = blocks(m, text, context, max(1, n_tokens // context))
    with atomic_dir(out, overwrite, "dashboard folder") as tmp:
        write_dashboard(s, m, tokens, tmp, win_rates=win_rates, model_name=name)
    typer.echo(f"dashboard: {out / 'index.html'} ({tokens.numel()} tokens)")
