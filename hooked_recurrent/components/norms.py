"""Normalisation layers, each with a `hook_normalized` on its output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.hook_points import RecurrentHookPoint


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32.

    `zero_centred=True` is Qwen3.5's convention: the scale is (1 + w) with w initialised at zero,
    and it is applied before casting back; otherwise the scale is w (Mamba-2), applied after.
    """

    def __init__(self, d: int, eps: float, zero_centred: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centred = zero_centred
        self.w = nn.Parameter(torch.zeros(d) if zero_centred else torch.ones(d))
        self.hook_normalized = RecurrentHookPoint()

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """Normalise `x` over its last axis (see the class docstring)."""
        xf = x.float()
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centred:
            y = (n * (1.0 + self.w.float())).to(x.dtype)
        else:
            y = self.w * n.to(self.w.dtype)
        return self.hook_normalized(y)


class LayerNorm(nn.Module):
    """Standard LayerNorm with bias (RWKV-7)."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.hook_normalized = RecurrentHookPoint()

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """Normalise `x` over its last axis (see the class docstring)."""
        y = F.layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)
        return self.hook_normalized(y)
