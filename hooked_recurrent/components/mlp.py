"""Gated MLP (SwiGLU): out = W_out (silu(W_gate x) * (W_in x))."""

from __future__ import annotations

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.hook_points import RecurrentHookPoint


class GatedMLP(nn.Module):
    """SwiGLU MLP with TransformerLens hook names.

    hook_pre = W_gate x (before the activation), hook_pre_linear = W_in x,
    hook_post = silu(hook_pre) * hook_pre_linear.
    """

    def __init__(self, d_model: int, d_mlp: int, bias: bool = False) -> None:
        super().__init__()
        self.W_gate = nn.Linear(d_model, d_mlp, bias=bias)
        self.W_in = nn.Linear(d_model, d_mlp, bias=bias)
        self.W_out = nn.Linear(d_mlp, d_model, bias=bias)
        self.hook_pre = RecurrentHookPoint()
        self.hook_pre_linear = RecurrentHookPoint()
        self.hook_post = RecurrentHookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"], run=None) -> Tensor:
        """The gated MLP on `x` `[batch, pos, d_model]`."""
        pre = self.hook_pre(self.W_gate(x))
        lin = self.hook_pre_linear(self.W_in(x))
        post = self.hook_post(F.silu(pre) * lin)
        return self.W_out(post)
