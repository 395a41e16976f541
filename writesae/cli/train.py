"""`writesae train`: a WriteSAE on one cell (layer, head), from the model or from shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import typer

from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.validation import model_fingerprint
from writesae import distributed as dp
from writesae.activations import ModelSource, ShardSource
from writesae.cli import options
from writesae.cli.app import (
    DEFAULT_MODEL,
    SAE_DEFAULT,
    SAE_HELP,
    app,
    blocks,
    cell,
    check_input_kind,
    check_out,
    check_text,
    checkpoint_folder,
    corpus,
    load_model,
    one_line_errors,
    positive,
    shard_meta,
)
from writesae.config import TrainConfig, WriteSAEConfig
from writesae.fileio import atomic_dir
from writesae.saes import WriteSAE
from writesae.train import TrainMetrics, train

__all__ = ["train_sae", "train_cmd"]


def train_sae(
    m: HookedRecurrentModel,
    model_name: str,
    texts: Any,
    cell: tuple[int, int],
    sae_options: dict[str, Any],
    train_options: dict[str, Any],
    context: int,
    shards: Path | None = None,
    **checkpointing: Any,
) -> tuple[WriteSAE, TrainMetrics]:
    """A WriteSAE for `cell` trained on the model's `texts` (a list of strings, or what
    `ModelSource` streams: token blocks, a `Corpus`), or on `shards`.

    `sae_options` holds `n_atoms`, `k`, `input_kind`; `train_options` holds `n_steps`,
    `batch_size`, `lr`, `seed`; `checkpointing` goes to `writesae.train`.
    """
    layer, head = cell
    cfg = WriteSAEConfig(
        d_k=m.cfg.d_k,
        d_v=m.cfg.d_v,
        hook_name=f"blocks.{layer}.attn.hook_{sae_options['input_kind']}",
        head=head,
        model_name=model_name,
        model_fingerprint=model_fingerprint(m),
        n_heads=m.cfg.n_heads,
        **sae_options,
    )
    seed, batch_size = train_options["seed"], train_options["batch_size"]
    sae = WriteSAE(cfg, seed=seed)
    src: ShardSource | ModelSource
    if shards is not None:
        src = ShardSource(shards, batch_size=batch_size, seed=seed)
    else:
        src = ModelSource(
            m, blocks(m, texts, context, None) if isinstance(texts, list) else texts, layer, head,
            kind=cfg.input_kind,
            batch_size=batch_size, context_len=context, seed=seed,
        )  # fmt: skip
    tcfg = TrainConfig(log_every=max(1, train_options["n_steps"] // 20), **train_options)
    return sae, train(sae, src, tcfg, **checkpointing)


def _from_shards(shards: Path, given: dict[str, Any], text: Path | None) -> dict[str, Any]:
    """The cell, input kind and model recorded by the shards, for the options not given; a
    given option that conflicts with the shards is a usage error."""
    meta = shard_meta(shards)
    for key in ("layer", "head", "input_kind"):
        recorded = meta.get(key, meta.get("kind") if key == "input_kind" else None)
        if given[key] is not None and recorded is not None and given[key] != recorded:
            opt = "--" + key.replace("_", "-")
            raise typer.BadParameter(
                f"{opt} {given[key]} conflicts with the shards ({shards}/shards.json records "
                f"{key} {recorded!r}); leave it out, the shards set it",
                param_hint=opt,
            )
    if text is not None:
        raise typer.BadParameter("give --text or --shards, not both", param_hint="--text")
    recorded = dict(
        layer=meta.get("layer"),
        head=meta.get("head"),
        input_kind=meta.get("input_kind", meta.get("kind")),
        model=meta.get("model"),
    )
    out = {k: recorded[k] if v is None else v for k, v in given.items()}
    out["model_fingerprint"] = meta.get("model_fingerprint")
    out["shards_model"] = meta.get("model")
    return out


def _check_shards_model(given: dict[str, Any], m: HookedRecurrentModel, model: str) -> None:
    """A usage error if the shards record the fingerprint of another model than `m`."""
    fp = given.get("model_fingerprint")
    if fp and fp != model_fingerprint(m):
        raise typer.BadParameter(
            f"the shards were extracted from another model (fingerprint {fp}, model "
            f"{given['shards_model']!r}) than {model!r}",
            param_hint="--model",
        )


@app.command("train")
@one_line_errors
def train_cmd(
    out: Path = typer.Option(..., help="Folder to save the SAE in (cfg.json + safetensors)."),
    model: str | None = typer.Option(
        None, help=f"Model name, folder or Hub id (default: the shards' model, or {DEFAULT_MODEL})."
    ),
    text: Path | None = options.TEXT,
    shards: Path | None = typer.Option(
        None, help="Train from shards written by `extract` instead (their layer, head, kind)."
    ),
    data: str | None = options.DATA,
    layer: int | None = options.LAYER,
    head: int | None = typer.Option(
        None, help=SAE_HELP["head"] + f" Default {SAE_DEFAULT['head']}, or the shards' head."
    ),
    n_atoms: int = options.N_ATOMS,
    k: int = options.K,
    input_kind: str | None = typer.Option(
        None,
        help=SAE_HELP["input_kind"] + f" Default {SAE_DEFAULT['input_kind']!r}, or the shards'.",
    ),
    steps: int = options.STEPS,
    batch_size: int = options.BATCH_SIZE,
    lr: float = options.LR,
    context: int = options.CONTEXT,
    seed: int = options.SEED,
    overwrite: bool = options.OVERWRITE,
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the checkpoint OUT.checkpoint of an interrupted run."
    ),
    checkpoint_every: int = typer.Option(
        0,
        "--ckpt-every",
        help="Checkpoint to OUT.checkpoint every this many steps (0: every 5 minutes).",
    ),
) -> None:
    """Train a WriteSAE on one cell (layer, head), streamed from the model (or from shards).

    Checkpoints (also on Ctrl-C) go to OUT.checkpoint; --resume continues from there.
    """
    for name, value, least in (
        ("--steps", steps, 1), ("--batch-size", batch_size, 1), ("--context", context, 1),
        ("--ckpt-every", checkpoint_every, 0),
    ):  # fmt: skip
        positive(name, value, least)
    train_options: dict[str, Any] = dict(n_steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    try:
        TrainConfig(**train_options)
        WriteSAEConfig(d_k=1, d_v=1, n_atoms=n_atoms, k=k)
    except (ValueError, TypeError) as e:
        raise typer.BadParameter(str(e)) from None
    given: dict[str, Any] = dict(layer=layer, head=head, input_kind=input_kind, model=model)
    given = given if shards is None else _from_shards(shards, given, text)
    head = SAE_DEFAULT["head"] if given["head"] is None else given["head"]
    input_kind = given["input_kind"] or SAE_DEFAULT["input_kind"]
    model = given["model"] or DEFAULT_MODEL
    check_input_kind(input_kind)
    check_text(text)
    check_out(out, overwrite, "SAE folder")
    ckpt = checkpoint_folder(out, resume)
    dp.init()  # under torchrun: join the process group (every rank trains on its rows)
    m = load_model(model)
    layer, head = cell(m, given["layer"], head)
    _check_shards_model(given, m, model)
    sae, metrics = train_sae(
        m, model, [] if shards is not None else corpus(m, text, data, context), (layer, head),
        dict(n_atoms=n_atoms, k=k, input_kind=input_kind), train_options, context, shards,
        checkpoint=ckpt, checkpoint_every=checkpoint_every or None, resume=resume,
    )  # fmt: skip
    if dp.is_main():  # under torchrun one rank writes; every rank holds the same SAE
        with atomic_dir(out, overwrite, "SAE folder") as tmp:
            sae.save_into(tmp)
            (tmp / "training.json").write_text(json.dumps(metrics.final, indent=2))
        shutil.rmtree(ckpt, ignore_errors=True)
        typer.echo(f"saved {out}: " + ", ".join(f"{a}={b:.4g}" for a, b in metrics.final.items()))
    dp.barrier()
