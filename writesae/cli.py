"""The `writesae` command line: extract, train, evaluate, demo.

Every option that sets a `WriteSAEConfig` or `TrainConfig` field takes its help text from that
field's documentation, so the CLI and the library say the same thing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import typer

from writesae.config import TrainConfig, WriteSAEConfig, field_help

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train and evaluate WriteSAEs on hooked recurrent models.",
)
logger = logging.getLogger("writesae")

_S = field_help(WriteSAEConfig)
_T = field_help(TrainConfig)
DEFAULT_MODEL = "tiny-qwen3.5-shakespeare"


def _model(name: str):
    from hooked_recurrent import HookedRecurrentModel

    torch.manual_seed(0)
    return HookedRecurrentModel.from_pretrained(name).eval()


def _texts(path: Path | None, which: str) -> list[str]:
    if path is not None:
        if not path.exists():
            raise typer.BadParameter(f"{path} does not exist")
        return [path.read_text(encoding="utf-8", errors="replace")]
    from hooked_recurrent.pretrained import sample_text

    return [sample_text(which)]


def _blocks(model, texts: list[str], context: int, n: int | None) -> torch.Tensor:
    ids = torch.cat([model.to_tokens(t)[0] for t in texts])
    rows = len(ids) // context
    if n is not None:
        rows = min(rows, n)
    if rows == 0:
        raise typer.BadParameter(f"text too short for one block of {context} tokens")
    return ids[: rows * context].view(rows, context)


def _cell(model, layer: int | None, head: int) -> tuple[int, int]:
    rec = model.cfg.recurrent_layers
    if layer is None:
        layer = rec[len(rec) // 2]
    if layer not in rec:
        raise typer.BadParameter(f"layer {layer} is not recurrent; recurrent layers: {rec}")
    if not 0 <= head < model.cfg.n_heads:
        raise typer.BadParameter(f"head {head} out of range (the model has {model.cfg.n_heads})")
    return layer, head


@app.command()
def extract(
    out: Path = typer.Option(..., help="Folder for the safetensors shards."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model name, folder or Hub id."),
    text: Path = typer.Option(None, help="Text file (default: the shipped training sample)."),
    layer: int = typer.Option(None, help="Recurrent layer (default: the middle one)."),
    head: int = typer.Option(0, help=_S["head"]),
    input_kind: str = typer.Option("state", help=_S["input_kind"]),
    context: int = typer.Option(128, help="Tokens per block."),
    max_samples: int = typer.Option(None, help="Stop after this many samples."),
) -> None:
    """Stream one cell's states (or write factors) from a model into safetensors shards."""
    from writesae.activations import ModelSource, save_shards

    m = _model(model)
    layer, head = _cell(m, layer, head)
    src = ModelSource(
        m,
        _blocks(m, _texts(text, "train"), context, None),
        layer,
        head,
        kind=input_kind,
        context_len=context,
        max_samples=max_samples,
    )
    paths = save_shards(
        src,
        out,
        max_samples=max_samples,
        metadata=dict(model=model, layer=layer, head=head, kind=input_kind),
    )
    typer.echo(f"wrote {len(paths)} shard(s) to {out}")


