"""Model configuration: the fields every family shares, and one small dataclass per family."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["HookedRecurrentConfig"]


@dataclass
class HookedRecurrentConfig:
    """What every `HookedRecurrentModel` knows about itself.

    Attributes:
        architecture: the family: `"qwen3_5"`, `"mamba2"` or `"rwkv7"`.
        n_layers: number of blocks.
        d_model: width of the residual stream.
        d_vocab: rows of the unembedding (logits width).
        layer_types: per block, `"recurrent"` (a matrix-state mixer) or `"attention"`.
        n_heads: number of state heads of a recurrent mixer (Qwen3.5: `linear_num_value_heads`).
        d_k: key side of one head's state (rows of S).
        d_v: value side of one head's state (columns of S).
        dtype: parameter dtype.
        model_name: the name or path the model was loaded from.
        hf_config: the source configuration, as a plain dict (for round trips and provenance).
    """

    architecture: str
    n_layers: int
    d_model: int
    d_vocab: int
    layer_types: list[str]
    n_heads: int
    d_k: int
    d_v: int
    dtype: torch.dtype = torch.float32
    model_name: str = ""
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (JSON-serialisable)."""
        d = asdict(self)
        d["dtype"] = str(self.dtype)
        return d

    @property
    def recurrent_layers(self) -> list[int]:
        """Indices of the blocks whose mixer has a matrix state."""
        return [i for i, t in enumerate(self.layer_types) if t == "recurrent"]
