"""Short-range buffers under an attention mask: causal convolution and token shift.

With an `attention_mask` (1 = real token, 0 = padding) a padded position must leave the model as if
it were absent. The recurrent state is handled in the mixers (zero write, identity transition at
masked positions); the short-range buffers are handled here: the causal convolution of a real
token sees the K-1 previous *real* inputs (or the carried buffer, or zeros at the start of the
sequence), RWKV-7's token shift sees the previous real token, and the buffers handed on to the
next call hold the last real inputs of each row. This is exact for any mask (left padding, right
padding, or holes), because the real inputs are first gathered to the front of each row.

Only used when a mask with zeros is given: the unmasked path is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["masked_causal_conv", "masked_token_shift"]


def masked_causal_conv(
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


def masked_token_shift(
    x: Float[Tensor, "batch pos d"],
    prev: Float[Tensor, "batch d"] | None,
    mask: Bool[Tensor, "batch pos"],
) -> tuple[Float[Tensor, "batch pos d"], Float[Tensor, "batch d"]]:
    """The previous real token for every position, and the last real token of each row.

    For position t the previous real token of its row (`prev`, or zeros when None, if there is
    none), so the first real token after left padding is shifted as at the start of a sequence.

    Returns:
        (h_{t-1} `[batch, pos, d]`, the new shift buffer `[batch, d]`: the last real token, or
        `prev` / zeros for a row without one).
    """
    B, T, D = x.shape
    first = x.new_zeros(B, 1, D) if prev is None else prev[:, None].to(x.dtype)
    xp = torch.cat((first, x), dim=1)  # [B, T+1, D]
    valid = torch.cat((mask.new_ones(B, 1), mask), dim=1)
    idx = torch.arange(T + 1, device=x.device).expand(B, T + 1) * valid
    last_valid = idx.cummax(dim=1).values  # the last real index <= j (0: the carried token)
    shifted = xp.gather(1, last_valid[:, :T, None].expand(B, T, D))
    new = xp.gather(1, last_valid[:, T:, None].expand(B, 1, D))[:, 0]
    return shifted, new
