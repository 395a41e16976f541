"""The `writesae` command line: extract, train, evaluate, demo, dashboard.

Every option that sets a `WriteSAEConfig` or `TrainConfig` field takes its help text from that
field's documentation, so the CLI and the library say the same thing.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import typer

from writesae.config import TrainConfig, WriteSAEConfig, field_help
from writesae.dashboards.command import dashboard_cmd
from writesae.fileio import atomic_dir, check_target

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train and evaluate WriteSAEs on hooked recurrent models.",
    pretty_exceptions_enable=False,
)
logger = logging.getLogger("writesae")
_DEBUG = {"on": False}


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
) -> None:
    """Train and evaluate WriteSAEs on hooked recurrent models."""
    _DEBUG["on"] = debug


def _one_line_errors(fn: Callable) -> Callable:
    """Library errors print as one line `error: ...` (exit 1); `--debug` shows the traceback.
    An interrupted `train` says where its checkpoint is (exit 130, or 143 on SIGTERM)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from writesae.train import TrainingInterrupted

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except TrainingInterrupted as e:
            typer.echo(
                f"interrupted at step {e.step}; checkpoint saved in {e.checkpoint}. Run the same "
                "command with --resume to continue.",
                err=True,
            )
            raise typer.Exit(128 + e.signum) from None
        except (ValueError, TypeError, OSError, FloatingPointError, KeyError) as e:
            if _DEBUG["on"]:
                raise
            msg = str(e) if not isinstance(e, KeyError) else f"missing {e}"
            typer.echo(f"error: {msg}" + ("" if msg.endswith(".") else ""), err=True)
            typer.echo("(run with --debug for the traceback)", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise typer.BadParameter(f"{value}; expected an integer >= {minimum}", param_hint=name)


def _out(path: Path, overwrite: bool, what: str) -> None:
    try:
        check_target(path, overwrite, what)
    except OSError as e:
        raise typer.BadParameter(str(e), param_hint="--out") from None


def _rank_band(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}; expected two integers 'lo,hi' with 1 <= lo < hi, e.g. 100,1000",
            param_hint="--rank-band",
        ) from None
    if not 1 <= lo < hi:
        raise typer.BadParameter(
            f"{text!r}; expected 1 <= lo < hi, e.g. 100,1000", param_hint="--rank-band"
        )
    return lo, hi


_S = field_help(WriteSAEConfig)
_T = field_help(TrainConfig)
DEFAULT_MODEL = "tiny-qwen3.5-shakespeare"


def _model(name: str):
    from hooked_recurrent import HookedRecurrentModel

    torch.manual_seed(0)
    return HookedRecurrentModel.from_pretrained(name).eval()


def _check_text(path: Path | None) -> None:
    if path is not None and not path.is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint="--text")


def _texts(path: Path | None, which: str) -> list[str]:
    if path is not None:
        _check_text(path)
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


def _input_kind(kind: str) -> None:
    if kind not in ("state", "write"):
        raise typer.BadParameter(
            f"{kind!r}; expected 'state' or 'write'", param_hint="--input-kind"
        )


@app.command()
@_one_line_errors
def extract(
    out: Path = typer.Option(..., help="Folder for the safetensors shards."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model name, folder or Hub id."),
    text: Path = typer.Option(None, help="Text file (default: the shipped training sample)."),
    layer: int = typer.Option(None, help="Recurrent layer (default: the middle one)."),
    head: int = typer.Option(0, help=_S["head"]),
    input_kind: str = typer.Option("state", help=_S["input_kind"]),
    context: int = typer.Option(128, help="Tokens per block."),
    max_samples: int = typer.Option(None, help="Stop after this many samples."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out folder (whole)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted extract from its last complete shard."
    ),
) -> None:
    """Stream one cell's states (or write factors) from a model into safetensors shards.

    shards.json records the model, layer, head, input kind and token count (train reads them).
    """
    from writesae.activations import ModelSource, save_shards

    _positive("--context", context)
    _positive("--max-samples", max_samples)
    _input_kind(input_kind)
    _check_text(text)
    _out(out, overwrite, "shard folder")
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
        metadata=dict(model=model, layer=layer, head=head, kind=input_kind, input_kind=input_kind),
        overwrite=overwrite,
        resume=resume,
    )
    typer.echo(f"wrote {len(paths)} shard(s) to {out}")


def _shard_meta(shards: Path) -> dict[str, Any]:
    meta_path = shards / "shards.json"
    if not meta_path.is_file():
        raise typer.BadParameter(
            f"{meta_path} not found: not a folder written by `writesae extract`",
            param_hint="--shards",
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise typer.BadParameter(
            f"{meta_path}: not valid JSON ({e})", param_hint="--shards"
        ) from None
    if not isinstance(meta, dict):
        raise typer.BadParameter(f"{meta_path}: expected a JSON object", param_hint="--shards")
    return meta


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
    checkpoint: Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
):
    from hooked_recurrent.validation import model_fingerprint
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
        model_fingerprint=model_fingerprint(m),
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
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    return sae, metrics


