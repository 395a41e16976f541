"""Depthwise causal convolution with a carried buffer, with or without a padding mask.

Used by every family with a short convolution before its recurrence (Gated DeltaNet, Mamba-2 and
the Mamba family). With an `attention_mask` (1 = real token, 0 = padding) a real token's window is
the K-1 previous *real* inputs (or the carried buffer, or zeros at the start of the sequence), and
the buffer handed on holds the last real inputs of each row. This is exact for any mask (left
padding, right padding, or holes), because the real inputs are first gathered to the front of each
row. The unmasked path is one `conv1d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["causal_conv"]


def _plain_causal_conv(
    x: Float[Tensor, "batch pos channels"],
    weight: Float[Tensor, "channels kernel"],
    bias: Tensor | None,
    prev: Float[Tensor, "batch channels kernel_minus_1"] | None,
) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution continuing from the last K-1 inputs `prev` (zeros if None).

    Returns the convolution `[batch, pos, channels]` (before any activation) and the new buffer.
    """
    B, T, C = x.shape
    K = weight.shape[-1]
    xt = x.transpose(1, 2)
    if prev is None:
        prev = xt.new_zeros(B, C, K - 1)
    xp = torch.cat((prev.to(xt.dtype), xt), dim=-1)
    y = F.conv1d(xp, weight[:, None, :], bias, groups=C)
    return y.transpose(1, 2), xp[..., xp.shape[-1] - (K - 1) :]


def _masked_causal_conv(
    x: Float[Tensor, "batch pos channels"],
    weight: Float[Tensor, "channels kernel"],
    bias: Tensor | None,
    prev: Float[Tensor, "batch channels kernel_minus_1"] | None,
    mask: Bool[Tensor, "batch pos"],
) -> tuple[Float[Tensor, "batch pos channels"], Float[Tensor, "batch channels kernel_minus_1"]]:
    """Depthwise causal convolution over the real tokens of each row only.

    Each row's real inputs are gathered after its carried buffer `prev` (zeros if None), convolved,
    and the outputs put back at the real positions. Outputs at masked positions are those of a
    window of real inputs and mean nothing (the mixers zero them). The new buffer is the last K-1
    real inputs of the row (with `prev` in front, so a row with fewer real tokens keeps part of it).

    Returns:
        the convolution `[batch, pos, channels]` (before any activation) and the new buffer.
    """
    B, T, C = x.shape
    K = weight.shape[-1]
    xt = x.transpose(1, 2)
    if prev is None:
        prev = xt.new_zeros(B, C, K - 1)
    xp = torch.cat((prev.to(xt.dtype), xt), dim=-1)  # [B, C, K-1+T]
    valid = torch.cat((mask.new_ones(B, K - 1), mask), dim=-1)
    # real entries first, in order (a stable sort of "is padding"); padding last
    order = torch.sort((~valid).to(torch.uint8), dim=-1, stable=True).indices
    packed = xp.gather(-1, order[:, None, :].expand(B, C, -1))
    # output j is the window packed[j .. j+K-1], ending at packed entry K-1+j: the j-th real token.
    # Windows used below never reach the padding packed at the end of the row.
    y = F.conv1d(packed, weight[:, None, :], bias, groups=C)  # [B, C, T]
    rank = (mask.long().cumsum(-1) - 1).clamp_min(0)  # a real token's index among the real ones
    y = y.gather(-1, rank[:, None, :].expand(B, C, T))
    n_real = mask.long().sum(-1)
    last = n_real[:, None] + torch.arange(K - 1, device=x.device)  # the last K-1 real entries
    buf = packed.gather(-1, last[:, None, :].expand(B, C, K - 1))
    return y.transpose(1, 2), buf


def causal_conv(
    x: Float[Tensor, "batch pos channels"],
    weight: Float[Tensor, "channels kernel"],
    bias: Tensor | None,
    prev: Float[Tensor, "batch channels kernel_minus_1"] | None,
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> tuple[Float[Tensor, "batch pos channels"], Float[Tensor, "batch channels kernel_minus_1"]]:
    """Depthwise causal convolution of `x` continuing from the last K-1 inputs `prev` (zeros if
    None), over the real tokens of each row only where `mask` is given.

    Returns the convolution `[batch, pos, channels]` (before any activation) and the new buffer.
    """
    if mask is None:
        return _plain_causal_conv(x, weight, bias, prev)
    return _masked_causal_conv(x, weight, bias, prev, mask)
