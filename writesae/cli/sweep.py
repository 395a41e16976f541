"""`writesae sweep`: one SAE per cell (layers x heads) from one pass of the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from writesae import distributed as dp
from writesae.cli import options
from writesae.cli.app import (
    SAE_DEFAULT,
    SAE_HELP,
    app,
    check_input_kind,
    check_out,
    checkpoint_folder,
    corpus,
    load_model,
    one_line_errors,
    positive,
)
from writesae.config import TrainConfig
from writesae.sweep import SWEEP_STATE, parse_cells, save_sweep, sweep

__all__ = ["sweep_cmd"]


@app.command("sweep")
@one_line_errors
def sweep_cmd(
    out: Path = typer.Option(..., help="Folder for the sweep: one SAE folder per cell."),
    model: str = options.MODEL,
    text: Path | None = options.TEXT,
    data: str | None = options.DATA,
    layers: str = typer.Option("all", help="Recurrent layers, e.g. 0,1,2, or 'all'."),
    heads: str = typer.Option("all", help="State heads, e.g. 0,3, or 'all'."),
    input_kind: str = typer.Option(SAE_DEFAULT["input_kind"], help=SAE_HELP["input_kind"]),
    n_atoms: int = options.N_ATOMS,
    k: int = options.K,
    steps: int = options.STEPS,
    batch_size: int = options.BATCH_SIZE,
    lr: float = options.LR,
    context: int = options.CONTEXT,
    buffer: int = typer.Option(16384, help="Shuffle buffer, in samples per cell."),
    seed: int = options.SEED,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT.checkpoint."),
    checkpoint_every: int = typer.Option(
        0, "--ckpt-every", help="Checkpoint every this many steps (0: every 5 minutes)."
    ),
    device: str = typer.Option("cpu", help="Device of the model and SAEs: cpu or cuda."),
) -> None:
    """Train one SAE per cell (layers x heads) from one pass of the model over the text.

    Each cell is saved in OUT/layer{l}_head{h} as `writesae train` saves one SAE; with the same
    seed and data it is the SAE `writesae train` gives for that cell.
    """
    for name, v, least in (
        ("--steps", steps, 1), ("--batch-size", batch_size, 1), ("--context", context, 1),
        ("--buffer", buffer, 1), ("--ckpt-every", checkpoint_every, 0),
    ):  # fmt: skip
        positive(name, v, least)
    check_input_kind(input_kind)
    check_out(out, overwrite, "sweep folder")
    ckpt = checkpoint_folder(out, resume, SWEEP_STATE)
    dp.init()
    m = load_model(model).to(device)  # under torchrun with CUDA, "cuda" is GPU LOCAL_RANK
    cfg = TrainConfig(n_steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=False)
    result = sweep(
        m, parse_cells(m, layers, heads), corpus(m, text, data, context), kind=input_kind,
        n_atoms=n_atoms, k=k, cfg=cfg, model_name=model, context_len=context, buffer_size=buffer,
        checkpoint=ckpt, checkpoint_every=checkpoint_every or None, resume=resume,
        log_every=max(1, steps // 20),
    )  # fmt: skip
    save_sweep(result, out, overwrite)
    if dp.is_main():
        shutil.rmtree(ckpt, ignore_errors=True)
        typer.echo(f"saved {len(result)} SAEs in {out}")
