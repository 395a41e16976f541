"""Short-range buffers under an attention mask: RWKV-7's token shift (the causal convolution under
a mask is `hooked_recurrent.components.conv.causal_conv` with `mask=`).

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
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["masked_token_shift"]


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
