"""Reading and writing stacked MoE expert weights in the layouts Hugging Face checkpoints use.

A model in memory (`transformers` 5) stacks its experts: `mlp.experts.gate_up_proj`
`[expert, 2 d_mlp, d_model]` (gate rows, then up rows) and `mlp.experts.down_proj`
`[expert, d_model, d_mlp]`. Published checkpoints, and `save_pretrained`, keep one tensor per
expert under the original names: Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up,
down: MiniMax, Kimi Linear) or `mlp.experts.{e}.gate_proj/up_proj/down_proj` (Qwen2-MoE style:
Bailing). `read_experts` accepts all three and returns our `Experts` tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["read_experts", "moe_prefix"]

#: our names of the stacked expert tensors (`components.moe.Experts`)
_OURS = ("W_gate", "W_in", "W_out")
#: per-expert names (gate, up, down) of the published layouts
_PER_EXPERT = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def moe_prefix(sd: dict[str, Tensor], p: str) -> str:
    """`p + "mlp."` or, for Mixtral-style checkpoints, `p + "block_sparse_moe."` (which Kimi
    Linear's published layout uses for its dense MLPs too)."""
    mixtral = any(f"{p}block_sparse_moe.{n}.weight" in sd for n in ("gate", "gate_proj"))
    return p + ("block_sparse_moe." if mixtral else "mlp.")


def read_experts(
    sd: dict[str, Tensor], prefix: str, n_experts: int, ours: str
) -> dict[str, Tensor]:
    """Our `ours + "W_gate"`, `"W_in"` `[expert, d_mlp, d_model]` and `"W_out"` `[expert, d_model,
    d_mlp]` from the experts under `prefix` (e.g. "model.layers.3.mlp."), in any of the layouts
    of the module docstring."""
    return dict(zip((ours + n for n in _OURS), _read(sd, prefix, n_experts), strict=True))


def _read(sd: dict[str, Tensor], prefix: str, n_experts: int) -> tuple[Tensor, ...]:
    fused = prefix + "experts.gate_up_proj"
    if fused in sd:
        gate_up = sd[fused]
        d_mlp = gate_up.shape[1] // 2
        return gate_up[:, :d_mlp], gate_up[:, d_mlp:], sd[prefix + "experts.down_proj"]
    for names in _PER_EXPERT:
        if f"{prefix}experts.0.{names[0]}.weight" in sd:
            return tuple(  # type: ignore[return-value]
                torch.stack([sd[f"{prefix}experts.{e}.{n}.weight"] for e in range(n_experts)])
                for n in names
            )
    raise KeyError(f"no expert weights under {prefix}experts (fused or per expert)")


def write_experts(sd: dict[str, Tensor], ours: str, prefix: str) -> dict[str, Tensor]:
    """Our expert tensors `ours + "W_gate"` etc. in the stacked in-memory layout of
    `transformers` under `prefix`."""
    W_gate, W_in, W_out = (sd[ours + n] for n in _OURS)
    return {
        prefix + "experts.gate_up_proj": torch.cat((W_gate, W_in), 1),
        prefix + "experts.down_proj": W_out,
    }
