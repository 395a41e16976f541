"""MLPs: gated (SwiGLU) out = W_out (silu(W_gate x) * (W_in x)), and plain out = W_out act(W_in x)
(Nemotron-H's relu^2 MLP); the low-rank adapter Zamba2 adds to its shared layers' projections."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.hook_points import RecurrentHookPoint

__all__ = ["ACTIVATIONS", "GatedMLP", "LowRankAdapter", "MLP"]


def relu2(x: Tensor) -> Tensor:
    """Squared ReLU, relu(x)^2 (Nemotron-H's "relu2")."""
    return F.relu(x).square()


#: activations by their Hugging Face `hidden_act` name
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "relu2": relu2,
    "gelu": F.gelu,
}


class LowRankAdapter(nn.Module):
    """A low-rank linear map x -> B (A x) without biases (Zamba2's per-layer adapters, LoRA in
    form): `A` `[rank, d_in]`, `B` `[d_out, rank]`; added to the output of a full projection."""

    def __init__(self, d_in: int, rank: int, d_out: int) -> None:
        super().__init__()
        self.A = nn.Linear(d_in, rank, bias=False)
        self.B = nn.Linear(rank, d_out, bias=False)

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        """B (A x)."""
        return self.B(self.A(x))

    @property
    def weight(self) -> Float[Tensor, "d_out d_in"]:
        """The map as one matrix, B A (what it adds to a projection's weight)."""
        return self.B.weight @ self.A.weight


class GatedMLP(nn.Module):
    """Gated MLP (SwiGLU by default) with TransformerLens hook names.

    hook_pre = W_gate x (before the activation), hook_pre_linear = W_in x,
    hook_post = act(hook_pre) * hook_pre_linear, out = W_out hook_post.

    With `adapter_rank` > 0 (Zamba2) a `LowRankAdapter` d_model -> 2 d_mlp is added to the
    concatenated [W_gate; W_in] outputs: its first d_mlp rows to the gate, the rest to W_in x
    (`hook_pre` / `hook_pre_linear` include it).
    """

    def __init__(
        self, d_model: int, d_mlp: int, bias: bool = False, act: str = "silu", adapter_rank: int = 0
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} not supported; one of {sorted(ACTIVATIONS)}")
        self.act: Callable[[Tensor], Tensor] = ACTIVATIONS[act]
        self.d_mlp = d_mlp
        self.W_gate = nn.Linear(d_model, d_mlp, bias=bias)
        self.W_in = nn.Linear(d_model, d_mlp, bias=bias)
        self.W_out = nn.Linear(d_mlp, d_model, bias=bias)
        self.adapter = LowRankAdapter(d_model, adapter_rank, 2 * d_mlp) if adapter_rank else None
        self.hook_pre = RecurrentHookPoint()
        self.hook_pre_linear = RecurrentHookPoint()
        self.hook_post = RecurrentHookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"], run=None) -> Tensor:
        """The gated MLP on `x` `[batch, pos, d_model]`."""
        gate, lin = self.W_gate(x), self.W_in(x)
        if self.adapter is not None:
            a_gate, a_lin = self.adapter(x).split(self.d_mlp, dim=-1)
            gate, lin = gate + a_gate, lin + a_lin
        pre = self.hook_pre(gate)
        lin = self.hook_pre_linear(lin)
        post = self.hook_post(self.act(pre) * lin)
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
