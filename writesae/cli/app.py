"""The `writesae` Typer app and what its commands share: error handling, checks of options,
loading the model and its text.

Every option that sets a `WriteSAEConfig` or `TrainConfig` field takes its default and its help
text from that field (`config_default`, `field_help`), so the CLI and the library say the same.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import typer

from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.pretrained import sample_text
from writesae.checkpoint import TrainingInterrupted
from writesae.config import TrainConfig, WriteSAEConfig, config_default, field_help
from writesae.corpus import Corpus
from writesae.fileio import check_target

__all__ = [
    "app",
    "DEFAULT_MODEL",
    "SAE_HELP",
    "TRAIN_HELP",
    "SAE_DEFAULT",
    "TRAIN_DEFAULT",
    "DATA_HELP",
]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train and evaluate WriteSAEs on hooked recurrent models.",
    pretty_exceptions_enable=False,
)
_DEBUG = {"on": False}

SAE_HELP = field_help(WriteSAEConfig)
TRAIN_HELP = field_help(TrainConfig)
SAE_DEFAULT = config_default(WriteSAEConfig)
TRAIN_DEFAULT = config_default(TrainConfig)
DEFAULT_MODEL = "tiny-qwen3.5-shakespeare"
DATA_HELP = (
    "Corpus instead of --text: a text file, a folder of .txt/.jsonl/.parquet files, or a Hugging "
    "Face dataset id (streamed; documents packed with the tokenizer's EOS between them)."
)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
) -> None:
    """Train and evaluate WriteSAEs on hooked recurrent models."""
    _DEBUG["on"] = debug


def one_line_errors(fn: Callable) -> Callable:
    """Library errors print as one line `error: ...` (exit 1); `--debug` shows the traceback.
    An interrupted `train` says where its checkpoint is (exit 130, or 143 on SIGTERM)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
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
            typer.echo(f"error: {msg}", err=True)
            typer.echo("(run with --debug for the traceback)", err=True)
            raise typer.Exit(1) from None

    return wrapper


def positive(name: str, value: int | None, minimum: int = 1) -> None:
    """A usage error unless `value` (of option `name`) is None or at least `minimum`."""
    if value is not None and value < minimum:
        raise typer.BadParameter(f"{value}; expected an integer >= {minimum}", param_hint=name)


def check_out(path: Path, overwrite: bool, what: str) -> None:
    """A usage error unless `path` can be written (see `writesae.fileio.check_target`)."""
    try:
        check_target(path, overwrite, what)
    except OSError as e:
        raise typer.BadParameter(str(e), param_hint="--out") from None


def parse_rank_band(text: str) -> tuple[int, int]:
    """'lo,hi' as two integers with 1 <= lo < hi."""
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


def load_model(name: str) -> HookedRecurrentModel:
    """The model `name` (shipped name, folder or Hub id) in eval mode."""
    torch.manual_seed(0)
    return HookedRecurrentModel.from_pretrained(name).eval()


def check_text(path: Path | None) -> None:
    """A usage error unless `path` is None or a file."""
    if path is not None and not path.is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint="--text")


def texts(path: Path | None, which: str) -> list[str]:
    """The text of `path`, or the shipped sample `which` ("train" or "heldout")."""
    if path is not None:
        check_text(path)
        return [path.read_text(encoding="utf-8", errors="replace")]
    return [sample_text(which)]


def blocks(
    model: HookedRecurrentModel, texts: list[str], context: int, n: int | None
) -> torch.Tensor:
    """The texts' tokens, concatenated and cut into rows of `context` tokens (at most `n`)."""
    ids = torch.cat([model.to_tokens(t)[0] for t in texts])
    rows = len(ids) // context
    if n is not None:
        rows = min(rows, n)
    if rows == 0:
        raise typer.BadParameter(f"text too short for one block of {context} tokens")
    return ids[: rows * context].view(rows, context)


def corpus(model: HookedRecurrentModel, text: Path | None, data: str | None, context: int):
    """What to stream: the --data corpus (tokenised lazily), else the --text file (or the shipped
    sample) cut into blocks of `context` tokens."""
    if data is None:
        return blocks(model, texts(text, "train"), context, None)
    if text is not None:
        raise typer.BadParameter("give --text or --data, not both", param_hint="--data")
    return Corpus(data, model.tokenizer)


def checkpoint_folder(out: Path, resume: bool, state_file: str = "train_state.pt") -> Path:
    """OUT.checkpoint, checked against --resume (`state_file` is what a checkpoint holds)."""
    ckpt = out.parent / f"{out.name}.checkpoint"
    if resume and not (ckpt / state_file).is_file():
        raise typer.BadParameter(f"no checkpoint at {ckpt} to resume from", param_hint="--resume")
    if not resume and ckpt.exists():
        raise typer.BadParameter(
            f"{ckpt} holds the checkpoint of an interrupted run; pass --resume to continue it, or "
            "delete it to start over",
            param_hint="--resume",
        )
    return ckpt


def cell(model: HookedRecurrentModel, layer: int | None, head: int) -> tuple[int, int]:
    """(layer, head), checked; layer None: the middle recurrent layer."""
    rec = model.cfg.recurrent_layers
    if layer is None:
        layer = rec[len(rec) // 2]
    if layer not in rec:
        raise typer.BadParameter(f"layer {layer} is not recurrent; recurrent layers: {rec}")
    if not 0 <= head < model.cfg.n_heads:
        raise typer.BadParameter(f"head {head} out of range (the model has {model.cfg.n_heads})")
    return layer, head


def check_input_kind(kind: str) -> None:
    """A usage error unless `kind` is 'state' or 'write'."""
    if kind not in ("state", "write"):
        raise typer.BadParameter(
            f"{kind!r}; expected 'state' or 'write'", param_hint="--input-kind"
        )


def shard_meta(shards: Path) -> dict[str, Any]:
    """The `shards.json` of a folder written by `writesae extract`."""
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
