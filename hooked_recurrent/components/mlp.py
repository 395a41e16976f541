"""MLPs: gated (SwiGLU) out = W_out (silu(W_gate x) * (W_in x)), and plain out = W_out act(W_in x)
(Nemotron-H's relu^2 MLP)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.hook_points import RecurrentHookPoint

__all__ = ["ACTIVATIONS", "GatedMLP", "MLP"]


def relu2(x: Tensor) -> Tensor:
    """Squared ReLU, relu(x)^2 (Nemotron-H's "relu2")."""
    return F.relu(x).square()


#: activations by their Hugging Face `hidden_act` name
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "relu2": relu2,
    "gelu": F.gelu,
}


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


class MLP(nn.Module):
    """Plain MLP with TransformerLens hook names: hook_pre = W_in x, hook_post = act(hook_pre),
    out = W_out hook_post."""

    def __init__(self, d_model: int, d_mlp: int, act: str = "relu2", bias: bool = False) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} not supported; one of {sorted(ACTIVATIONS)}")
        self.act: Callable[[Tensor], Tensor] = ACTIVATIONS[act]
        self.W_in = nn.Linear(d_model, d_mlp, bias=bias)
        self.W_out = nn.Linear(d_mlp, d_model, bias=bias)
        self.hook_pre = RecurrentHookPoint()  # [batch, pos, d_mlp]
        self.hook_post = RecurrentHookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"], run=None) -> Tensor:
        """The MLP on `x` `[batch, pos, d_model]`."""
        return self.W_out(self.hook_post(self.act(self.hook_pre(self.W_in(x)))))
