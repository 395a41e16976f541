"""Normalisation layers, each with a `hook_normalized` on its output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.hook_points import RecurrentHookPoint


def _through_scale_hook(hook: RecurrentHookPoint, inv: Tensor) -> tuple[Tensor, Tensor]:
    """1 / scale after `hook_scale`: the same value `inv` where the hook left the scale unchanged
    (bit-exact), 1 / edited scale elsewhere; gradients reach x through the hook only."""
    native = inv.reciprocal()
    scale = hook(native.clone())
    r = scale.reciprocal()
    kept = scale == native
    return torch.where(kept, inv.detach() + (r - r.detach()), r), kept


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
        self.hook_scale = RecurrentHookPoint()  # sqrt(mean(x^2) + eps) [..., 1], as in TL
        self.hook_normalized = RecurrentHookPoint()

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """Normalise `x` over its last axis (see the class docstring)."""
        xf = x.float()
        inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.hook_scale.active or self.hook_scale._backward_hooks:
            inv, _ = _through_scale_hook(self.hook_scale, inv)
        n = xf * inv
        if self.zero_centred:
            y = (n * (1.0 + self.w.float())).to(x.dtype)
        else:
            y = self.w * n.to(self.w.dtype)
        return self.hook_normalized(y)


class LayerNorm(nn.Module):
    """Standard LayerNorm with bias (RWKV-7): y = w (x - mean(x)) / scale + b."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.hook_scale = RecurrentHookPoint()  # sqrt(var(x) + eps) [..., 1], as in TL
        self.hook_normalized = RecurrentHookPoint()

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """Normalise `x` over its last axis (see the class docstring)."""
        y = F.layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)
        if self.hook_scale.active or self.hook_scale._backward_hooks:
            xc = x - x.mean(-1, keepdim=True)
            inv = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
            inv, kept = _through_scale_hook(self.hook_scale, inv)
            # the fused kernel's output where the scale was not edited (bit-exact), else rebuilt
            manual = xc * inv * self.w + self.b
            y = torch.where(kept, y.detach() + (manual - manual.detach()), manual)
        return self.hook_normalized(y)