@app.command("train")
@_one_line_errors
def train_cmd(
    out: Path = typer.Option(..., help="Folder to save the SAE in (cfg.json + safetensors)."),
    model: str = typer.Option(
        None, help=f"Model name, folder or Hub id (default: the shards' model, or {DEFAULT_MODEL})."
    ),
    text: Path = typer.Option(None, help="Text file (default: the shipped training sample)."),
    shards: Path = typer.Option(
        None, help="Train from shards written by `extract` instead (their layer, head, kind)."
    ),
    layer: int = typer.Option(None, help="Recurrent layer (default: the middle one)."),
    head: int = typer.Option(None, help=_S["head"] + " Default 0, or the shards' head."),
    n_atoms: int = typer.Option(512, help=_S["n_atoms"]),
    k: int = typer.Option(16, help=_S["k"]),
    input_kind: str = typer.Option(None, help=_S["input_kind"] + " Default 'state'."),
    steps: int = typer.Option(1500, help=_T["n_steps"]),
    batch_size: int = typer.Option(256, help=_T["batch_size"]),
    lr: float = typer.Option(1e-3, help=_T["lr"]),
    context: int = typer.Option(128, help="Tokens per block fed to the model."),
    seed: int = typer.Option(0, help=_T["seed"]),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out folder (whole)."
    ),
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
    _positive("--steps", steps)
    _positive("--batch-size", batch_size)
    _positive("--context", context)
    _positive("--ckpt-every", checkpoint_every, 0)
    try:
        TrainConfig(n_steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        WriteSAEConfig(d_k=1, d_v=1, n_atoms=n_atoms, k=k)
    except (ValueError, TypeError) as e:
        raise typer.BadParameter(str(e)) from None
    if shards is not None:
        meta = _shard_meta(shards)
        for opt, given, key in (
            ("--layer", layer, "layer"),
            ("--head", head, "head"),
            ("--input-kind", input_kind, "input_kind"),
        ):
            recorded = meta.get(key, meta.get("kind") if key == "input_kind" else None)
            if given is not None and recorded is not None and given != recorded:
                raise typer.BadParameter(
                    f"{opt} {given} conflicts with the shards ({shards}/shards.json records "
                    f"{key} {recorded!r}); leave it out, the shards set it",
                    param_hint=opt,
                )
        if layer is None:
            layer = meta.get("layer")
        if head is None:
            head = meta.get("head")
        if input_kind is None:
            input_kind = meta.get("input_kind", meta.get("kind"))
        if model is None:
            model = meta.get("model")
        if text is not None:
            raise typer.BadParameter("give --text or --shards, not both", param_hint="--text")
    head = 0 if head is None else head
    input_kind = input_kind or "state"
    model = model or DEFAULT_MODEL
    _input_kind(input_kind)
    _check_text(text)
    _out(out, overwrite, "SAE folder")
    ckpt = out.parent / f"{out.name}.checkpoint"
    if resume and not (ckpt / "train_state.pt").is_file():
        raise typer.BadParameter(f"no checkpoint at {ckpt} to resume from", param_hint="--resume")
    if not resume and ckpt.exists():
        raise typer.BadParameter(
            f"{ckpt} holds the checkpoint of an interrupted run; pass --resume to continue it, or "
            "delete it to start over",
            param_hint="--resume",
        )
    m = _model(model)
    layer, head = _cell(m, layer, head)
    if shards is not None:
        from hooked_recurrent.validation import model_fingerprint

        fp = meta.get("model_fingerprint")
        if fp and fp != model_fingerprint(m):
            raise typer.BadParameter(
                f"the shards were extracted from another model (fingerprint {fp}, model "
                f"{meta.get('model')!r}) than {model!r}",
                param_hint="--model",
            )
    sae, metrics = _train(
        m,
        model,
        [] if shards is not None else _texts(text, "train"),
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
        checkpoint=ckpt,
        checkpoint_every=checkpoint_every or None,
        resume=resume,
    )
    with atomic_dir(out, overwrite, "SAE folder") as tmp:
        sae._write(tmp)
        (tmp / "training.json").write_text(json.dumps(metrics.final, indent=2))
    shutil.rmtree(ckpt, ignore_errors=True)
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
    final: Path | None = None,
    allow_other_model: bool = False,
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
            allow_other_model=allow_other_model,
        )
        timings["substitution_s"] = round(time.time() - t0, 1)
        results["substitution"] = sub.to_dict()
        report.plot_substitution(sub, out / "substitution.png")
        report.plot_calibration(sub, out / "calibration.png")
    if closed_form:
        t0 = time.time()
        cf = evaluate_closed_form(
            m, sae, tokens[:64, :48], n_atoms=8, read_offset=0, allow_other_model=allow_other_model
        )
        timings["closed_form_s"] = round(time.time() - t0, 1)
        results["closed_form"] = cf.to_dict()
        report.plot_closed_form(cf, out / "closed_form.png")
    if install:
        t0 = time.time()
        inst = evaluate_install(
            m, sae, tokens[:15, :32], rank_band=rank_band, seed=seed,
            allow_other_model=allow_other_model,
        )  # fmt: skip
        timings["install_s"] = round(time.time() - t0, 1)
        results["install"] = inst.to_dict()
        report.plot_install(inst, out / "install.png")
    results["top_atoms"] = report.top_atom_contexts(m, sae, tokens[:32])
    results["timings"] = timings
    path = report.write_report(out, results)
    typer.echo(f"report: {(final / path.name) if final is not None else path}")
    return results


