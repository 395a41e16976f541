"""Sparse mixture-of-experts MLP: a router picks `top_k` experts per token, plus a shared expert.

Per token x (d_model):

    logits = W_router x                                       [n_experts]
    scores = softmax(logits)            (scoring="softmax": Qwen3.5-MoE, Qwen3-Next, MiniMax)
           | sigmoid(logits)            (scoring="sigmoid": Kimi Linear, Bailing, Nemotron-H)
    chosen = top_k(scores + b)          b = `score_bias` (sigmoid routers' load-balancing
                                        correction; zero otherwise), optionally only among the
                                        `topk_group` best of `n_group` expert groups
    w_j = scores[chosen_j]              (/ sum_j w_j if norm_topk), times `routed_scale`
    y = sum_j w_j E_{chosen_j}(x)  +  [sigmoid(W_shared_gate x)] * E_shared(x)

Softmax then top-k then renormalise (`norm_topk=True`) is the same as top-k on the logits then a
softmax over the chosen ones. Each expert is a SwiGLU MLP `W_out (act(W_gate x) * W_in x)`, or
`W_out act(W_in x)` with `gated=False` (Nemotron-H's relu^2 experts).

Hooks (TransformerLens's MoE names where it has them):

* `hook_router_logits` `[batch, pos, n_experts]`: W_router x.
* `hook_expert_indices` `[batch, pos, top_k]` (int64): the chosen experts, in the router's order.
* `hook_expert_weights` `[batch, pos, top_k]`: w_j, the weights that multiply the chosen experts'
  outputs (after normalisation and scaling). Zero one to ablate that expert at that token.
* `hook_expert_out` `[batch, pos, top_k, d_model]`: E_{chosen_j}(x), each chosen expert's output
  before its weight, in the order of `hook_expert_indices` (expert e's output at a token is the
  slot j where `hook_expert_indices[..., j] == e`). Only the chosen experts run; a dense
  `[.., n_experts, d_model]` tensor would cost n_experts / top_k times the memory.
* `shared_expert.hook_pre/hook_pre_linear/hook_post` (a `GatedMLP`; a plain `MLP`, without
  `hook_pre_linear`, when the experts are not gated), `hook_shared_gate`
  `[batch, pos, 1]` (sigmoid of the shared gate, where the family has one) and `hook_shared_out`
  `[batch, pos, d_model]` (the shared expert's contribution, after its gate).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_recurrent.components.mlp import MLP, GatedMLP
from hooked_recurrent.hook_points import RecurrentHookPoint

__all__ = ["MoE", "Experts"]

_SCORINGS = ("softmax", "sigmoid")


#: an expert's token rows are padded to a multiple of this many (see `_pad_rows`)
ROW_BLOCK = 16


def _pad_rows(x: Float[Tensor, "n d_model"]) -> Float[Tensor, "m d_model"]:
    """`x` with zero rows appended up to a multiple of `ROW_BLOCK` (at least one block).

    BLAS picks other kernels, with other rounding, for matrices of a few rows. Without the
    padding, an edit that re-routes a later token changes how many rows an expert gets, and with
    it the last bits of that expert's output at earlier tokens; with it, positions before an edit
    stay bit-for-bit unchanged (a zero row costs little: small products are bound by reading the
    expert's weights)."""
    m = max(ROW_BLOCK, -(-len(x) // ROW_BLOCK) * ROW_BLOCK)
    return F.pad(x, (0, 0, 0, m - len(x))) if m > len(x) else x


class Experts(nn.Module):
    """`n_experts` MLPs with their weights stacked (nn.Linear layout: `[expert, out, in]`)."""

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        d_mlp: int,
        gated: bool = True,
        act: Callable[[Tensor], Tensor] = F.silu,
    ) -> None:
        super().__init__()
        self.n_experts, self.gated, self.act = n_experts, gated, act
        if gated:
            self.W_gate = nn.Parameter(torch.zeros(n_experts, d_mlp, d_model))
        self.W_in = nn.Parameter(torch.zeros(n_experts, d_mlp, d_model))
        self.W_out = nn.Parameter(torch.zeros(n_experts, d_model, d_mlp))

    def expert(self, e: int, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
        """Expert `e` on the rows of `x`."""
        if self.gated:
            h = self.act(x @ self.W_gate[e].T) * (x @ self.W_in[e].T)
        else:
            h = self.act(x @ self.W_in[e].T)
        return h @ self.W_out[e].T

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], idx: Int[Tensor, "batch pos top_k"]
    ) -> Float[Tensor, "batch pos top_k d_model"]:
        """The chosen experts' outputs: `out[b, t, j] = E_{idx[b, t, j]}(x[b, t])`."""
        B, T, D = x.shape
        k = idx.shape[-1]
        flat, fidx = x.reshape(B * T, D), idx.reshape(B * T, k)
        if fidx.numel() and (fidx.min() < 0 or fidx.max() >= self.n_experts):
            raise ValueError(
                f"expert indices must lie in [0, {self.n_experts}); got {fidx.min()}..{fidx.max()}"
            )
        out = flat.new_zeros(B * T, k, D)
        for e in fidx.unique().tolist():
            tok, slot = torch.where(fidx == e)
            out[tok, slot] = self.expert(e, _pad_rows(flat[tok]))[: len(tok)]
        return out.view(B, T, k, D)


class MoE(nn.Module):
    """Sparse MoE MLP at `blocks.{l}.mlp` (equations and hooks in the module docstring).

    Args:
        d_model: residual width.
        d_mlp: each routed expert's hidden width.
        n_experts: routed experts.
        top_k: experts each token uses.
        scoring: "softmax" or "sigmoid" (see the module docstring).
        norm_topk: renormalise the chosen weights to sum to 1.
        routed_scale: factor on the routed weights (`routed_scaling_factor`).
        score_bias: keep a `score_bias` buffer `[n_experts]` added to the scores for the choice
            only (`e_score_correction_bias`).
        n_group: equal groups of experts for the group limit (1: none).
        topk_group: choose only among the experts of the `topk_group` groups whose two best
            scores sum highest.
        d_shared: hidden width of the shared expert (0: none).
        shared_gate: scale the shared expert by sigmoid(W_shared_gate x) (Qwen).
        gated: SwiGLU experts, else `W_out act(W_in x)` (see `Experts`); the shared expert has
            the same form (a `GatedMLP`, or with `gated=False` a plain `MLP` with `shared_act`).
        act: the experts' activation.
        shared_act: the plain shared expert's activation name (see `mlp.ACTIVATIONS`).
    """

    def __init__(
        self,
        d_model: int,
        d_mlp: int,
        n_experts: int,
        top_k: int,
        scoring: str = "softmax",
        norm_topk: bool = True,
        routed_scale: float = 1.0,
        score_bias: bool = False,
        n_group: int = 1,
        topk_group: int = 1,
        d_shared: int = 0,
        shared_gate: bool = False,
        gated: bool = True,
        act: Callable[[Tensor], Tensor] = F.silu,
        shared_act: str = "relu2",
    ) -> None:
        super().__init__()
        if scoring not in _SCORINGS:
            raise ValueError(f"scoring must be one of {_SCORINGS}, not {scoring!r}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must lie in [1, n_experts={n_experts}], not {top_k}")
        if n_experts % n_group or not 1 <= topk_group <= n_group:
            raise ValueError(
                f"n_group={n_group} must divide n_experts={n_experts} and "
                f"1 <= topk_group={topk_group} <= n_group"
            )
        self.n_experts, self.top_k, self.scoring = n_experts, top_k, scoring
        self.norm_topk, self.routed_scale = norm_topk, routed_scale
        self.n_group, self.topk_group = n_group, topk_group
        self.W_router = nn.Linear(d_model, n_experts, bias=False)
        if score_bias:
            self.register_buffer("score_bias", torch.zeros(n_experts))
        else:
            self.score_bias = None
        self.experts = Experts(n_experts, d_model, d_mlp, gated, act)
        self.shared_expert = None
        if d_shared:
            self.shared_expert = (
                GatedMLP(d_model, d_shared) if gated else MLP(d_model, d_shared, shared_act)
            )
        self.W_shared_gate = nn.Linear(d_model, 1, bias=False) if d_shared and shared_gate else None
        self.hook_router_logits = RecurrentHookPoint()  # [batch, pos, n_experts]
        self.hook_expert_indices = RecurrentHookPoint()  # [batch, pos, top_k]
        self.hook_expert_weights = RecurrentHookPoint()  # [batch, pos, top_k]
        self.hook_expert_out = RecurrentHookPoint()  # [batch, pos, top_k, d_model]
        if self.W_shared_gate is not None:
            self.hook_shared_gate = RecurrentHookPoint()  # [batch, pos, 1]
        if self.shared_expert is not None:
            self.hook_shared_out = RecurrentHookPoint()  # [batch, pos, d_model]

    def route(
        self, logits: Float[Tensor, "batch pos n_experts"]
    ) -> tuple[Int[Tensor, "batch pos top_k"], Float[Tensor, "batch pos top_k"]]:
        """(chosen experts, their weights) from the router logits, in float32."""
        scores = logits.float().softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.score_bias is None else scores + self.score_bias.float()
        if self.topk_group < self.n_group:
            grouped = choice.unflatten(-1, (self.n_group, -1))
            best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(best, dtype=torch.bool)
            keep.scatter_(-1, best.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(-2)
        idx = choice.topk(self.top_k, dim=-1).indices
        w = scores.gather(-1, idx)
        if self.norm_topk:
            w = w / (w.sum(-1, keepdim=True) + (1e-20 if self.scoring == "sigmoid" else 0.0))
        return idx, w * self.routed_scale

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], run=None
    ) -> Float[Tensor, "batch pos d_model"]:
        """The MoE MLP on `x`; `run` is accepted for the block interface and unused."""
        # sigmoid routers run in float32 (their checkpoints keep the router weight in float32)
        if self.scoring == "sigmoid":
            logits = F.linear(x.float(), self.W_router.weight.float())
        else:
            logits = self.W_router(x)
        logits = self.hook_router_logits(logits)
        idx, w = self.route(logits)
        idx = self.hook_expert_indices(idx)
        w = self.hook_expert_weights(w.to(logits.dtype))
        out = self.hook_expert_out(self.experts(x, idx))
        y = (w[..., None].to(out.dtype) * out).sum(-2)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.W_shared_gate is not None:
                shared = self.hook_shared_gate(torch.sigmoid(self.W_shared_gate(x))) * shared
            y = y + self.hook_shared_out(shared)
        return y