def _train(
    m,
    model_name: str,
    texts: list[str],
    layer: int,
    head: int,
    n_atoms: int,
    k: int,
    input_kind: str,
    steps: int,
    batch_size: int,
    lr: float,
    context: int,
    seed: int,
    shards: Path | None = None,
):
    from writesae import ModelSource, ShardSource, WriteSAE, train

    cfg = WriteSAEConfig(
        d_k=m.cfg.d_k,
        d_v=m.cfg.d_v,
        n_atoms=n_atoms,
        k=k,
        hook_name=f"blocks.{layer}.attn.hook_{input_kind}",
        head=head,
        input_kind=input_kind,
        model_name=model_name,
        n_heads=m.cfg.n_heads,
    )
    sae = WriteSAE(cfg, seed=seed)
    if shards is not None:
        src = ShardSource(shards, batch_size=batch_size, seed=seed)
    else:
        src = ModelSource(
            m,
            _blocks(m, texts, context, None),
            layer,
            head,
            kind=input_kind,
            batch_size=batch_size,
            context_len=context,
            seed=seed,
        )
    metrics = train(
        sae,
        src,
        TrainConfig(
            n_steps=steps, batch_size=batch_size, lr=lr, seed=seed, log_every=max(1, steps // 20)
        ),
    )
    return sae, metrics


@app.command("train")
def train_cmd(
    out: Path = typer.Option(..., help="Folder to save the SAE in (cfg.json + safetensors)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model name, folder or Hub id."),
    text: Path = typer.Option(None, help="Text file (default: the shipped training sample)."),
    shards: Path = typer.Option(None, help="Train from shards written by `extract` instead."),
    layer: int = typer.Option(None, help="Recurrent layer (default: the middle one)."),
    head: int = typer.Option(0, help=_S["head"]),
    n_atoms: int = typer.Option(512, help=_S["n_atoms"]),
    k: int = typer.Option(16, help=_S["k"]),
    input_kind: str = typer.Option("state", help=_S["input_kind"]),
    steps: int = typer.Option(1500, help=_T["n_steps"]),
    batch_size: int = typer.Option(256, help=_T["batch_size"]),
    lr: float = typer.Option(1e-3, help=_T["lr"]),
    context: int = typer.Option(128, help="Tokens per block fed to the model."),
    seed: int = typer.Option(0, help=_T["seed"]),
) -> None:
    """Train a WriteSAE on one cell (layer, head), streamed from the model (or from shards)."""
    m = _model(model)
    layer, head = _cell(m, layer, head)
    sae, metrics = _train(
        m,
        model,
        _texts(text, "train"),
        layer,
        head,
        n_atoms,
        k,
        input_kind,
        steps,
        batch_size,
        lr,
        context,
        seed,
        shards,
    )
    sae.save(out)
    (Path(out) / "training.json").write_text(json.dumps(metrics.final, indent=2))
    typer.echo(f"saved {out}: " + ", ".join(f"{a}={b:.4g}" for a, b in metrics.final.items()))


def _evaluate(
    m,
    sae,
    model_name: str,
    tokens: torch.Tensor,
    out: Path,
    substitution: bool,
    closed_form: bool,
    install: bool,
    firings: int,
    seed: int,
    extra: dict[str, Any] | None = None,
    rank_band: tuple[int, int] = (100, 1000),
    scale: str = "matched_norm",
    kl_position: str = "edited",
) -> dict[str, Any]:
    from writesae import report
    from writesae.evaluate import (
        evaluate_closed_form,
        evaluate_install,
        evaluate_substitution,
        median_decays,
    )

    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = dict(model=model_name, **(extra or {}))
    results.setdefault("settings", {}).update(
        layer=int(sae.cfg.hook_prefix.split(".")[1]),
        head=sae.cfg.head,
        sae=f"{sae.cfg.n_atoms} atoms, k={sae.cfg.k}, input {sae.cfg.input_kind}",
        eval_prompts=f"{tokens.shape[0]} x {tokens.shape[1]} held-out tokens",
        seed=seed,
    )
    layer, head = int(sae.cfg.hook_prefix.split(".")[1]), sae.cfg.head
    if "cell" not in results and layer in m.cfg.recurrent_layers:
        decay = median_decays(m, tokens[:32])[(layer, head)]
        results["cell"] = dict(layer=layer, head=head, median_decay=decay, how="the SAE's cell")
    timings = {}
    if substitution:
        t0 = time.time()
        sub = evaluate_substitution(
            m,
            sae,
            tokens,
            max_firings=firings,
            positions_per_prompt=max(1, tokens.shape[1] // 4),
            scale=scale,
            kl_position=kl_position,
            best_atom=True,
            planted_cosines=(0.1, 0.5, 0.9),
            sweep_scales=("matched_norm", "coefficient", 0.1),
            population=True,
            seed=seed,
        )
        timings["substitution_s"] = round(time.time() - t0, 1)
        results["substitution"] = sub.to_dict()
        report.plot_substitution(sub, out / "substitution.png")
        report.plot_calibration(sub, out / "calibration.png")
    if closed_form:
        t0 = time.time()
        cf = evaluate_closed_form(m, sae, tokens[:64, :48], n_atoms=8, read_offset=0)
        timings["closed_form_s"] = round(time.time() - t0, 1)
        results["closed_form"] = cf.to_dict()
        report.plot_closed_form(cf, out / "closed_form.png")
    if install:
        t0 = time.time()
        inst = evaluate_install(m, sae, tokens[:15, :32], rank_band=rank_band, seed=seed)
        timings["install_s"] = round(time.time() - t0, 1)
        results["install"] = inst.to_dict()
        report.plot_install(inst, out / "install.png")
    results["top_atoms"] = report.top_atom_contexts(m, sae, tokens[:32])
    results["timings"] = timings
    path = report.write_report(out, results)
    typer.echo(f"report: {path}")
    return results


@app.command()
def evaluate(
    sae: Path = typer.Option(..., help="Folder of a saved SAE."),
    out: Path = typer.Option(..., help="Folder for results.json, report.md and the plots."),
    model: str = typer.Option(None, help="Model (default: the one the SAE records)."),
    text: Path = typer.Option(None, help="Held-out text file (default: the shipped sample)."),
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
) -> None:
    """Evaluate a saved SAE: JSON results plus a Markdown report with PNG plots."""
    from writesae import WriteSAE

    s = WriteSAE.load(sae)
    name = model or s.cfg.model_name
    if not name:
        raise typer.BadParameter("the SAE records no model; pass --model")
    m = _model(name)
    tokens = _blocks(m, _texts(text, "heldout"), context, None)
    band = tuple(int(x) for x in rank_band.split(","))
    _evaluate(
        m,
        s,
        name,
        tokens,
        out,
        substitution,
        closed_form,
        install,
        firings,
        seed,
        rank_band=band,
        scale=scale,
        kl_position=kl_position,
    )


@app.command()
def demo(
    out: Path = typer.Option(Path("writesae-demo"), help="Output folder."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model (a shipped name, folder or Hub id)."),
    layer: int = typer.Option(
        None, help="Recurrent layer (default: chosen with the head by memory, see --head)."
    ),
    head: int = typer.Option(
        None,
        help="Head (default: the head with the largest median decay in --layer, or without "
        "--layer among the last half of the recurrent layers).",
    ),
    n_atoms: int = typer.Option(512, help=_S["n_atoms"]),
    k: int = typer.Option(16, help=_S["k"]),
    steps: int = typer.Option(1500, help=_T["n_steps"]),
    firings: int = typer.Option(600, help="Firings for the substitution test (>= 500)."),
    seed: int = typer.Option(0, help="Seed for everything."),
) -> None:
    """Stream states, train a WriteSAE, run the three evaluations, write the report."""
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(seed)
    t0 = time.time()
    m = _model(model)
    from writesae.evaluate import median_decays, memory_cell

    tokens = _blocks(m, _texts(None, "heldout"), 64, None)
    if head is None:
        rec = m.cfg.recurrent_layers
        layers = rec[len(rec) // 2 :] if layer is None else [_cell(m, layer, 0)[0]]
        layer, head, _ = memory_cell(m, tokens[:32], layers)
        how = f"chosen by memory: the largest median decay among layers {list(layers)}"
    else:
        how = "chosen by the user"
    layer, head = _cell(m, layer, head)
    decay = median_decays(m, tokens[:32])[(layer, head)]
    typer.echo(
        f"model {model}: layer {layer}, head {head} (median decay {decay:.3g}; {how}), "
        f"d_k={m.cfg.d_k}, d_v={m.cfg.d_v}"
    )
    sae, metrics = _train(
        m,
        model,
        _texts(None, "train"),
        layer,
        head,
        n_atoms,
        k,
        "state",
        steps,
        256,
        1e-3,
        128,
        seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    sae.save(out / "sae")
    from writesae import report

    report.plot_training(metrics, out / "training.png")
    fin = metrics.final
    training = dict(
        fve=fin["fve"],
        l0=fin["l0"],
        dead_fraction=fin["dead_fraction"],
        steps=metrics.n_steps,
        samples_per_s=metrics.samples_per_s,
    )
    cell = dict(layer=layer, head=head, median_decay=decay, how=how)
    _evaluate(
        m,
        sae,
        model,
        tokens,
        out,
        True,
        True,
        True,
        firings,
        seed,
        extra=dict(training=training, cell=cell),
    )
    typer.echo(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    app()