@app.command()
@_one_line_errors
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
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out folder (whole)."
    ),
    allow_other_model: bool = typer.Option(
        False,
        "--allow-other-model",
        help="Evaluate on a model other than the one the SAE was trained on.",
    ),
) -> None:
    """Evaluate a saved SAE: JSON results plus a Markdown report with PNG plots."""
    from writesae import WriteSAE

    _positive("--firings", firings)
    _positive("--context", context, 2)
    band = _rank_band(rank_band)
    _check_text(text)
    if not sae.is_dir():
        raise typer.BadParameter(f"{sae} is not a folder", param_hint="--sae")
    _out(out, overwrite, "report folder")
    s = WriteSAE.load(sae)
    name = model or s.cfg.model_name
    if not name:
        raise typer.BadParameter("the SAE records no model; pass --model")
    m = _model(name)
    s.check_model(m, allow_other_model=allow_other_model)
    tokens = _blocks(m, _texts(text, "heldout"), context, None)
    with atomic_dir(out, overwrite, "report folder") as tmp:
        _evaluate(
            m, s, name, tokens, tmp, substitution, closed_form, install, firings, seed,
            rank_band=band, scale=scale, kl_position=kl_position, final=out,
            allow_other_model=allow_other_model,
        )  # fmt: skip


@app.command()
@_one_line_errors
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
    dashboard_tokens: int = typer.Option(
        32768, help="Held-out tokens (sequences of 128) the atom dashboard runs over."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out folder (whole)."
    ),
) -> None:
    """Stream states, train a WriteSAE, run the three evaluations, write the report and the atom
    dashboard."""
    _positive("--steps", steps)
    _positive("--firings", firings)
    _positive("--dashboard-tokens", dashboard_tokens, 128)
    try:
        WriteSAEConfig(d_k=1, d_v=1, n_atoms=n_atoms, k=k)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    _out(out, overwrite, "demo folder")
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
    cell = dict(layer=layer, head=head, median_decay=decay, how=how)
    with atomic_dir(out, overwrite, "demo folder") as tmp:
        _demo_outputs(m, sae, metrics, model, firings, seed, tmp, out, tokens, cell)
        blocks = _blocks(m, _texts(None, "heldout"), 128, dashboard_tokens // 128)
        _demo_dashboard(m, sae, model, tmp, out, blocks)
    typer.echo(f"done in {time.time() - t0:.0f} s")


def _demo_outputs(
    m, sae, metrics, model, firings, seed, out: Path, final: Path, tokens, cell: dict
) -> None:
    from writesae import report

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
    _evaluate(
        m, sae, model, tokens, out, True, True, True, firings, seed,
        extra=dict(training=training, cell=cell, dashboard="dashboard/index.html"), final=final,
    )  # fmt: skip


def _demo_dashboard(m, sae, model: str, out: Path, final: Path, blocks: torch.Tensor) -> None:
    """The atom dashboard beside the report (linked from it), with the report's per-atom win
    rates; sequences of 128 tokens leave room for the 64-token memory."""
    from writesae.dashboards import dashboard
    from writesae.dashboards.command import report_win_rates

    win_rates = report_win_rates(out)
    dashboard(sae, m, blocks, out / "dashboard", win_rates=win_rates, model_name=model)
    typer.echo(f"dashboard: {final / 'dashboard' / 'index.html'}")


app.command("dashboard")(_one_line_errors(dashboard_cmd))


def main() -> None:
    """Entry point: the `writesae` app."""
    app()


if __name__ == "__main__":
    sys.exit(main())
