"""Kimi Delta Attention (KDA): the delta rule with a decay per key channel (Kimi Linear, Bailing).

Per token t and head h (d_k = d_v = d_head, state key side first):

    [q~, k~, v] = silu(causal_conv1d([W_q x, W_k x, W_v x]))      depthwise, kernel K, no bias
    q = l2norm(q~) / sqrt(d_k),  k = l2norm(k~)                   l2norm(x) = x / sqrt(|x|^2 + 1e-6)
    beta = sigmoid(W_b x)                                         per head
    f = W_f x + dt_bias     (W_f = W_fb W_fa, low rank, on Kimi Linear)      per key channel
    g = -exp(A_log_h) softplus(f)                decay="softplus" (Kimi Linear)
      | lower_bound * sigmoid(exp(A_log_h) f)    decay="safe" (Bailing): g in (lower_bound, 0)
    S_t = (I - beta_t k_t k_t^T) diag(exp g_t) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t
    out = W_out( norm_w * rmsnorm_head(o_t) * sigmoid(W_g x) )   (W_g = W_gb W_ga on Kimi Linear)

The transition is RWKV-7's shape, diag(d) S + a (b^T S) with d = exp(g), a = -beta k and
b = d * k (the decay acts before the removal), so the fast path and the edit propagation are
`chunk_dplr_rule`'s (`DplrMixer`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.components.conv import causal_conv
from hooked_recurrent.components.gated_deltanet import l2norm
from hooked_recurrent.components.rwkv7 import DplrMixer, chunk_dplr_rule
from hooked_recurrent.hook_points import RecurrentHookPoint
from hooked_recurrent.recurrence import Propagation, Transition
from hooked_recurrent.state import RunContext

__all__ = ["KimiDeltaAttention"]

_DECAYS = ("softplus", "safe")


def _projection(d_in: int, d_out: int, rank: int | None) -> nn.Module:
    """W x, or W_b (W_a x) through a rank-`rank` bottleneck (Kimi Linear's gates)."""
    if rank is None:
        return nn.Linear(d_in, d_out, bias=False)
    return nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=False))


