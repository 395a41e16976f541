"""What a model carries from one token to the next, and the context of one forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["RecurrentState", "RunContext"]


@dataclass
class RecurrentState:
    """Per-layer carried state of a `HookedRecurrentModel` after `offset` tokens.

    `layers[l]` is a dict of tensors whose keys depend on the layer's kind:

    * recurrent mixers: `"S"` the matrix state `[batch, head, d_k, d_v]` (float32, key side first)
      and the mixer's short-range buffer (`"conv"`: the last K-1 pre-convolution inputs
      `[batch, channels, K-1]`, or RWKV-7's `"shift"`: the previous normalised token; xLSTM has
      none, but carries its stabiliser `"m"` `[batch, head]`, the scale of its stabilised `"S"`);
    * attention layers: `"k"`, `"v"`: the KV cache `[batch, kv_head, pos, d_head]` (keys rotated);
    * blocks with a token-shifted MLP (RWKV-7): `"mlp_shift"`.

    `mask` is the attention mask `[batch, offset]` of every token seen so far (1 = real token), or
    None when all were real. The attention layers use it to skip padded keys in the KV cache and
    to count RoPE positions over real tokens; the recurrent layers need nothing from it (a padded
    position left their state and buffers as they were).
    """

    offset: int
    layers: list[dict[str, Tensor]]
    mask: Tensor | None = None

    @property
    def n_real(self) -> Tensor | int:
        """The number of real (unpadded) tokens seen by each row `[batch]` (or `offset`)."""
        return self.offset if self.mask is None else self.mask.long().sum(-1)

    @property
    def batch_size(self) -> int:
        """Batch size of the stored tensors (0 for an empty state)."""
        for layer in self.layers:
            for t in layer.values():
                return t.shape[0]
        return 0

    def clone(self) -> RecurrentState:
        """A copy with every tensor cloned."""
        return RecurrentState(
            self.offset,
            [{k: v.clone() for k, v in layer.items()} for layer in self.layers],
            None if self.mask is None else self.mask.clone(),
        )

    def index_batch(self, idx: Tensor | slice) -> RecurrentState:
        """The state of a subset of the batch (e.g. to drop finished sequences)."""
        return RecurrentState(
            self.offset,
            [{k: v[idx] for k, v in layer.items()} for layer in self.layers],
            None if self.mask is None else self.mask[idx],
        )

    def tile(self, n: int) -> RecurrentState:
        """The whole batch stacked n times (rows [batch] * n), the layout of `tokens.repeat(n, 1)`:
        to run n variants of every row from the same state in one call."""
        return RecurrentState(
            self.offset,
            [
                {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in layer.items()}
                for layer in self.layers
            ],
            None if self.mask is None else self.mask.repeat(n, 1),
        )

    def to(self, device: torch.device | str) -> RecurrentState:
        """The state with every tensor moved to `device`."""
        return RecurrentState(
            self.offset,
            [{k: v.to(device) for k, v in layer.items()} for layer in self.layers],
            None if self.mask is None else self.mask.to(device),
        )


@dataclass
class RunContext:
    """The context of one forward pass, handed to every block.

    Attributes:
        positions: absolute positions `[pos]` of the tokens in this call.
        state_in: the state to start from (None: the empty state).
        state_out: filled by the layers when the caller asked for the final state.
        shared: values that one layer hands to later ones (RWKV-7's v_first).
        mask: `[batch, pos]` bool, True at the real tokens of this call, or None when every token
            is real (the recurrent mixers then skip all masking).
        key_mask: `[batch, offset + pos]` bool over the past and this call's tokens, for the
            attention layers, or None when every token so far is real.
        row_positions: `[batch, pos]` RoPE positions counted over each row's real tokens, or None
            when they are `positions` for every row.
    """

    positions: Tensor
    state_in: RecurrentState | None = None
    state_out: list[dict[str, Tensor]] | None = None
    shared: dict[str, Tensor] = field(default_factory=dict)
    mask: Tensor | None = None
    key_mask: Tensor | None = None
    row_positions: Tensor | None = None

    def layer_in(self, layer: int) -> dict[str, Tensor] | None:
        """The incoming state of one layer, or None at the start of a sequence."""
        return None if self.state_in is None else self.state_in.layers[layer]

    def save(self, layer: int, **tensors: Tensor) -> None:
        """Record a layer's outgoing state tensors (when the caller asked for the state)."""
        if self.state_out is not None:
            self.state_out[layer].update(tensors)
