"""The options several `writesae` commands take alike (extract, train, sweep, demo, evaluate,
dashboard): one definition each, used as a parameter's default (`n_atoms: int = options.N_ATOMS`).

Every option that sets a `WriteSAEConfig` or `TrainConfig` field takes its default and its help
text from that field. Typer copies an option before it reads it, so commands can share one.
"""

from __future__ import annotations

import typer

from writesae.cli.app import (
    DATA_HELP,
    DEFAULT_MODEL,
    SAE_DEFAULT,
    SAE_HELP,
    TRAIN_DEFAULT,
    TRAIN_HELP,
)

MODEL = typer.Option(DEFAULT_MODEL, help="Model name, folder or Hub id.")
TEXT = typer.Option(None, help="Text file (default: the shipped training sample).")
DATA = typer.Option(None, help=DATA_HELP)
LAYER = typer.Option(None, help="Recurrent layer (default: the middle one).")
N_ATOMS = typer.Option(SAE_DEFAULT["n_atoms"], help=SAE_HELP["n_atoms"])
K = typer.Option(SAE_DEFAULT["k"], help=SAE_HELP["k"])
STEPS = typer.Option(TRAIN_DEFAULT["n_steps"], help=TRAIN_HELP["n_steps"])
BATCH_SIZE = typer.Option(TRAIN_DEFAULT["batch_size"], help=TRAIN_HELP["batch_size"])
LR = typer.Option(TRAIN_DEFAULT["lr"], help=TRAIN_HELP["lr"])
SEED = typer.Option(TRAIN_DEFAULT["seed"], help=TRAIN_HELP["seed"])
CONTEXT = typer.Option(128, help="Tokens per block fed to the model.")
SAE_MODEL = typer.Option(None, help="Model (default: the one the SAE records).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing --out folder (whole).")