class KimiDeltaAttention(DplrMixer):
    """KDA at `blocks.{l}.attn` (equations in the module docstring).

    The layer index, widths, head count, head size and convolution kernel are the family's
    shapes; `eps` is the output norm's epsilon.

    Args:
        decay: "softplus" (Kimi Linear) or "safe" (Bailing's bounded gate).
        lower_bound: the bound of the safe gate (negative).
        gate_rank: the bottleneck of the forget and output gate projections (Kimi Linear: d_head),
            None for full projections (Bailing).

    Hooks: `hook_q`, `hook_k` (normalised, q scaled) `[batch, pos, head, d_k]`, `hook_v`
    `[batch, pos, head, d_v]`, `hook_beta` `[batch, pos, head]`, `hook_decay` (exp g, per key
    channel) `[batch, pos, head, d_k]`, `hook_write` (beta k v^T) and `hook_state` (S_t)
    `[batch, pos, head, d_k, d_v]`, `hook_read` (S_t^T q_t) `[batch, pos, head, d_v]`,
    `hook_gate` (W_g x, before its sigmoid) and `hook_z` (what the output projection reads)
    `[batch, pos, head, d_v]`, `hook_out` `[batch, pos, d_model]`. An edit of `hook_decay` changes
    the decay and, through b = d * k, the removal that follows it.
    """

    write_strength_hook = "hook_beta"

    def __init__(
        self,
        layer: int,
        d_model: int,
        n_heads: int,
        d_head: int,
        conv_kernel: int,
        eps: float,
        decay: str = "softplus",
        lower_bound: float = -5.0,
        gate_rank: int | None = None,
        chunk_size: int = 16,
    ) -> None:
        super().__init__()
        if decay not in _DECAYS:
            raise ValueError(f"decay must be one of {_DECAYS}, not {decay!r}")
        self.layer, self.n_heads, self.d_head = layer, n_heads, d_head
        self.decay, self.lower_bound = decay, lower_bound
        self.eps, self.chunk_size = eps, chunk_size
        width = n_heads * d_head
        self.W_q = nn.Linear(d_model, width, bias=False)
        self.W_k = nn.Linear(d_model, width, bias=False)
        self.W_v = nn.Linear(d_model, width, bias=False)
        self.conv_w = nn.Parameter(torch.zeros(3 * width, conv_kernel))
        self.W_b = nn.Linear(d_model, n_heads, bias=False)
        self.W_f = _projection(d_model, width, gate_rank)
        self.dt_bias = nn.Parameter(torch.zeros(width))
        self.A_log = nn.Parameter(torch.zeros(n_heads))
        self.W_g = _projection(d_model, width, gate_rank)
        self.norm_w = nn.Parameter(torch.ones(d_head))
        self.W_out = nn.Linear(width, d_model, bias=False)
        self.hook_q = RecurrentHookPoint()  # [batch, pos, head, d_k]
        self.hook_k = RecurrentHookPoint()  # [batch, pos, head, d_k]
        self.hook_v = RecurrentHookPoint()  # [batch, pos, head, d_v]
        self.hook_beta = RecurrentHookPoint()  # [batch, pos, head]
        self.hook_decay = RecurrentHookPoint()  # [batch, pos, head, d_k]
        self.hook_read = RecurrentHookPoint()  # [batch, pos, head, d_v]
        self.hook_gate = RecurrentHookPoint()  # [batch, pos, head, d_v]
        self.hook_z = RecurrentHookPoint()  # [batch, pos, head, d_v]
        self.hook_out = RecurrentHookPoint()  # [batch, pos, d_model]

    transition_hooks = ("hook_decay", "hook_beta", "hook_k")

    @staticmethod
    def make_transition(
        decay: Float[Tensor, "*lead d_k"],
        beta: Float[Tensor, " *lead"],
        k: Float[Tensor, "*lead d_k"],
    ) -> Transition:
        """A_t(S) = (I - beta_t k_t k_t^T) diag(d_t) S = diag(d_t) S - beta_t k_t (d_t k_t)^T S."""
        return Transition(decay, -beta[..., None] * k, decay * k)

    def log_decay(
        self, x: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos head d_k"]:
        """g `[batch, pos, head, d_k]` (float32), the log of the decay."""
        B, T, _ = x.shape
        f = (self.W_f(x).float() + self.dt_bias.float()).view(B, T, self.n_heads, self.d_head)
        rate = self.A_log.float().exp()[:, None]
        if self.decay == "safe":
            return self.lower_bound * torch.sigmoid(rate * f)
        return -rate * F.softplus(f)

    def forward(self, x: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """Run KDA on `x` `[batch, pos, d_model]` from the state in `run` (if any); returns
        `[batch, pos, d_model]` and saves the final state and convolution buffer to `run`.
        """
        B, T, _ = x.shape
        H, D = self.n_heads, self.d_head
        past = run.layer_in(self.layer)
        m = None if run.mask is None else run.mask[..., None]  # padding: zero inputs, identity step
        if m is not None:
            x = x * m.to(x.dtype)
        qkv = torch.cat((self.W_q(x), self.W_k(x), self.W_v(x)), -1)
        prev = None if past is None else past["conv"]
        conv, conv_buf = causal_conv(qkv, self.conv_w, None, prev, run.mask)
        conv = F.silu(conv)
        if m is not None:
            conv = conv * m.to(conv.dtype)
        q, k, v = (c.float().view(B, T, H, D) for c in conv.split(H * D, dim=-1))
        q = self.hook_q(l2norm(q) / math.sqrt(D))
        k = self.hook_k(l2norm(k))
        v = self.hook_v(v)
        beta = torch.sigmoid(self.W_b(x)).float()
        g = self.log_decay(x)
        if m is not None:
            beta, g = beta * m, g * m[..., None]  # beta 0, decay 1 at padded positions
        beta = self.hook_beta(beta)
        d, g = self.hooked_decay(g.exp(), g)

        S0 = None if past is None else past["S"]
        k_w = beta[..., None] * k
        tr = self.make_transition(d, beta, k)
        rule_inputs = (q, g, k_w, v, tr.erase_a, tr.erase_b)
        propagation = Propagation.from_rule(
            lambda q, g, k, v, a, b, S0: chunk_dplr_rule(q, g, k, v, a, b, S0, self.chunk_size)[:2],
            rule_inputs,
            {2, 3},
            dense=self.dense_propagation,
        )
        o, S_T = self.recur(
            lambda: chunk_dplr_rule(*rule_inputs, S0, self.chunk_size)[:2],
            tr,
            q,
            k_w,
            v,
            S0,
            propagation,
            run,
        )
        run.save(self.layer, S=S_T, conv=conv_buf)
        o = self.hook_read(o)

        n = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)
        gate = self.hook_gate(self.W_g(x).view(B, T, H, D))
        z = self.hook_z((self.norm_w.float() * n * torch.sigmoid(gate.float())).to(x.dtype))
        return self.hook_out(self.W_out(z.reshape(B, T, H * D)))

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        """The output projection per head (TransformerLens layout):
        hook_out = sum_h hook_z[h] @ W_O[h]."""
        return self.W_out.weight.T.reshape(self.n_heads, self.d_head, -1)
