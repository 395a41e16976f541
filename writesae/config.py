"""Configuration dataclasses for WriteSAE / FlatSAE and their trainer.

Every field carries its help text once, in ``field(metadata={"help": ...})``; :func:`field_help`
reads it back so a command-line interface can reuse the same words.

The defaults run on the models shipped with ``hooked_recurrent`` (4 layers, small states); where
the paper (arXiv 2605.12770, Tables 8-10) or its reference code use another value, the help text
says which. Where paper and code disagree the choice is stated in the help text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["WriteSAEConfig", "TrainConfig", "field_help", "config_default"]

ENCODERS = ("bilinear", "dense")
ACTIVATIONS = ("topk", "batchtopk", "relu")
INPUT_KINDS = ("state", "write")
KINDS = ("write", "flat")
DTYPES = ("float32", "float64", "bfloat16", "float16")

_HOOK_RE = re.compile(r"^(?P<prefix>.+)\.hook_(?P<kind>state|write)$")


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a default and its help text (the single source of both)."""
    return field(default=default, metadata={"help": help})


@dataclass
class WriteSAEConfig:
    """Shape and behaviour of one sparse autoencoder for one recurrent cell (layer, head).

    Atom ``A_i = u_i w_i^T`` has ``u_i`` in R^{d_k} on the key side (it meets the read query) and
    ``w_i`` in R^{d_v} on the value side (it is read out through W_O), shaped like the native
    write ``k v^T``.
    """

    d_k: int = field(metadata={"help": "Key-side size of the state/write matrix (rows)."})
    d_v: int = field(metadata={"help": "Value-side size of the state/write matrix (columns)."})
    n_atoms: int = _f(512, "Number of dictionary atoms (features); the paper uses 2048.")
    k: int = _f(
        16,
        "Active atoms per sample for topk (per-sample) and batchtopk (k * batch); the paper "
        "uses 32.",
    )
    hook_name: str = _f(
        "blocks.1.attn.hook_state",
        "Hook the SAE reads its data from: 'blocks.{l}.attn.hook_state' (input kind 'state') or "
        "'blocks.{l}.attn.hook_write' (input kind 'write'). Interventions attach to "
        "'blocks.{l}.attn.hook_write' of the same layer.",
    )
    head: int = _f(0, "State head (index into the hook's head axis) the SAE was trained on.")
    encoder: str = _f(
        "bilinear",
        "Encoder: 'bilinear' (matched filter p_i = e_i^T X f_i + b_i, the paper's WriteSAE) or "
        "'dense' (p_i = <E_i, X>_F + b_i with an unconstrained d_k*d_v row).",
    )
    activation: str = _f(
        "topk",
        "Sparsifier: 'topk' (ReLU of the k largest pre-activations per sample), 'batchtopk' "
        "(ReLU, then the k*B largest over the batch; batch-dependent at inference as in the "
        "reference code) or 'relu' (plain ReLU; use with an L1 penalty in TrainConfig).",
    )
    decoder_bias: bool = _f(
        True,
        "Learn a decoder bias B_dec [d_k, d_v] added at decode time (reference code; the paper "
        "table says no bias). It is not subtracted before encoding (code behaviour).",
    )
    input_kind: str = _f(
        "state",
        "'state': X = S_t, the recurrent state (paper default). 'write': X = the rank-1 write "
        "(strength * k) v^T, handed to the SAE as its two factors.",
    )
    kind: str = _f(
        "write",
        "SAE kind: 'write' (WriteSAE, rank-1 decoder atoms) or 'flat' (FlatSAE baseline on "
        "vec(X)). load_sae() picks the class by it.",
    )
    model_name: str | None = _f(None, "Name of the model the activations came from (metadata).")
    model_fingerprint: str | None = _f(
        None,
        "Fingerprint of the weights of the model the SAE was trained on "
        "(hooked_recurrent.validation.model_fingerprint); evaluating on a model with another "
        "fingerprint is an error unless allow_other_model=True.",
    )
    n_heads: int | None = _f(None, "Number of state heads of the model's layer (metadata/checks).")
    dtype: str = _f(
        "float32",
        "Parameter dtype: float32, float64, bfloat16 or float16 (float16 for use only: Adam "
        "underflows in it, so train() refuses it).",
    )

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("encoder", self.encoder, ENCODERS),
            ("activation", self.activation, ACTIVATIONS),
            ("input_kind", self.input_kind, INPUT_KINDS),
            ("kind", self.kind, KINDS),
            ("dtype", self.dtype, DTYPES),
        ):
            if value not in allowed:
                raise ValueError(f"WriteSAEConfig.{name}={value!r}; expected one of {allowed}")
        for name in ("d_k", "d_v", "n_atoms", "k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"WriteSAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.n_atoms:
            raise ValueError(f"WriteSAEConfig.k={self.k} exceeds n_atoms={self.n_atoms}")
        if self.head < 0:
            raise ValueError(f"WriteSAEConfig.head must be >= 0, got {self.head}")
        if self.n_heads is not None and self.head >= self.n_heads:
            raise ValueError(
                f"WriteSAEConfig.head={self.head} out of range for n_heads={self.n_heads}"
            )
        if _HOOK_RE.match(self.hook_name) is None:
            raise ValueError(
                f"WriteSAEConfig.hook_name={self.hook_name!r} must end in '.hook_state' or "
                "'.hook_write', e.g. 'blocks.1.attn.hook_state'"
            )

    @property
    def hook_prefix(self) -> str:
        """The mixer prefix, e.g. ``'blocks.9.attn'``."""
        return _HOOK_RE.match(self.hook_name).group("prefix")

    @property
    def write_hook_name(self) -> str:
        """Name of the hook interventions attach to, e.g. ``'blocks.9.attn.hook_write'``."""
        return f"{self.hook_prefix}.hook_write"

    @property
    def d_in(self) -> int:
        """Entries of one state matrix, ``d_k * d_v``."""
        return self.d_k * self.d_v

    @property
    def d_sae(self) -> int:
        """Number of atoms (SAELens's name for ``n_atoms``)."""
        return self.n_atoms

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as JSON (what `cfg.json` holds)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WriteSAEConfig:
        """A config from a dict; unknown keys raise an error naming them.

        The key ``architecture`` (the name of ``kind`` in configs saved before the rename) is
        read as ``kind``.
        """
        if "architecture" in d:
            d = dict(d)
            old = d.pop("architecture")
            if d.setdefault("kind", old) != old:
                raise ValueError(f"config has kind={d['kind']!r} and architecture={old!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown WriteSAEConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class TrainConfig:
    """Optimisation hyper-parameters (paper Table 8 unless said otherwise)."""

    n_steps: int = _f(1500, "Number of optimiser steps (one batch each).")
    batch_size: int = _f(256, "Samples per step (used by sources that build batches).")
    lr: float = _f(
        1e-3,
        "Peak learning rate of Adam (betas 0.9/0.999, no weight decay); the paper uses 3e-4 "
        "for its 2048-atom SAEs.",
    )
    min_lr: float = _f(3e-5, "Final learning rate at the end of the cosine decay.")
    warmup_steps: int = _f(50, "Linear warm-up from 0 to lr over this many steps.")
    aux_coef: float = _f(
        1 / 32,
        "Weight of the AuxK dead-atom loss. Paper: 1e-2; reference code: 1.0. We use Gao et "
        "al.'s 1/32, between the two; set 0 to disable.",
    )
    aux_k: int = _f(256, "Dead atoms used by AuxK: min(aux_k, #dead) (reference code: 256).")
    dead_steps: int = _f(
        100, "An atom is dead after this many consecutive batches without a nonzero code."
    )
    resample_every: int = _f(
        250,
        "Resample dead atoms every this many steps (clipped to n_steps // 4 as in the "
        "reference code); 0 disables.",
    )
    resample_enc_scale: float = _f(
        0.2, "Resampled encoder rows get this times the mean alive encoder-row norm."
    )
    l1_coef: float = _f(0.0, "L1 penalty on codes (only useful with activation 'relu').")
    log_every: int = _f(100, "Record metrics (FVE, L0, dead fraction) every this many steps.")
    seed: int = _f(0, "Seed for sampling during resampling and for sources that shuffle.")
    progress: bool = _f(True, "Show a tqdm progress bar.")

    def __post_init__(self) -> None:
        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; expected {accepted}")

        for name, lo in (
            ("n_steps", 1),
            ("batch_size", 1),
            ("warmup_steps", 0),
            ("aux_k", 1),
            ("dead_steps", 1),
            ("resample_every", 0),
            ("log_every", 1),
            ("seed", None),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise TypeError(f"TrainConfig.{name}={v!r}; expected an int")
            if lo is not None and v < lo:
                raise bad(name, f"an int >= {lo}")
        for name, positive in (
            ("lr", True),
            ("min_lr", False),
            ("aux_coef", False),
            ("resample_enc_scale", False),
            ("l1_coef", False),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise TypeError(f"TrainConfig.{name}={v!r}; expected a float")
            if not math.isfinite(v) or v < 0 or (positive and v == 0):
                raise bad(name, "a finite number " + ("> 0" if positive else ">= 0"))


def field_help(cls: type) -> dict[str, str]:
    """Help text of every field of a config dataclass, for CLIs and docs."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def config_default(cls: type) -> dict[str, Any]:
    """Default of every field of a config dataclass that has one, for CLIs (so a command-line
    default is the library's)."""
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }
