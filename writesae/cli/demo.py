"""`writesae demo`: stream states, train a WriteSAE, run the three evaluations, write the report
and the atom dashboard beside it."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import typer

from hooked_recurrent import HookedRecurrentModel
from writesae import report
from writesae.cli import options
from writesae.cli.app import (
    DEFAULT_MODEL,
    TRAIN_DEFAULT,
    app,
    blocks,
    cell,
    check_out,
    load_model,
    one_line_errors,
    positive,
    texts,
)
from writesae.cli.dashboard import report_win_rates
from writesae.cli.evaluate import run_evaluations
from writesae.cli.train import train_sae
from writesae.config import WriteSAEConfig
from writesae.dashboards import dashboard as write_dashboard
from writesae.evaluate import median_decays, memory_cell
from writesae.fileio import atomic_dir
from writesae.saes import WriteSAE
from writesae.train import TrainMetrics

__all__ = ["demo"]


def _choose_cell(
    m: HookedRecurrentModel, tokens: torch.Tensor, layer: int | None, head: int | None
) -> tuple[int, int, str]:
    """(layer, head, how it was chosen): the user's, or the head with the largest median decay
    in `layer` (without one, among the last half of the recurrent layers)."""
    if head is None:
        rec = m.cfg.recurrent_layers
        layers = rec[len(rec) // 2 :] if layer is None else [cell(m, layer, 0)[0]]
        layer, head, _ = memory_cell(m, tokens[:32], layers)
        how = f"chosen by memory: the largest median decay among layers {list(layers)}"
    else:
        how = "chosen by the user"
    layer, head = cell(m, layer, head)
    return layer, head, how


@app.command()
@one_line_errors
def demo(
    out: Path = typer.Option(Path("writesae-demo"), help="Output folder."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model (a shipped name, folder or Hub id)."),
    layer: int | None = typer.Option(
        None, help="Recurrent layer (default: chosen with the head by memory, see --head)."
    ),
    head: int | None = typer.Option(
        None,
        help="Head (default: the head with the largest median decay in --layer, or without "
        "--layer among the last half of the recurrent layers).",
    ),
    n_atoms: int = options.N_ATOMS,
    k: int = options.K,
    steps: int = options.STEPS,
    firings: int = typer.Option(600, help="Firings for the substitution test (>= 500)."),
    seed: int = typer.Option(TRAIN_DEFAULT["seed"], help="Seed for everything."),
    dashboard_tokens: int = typer.Option(
        32768, help="Held-out tokens (sequences of 128) the atom dashboard runs over."
    ),
    overwrite: bool = options.OVERWRITE,
) -> None:
    """Stream states, train a WriteSAE, run the evaluations, write the report and dashboard."""
    positive("--steps", steps)
    positive("--firings", firings)
    positive("--dashboard-tokens", dashboard_tokens, 128)
    try:
        WriteSAEConfig(d_k=1, d_v=1, n_atoms=n_atoms, k=k)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    check_out(out, overwrite, "demo folder")
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(seed)
    t0 = time.time()
    m = load_model(model)
    tokens = blocks(m, texts(None, "heldout"), 64, None)
    layer, head, how = _choose_cell(m, tokens, layer, head)
    decay = median_decays(m, tokens[:32])[(layer, head)]
    typer.echo(
        f"model {model}: layer {layer}, head {head} (median decay {decay:.3g}; {how}), "
        f"d_k={m.cfg.d_k}, d_v={m.cfg.d_v}"
    )
    train_options: dict[str, Any] = dict(
        n_steps=steps, batch_size=TRAIN_DEFAULT["batch_size"], lr=TRAIN_DEFAULT["lr"], seed=seed
    )
    sae, metrics = train_sae(
        m, model, texts(None, "train"), (layer, head),
        dict(n_atoms=n_atoms, k=k, input_kind="state"), train_options, 128,
    )  # fmt: skip
    cell_info = dict(layer=layer, head=head, median_decay=decay, how=how)
    with atomic_dir(out, overwrite, "demo folder") as tmp:
        _demo_outputs(m, sae, metrics, model, firings, seed, tmp, out, tokens, cell_info)
        dash_tokens = blocks(m, texts(None, "heldout"), 128, dashboard_tokens // 128)
        _demo_dashboard(m, sae, model, tmp, out, dash_tokens)
    typer.echo(f"done in {time.time() - t0:.0f} s")


def _demo_outputs(
    m: HookedRecurrentModel,
    sae: WriteSAE,
    metrics: TrainMetrics,
    model: str,
    firings: int,
    seed: int,
    out: Path,
    final: Path,
    tokens: torch.Tensor,
    cell_info: dict[str, Any],
) -> None:
    sae.save(out / "sae")
    report.plot_training(metrics, out / "training.png")
    fin = metrics.final
    training = dict(
        fve=fin["fve"],
        l0=fin["l0"],
        dead_fraction=fin["dead_fraction"],
        steps=metrics.n_steps,
        samples_per_s=metrics.samples_per_s,
    )
    run_evaluations(
        m, sae, model, tokens, out, (True, True, True), firings, seed,
        extra=dict(training=training, cell=cell_info, dashboard="dashboard/index.html"),
        final=final,
    )  # fmt: skip


def _demo_dashboard(
    m: HookedRecurrentModel, sae: WriteSAE, model: str, out: Path, final: Path, tokens: torch.Tensor
) -> None:
    """The atom dashboard beside the report (which links it), with the report's per-atom win
    rates; sequences of 128 tokens leave room for the 64-token memory."""
    win_rates = report_win_rates(out)
    write_dashboard(sae, m, tokens, out / "dashboard", win_rates=win_rates, model_name=model)
    typer.echo(f"dashboard: {final / 'dashboard' / 'index.html'}")
