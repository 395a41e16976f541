"""`writesae extract`: one cell's states (or write factors) into safetensors shards."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import cast

import typer
from torch import Tensor

from writesae import distributed as dp
from writesae.activations import ModelSource, WriteFactors, save_shards
from writesae.cli import options
from writesae.cli.app import (
    SAE_HELP,
    app,
    cell,
    check_input_kind,
    check_out,
    check_text,
    corpus,
    load_model,
    one_line_errors,
    positive,
)


@app.command()
@one_line_errors
def extract(
    out: Path = typer.Option(..., help="Folder for the safetensors shards."),
    model: str = options.MODEL,
    text: Path | None = options.TEXT,
    data: str | None = options.DATA,
    layer: int | None = options.LAYER,
    head: int = typer.Option(0, help=SAE_HELP["head"]),
    input_kind: str = typer.Option("state", help=SAE_HELP["input_kind"]),
    context: int = typer.Option(128, help="Tokens per block."),
    max_samples: int | None = typer.Option(None, help="Stop after this many samples."),
    overwrite: bool = options.OVERWRITE,
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted extract from its last complete shard."
    ),
) -> None:
    """Stream one cell's states (or write factors) from a model into safetensors shards.

    shards.json records the model, layer, head, input kind and token count (train reads them).
    Under torchrun every rank runs the model on its share of the text and writes its own shards.
    """
    positive("--context", context)
    positive("--max-samples", max_samples)
    check_input_kind(input_kind)
    check_text(text)
    check_out(out, overwrite, "shard folder")
    dp.init()
    m = load_model(model)
    layer, head = cell(m, layer, head)
    src = ModelSource(
        m, corpus(m, text, data, context), layer, head, kind=input_kind, context_len=context,
        max_samples=max_samples, share=False, drop_last=False,
    )  # fmt: skip
    paths = save_shards(
        cast(Iterable[Tensor | WriteFactors], src),  # one cell: single batches, no dicts
        out,
        max_samples=max_samples,
        metadata=dict(model=model, layer=layer, head=head, kind=input_kind, input_kind=input_kind),
        overwrite=overwrite,
        resume=resume,
    )
    if dp.is_main():
        typer.echo(f"wrote {len(paths)} shard(s) to {out}")
