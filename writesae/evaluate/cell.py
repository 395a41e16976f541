"""Choosing a cell (layer, head) to study: the heads whose state remembers past writes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from writesae.protocols import ConfiguredModelLike

__all__ = ["median_decays", "memory_cell"]


@torch.no_grad()
def median_decays(
    model: ConfiguredModelLike, tokens: Int[Tensor, "batch pos"]
) -> dict[tuple[int, int], float]:
    """Median forget gate (decay) of every recurrent (layer, head) over `tokens`.

    The decay is `hook_decay`: alpha_t for Qwen3.5, exp(dt_t A_h) for Mamba-2, and for RWKV-7 the
    mean over key channels of exp(w_t). A head whose median decay is near 0 keeps nothing from one
    token to the next: its state is its current write.
    """
    layers = list(model.cfg.recurrent_layers)
    names = [f"blocks.{layer}.attn.hook_decay" for layer in layers]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    out = {}
    for layer, name in zip(layers, names, strict=True):
        d = cache[name].double()
        if d.dim() == 4:
            d = d.mean(-1)
        for h in range(d.shape[-1]):
            out[(layer, h)] = float(d[..., h].median())
    return out


def memory_cell(
    model: ConfiguredModelLike,
    tokens: Int[Tensor, "batch pos"],
    layers: Sequence[int] | None = None,
) -> tuple[int, int, float]:
    """The (layer, head) with the largest median decay among `layers` (default: the last half of
    the recurrent layers), and that median: a cell whose state remembers past writes."""
    rec = list(model.cfg.recurrent_layers)
    layers = rec[len(rec) // 2 :] if layers is None else list(layers)
    dec = median_decays(model, tokens)
    (layer, head), d = max(((k, v) for k, v in dec.items() if k[0] in layers), key=lambda kv: kv[1])
    return layer, head, d
