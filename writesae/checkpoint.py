"""Training checkpoints: the whole training state in one folder, written atomically, and the
interruption that leaves one behind."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from writesae.config import TrainConfig
from writesae.fileio import atomic_dir
from writesae.saes import BaseSAE

__all__ = ["TrainingInterrupted", "CHECKPOINT_FILE", "save_checkpoint", "load_checkpoint"]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after a checkpoint was written.

    Attributes:
        step: the number of steps done (and saved).
        checkpoint: the checkpoint folder; ``train(..., checkpoint=it, resume=True)`` continues.
        signum: the signal received.
    """

    def __init__(self, step: int, checkpoint: Path, signum: int):
        super().__init__(f"training interrupted at step {step}; checkpoint in {checkpoint}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


CHECKPOINT_FILE = "train_state.pt"


def _cfg_for_resume(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint's (all but the progress bar)."""
    d = asdict(cfg)
    d.pop("progress")
    return d


def save_checkpoint(
    path: Path,
    sae: BaseSAE,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    step: int,
    since_fired: Tensor,
    gen: torch.Generator,
    metrics: dict[str, Any],
) -> None:
    """Write the training state (SAE, optimiser, dead-atom counters, generator, metrics) whole
    into the folder ``path``."""
    state = {
        "step": step,
        "sae_cfg": sae.cfg.to_dict(),
        "train_cfg": _cfg_for_resume(cfg),
        "sae": {k: v.detach().clone() for k, v in sae.state_dict().items()},
        "optimizer": opt.state_dict(),
        "since_fired": since_fired.clone(),
        "generator": gen.get_state(),
        "metrics": metrics,
    }
    with atomic_dir(path, overwrite=True, what="checkpoint") as tmp:
        torch.save(state, tmp / CHECKPOINT_FILE)


def load_checkpoint(path: Path, sae: BaseSAE, cfg: TrainConfig) -> dict[str, Any]:
    """The training state saved by :func:`save_checkpoint`, after checking that it is of this
    SAE config and these training settings."""
    f = path / CHECKPOINT_FILE
    if not f.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {f}; run without --resume to start")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{f}: cannot read the checkpoint ({e})") from e
    if state["sae_cfg"] != sae.cfg.to_dict():
        diff = sorted(k for k, v in sae.cfg.to_dict().items() if state["sae_cfg"].get(k) != v)
        raise ValueError(f"{f}: the checkpoint is of another SAE config (differs in {diff})")
    if state["train_cfg"] != _cfg_for_resume(cfg):
        diff = sorted(k for k, v in _cfg_for_resume(cfg).items() if state["train_cfg"].get(k) != v)
        raise ValueError(f"{f}: the checkpoint has other training settings (differs in {diff})")
    return state
