"""xLSTM's mLSTM cell: a matrix memory with exponential input gates and a max-stabiliser.

Per token t and head h (state key side first), with the gate pre-activations soft-capped,
cap(x) = c tanh(x / c), and q scaled by d_k^-1/2:

    q_t = W_q x / sqrt(d_k),  k_t = W_k x,  v_t = W_v x            [d_k], [d_k], [d_v] per head
    i_t = cap(W_i x + b_i),   log f_t = logsigmoid(cap(W_f x + b_f))   one scalar per head each
    m_t = max(log f_t + m_{t-1}, i_t)              the stabiliser, m_{-1} = 0 (or the carried m)
    S_t = exp(log f_t + m_{t-1} - m_t) S_{t-1} + exp(i_t - m_t) k_t [v_t, 1]^T
    o_t = S_t^T q_t                                 [d_v + 1]: the numerator, then q_t . n_t
    h_t = o_t[:d_v] / (max(|o_t[d_v]|, exp(-m_t)) + eps)
    out = W_out( sigmoid(W_o x) * layernorm_per_head(h) * w )

The state is the *stabilised* one the reference stores: its first d_v columns are C_t exp(-m_t)
and its last column the normaliser n_t exp(-m_t), where C_t = f_t C_{t-1} + exp(i_t) k_t v_t^T
and n_t = f_t n_{t-1} + exp(i_t) k_t are the unstabilised memory and normaliser. m_t depends on
the gates only, never on the state, so the stabilised update is an ordinary transition: a decay
per head, exp(log f_t + m_{t-1} - m_t) <= 1, and a write of strength exp(i_t - m_t) <= 1. Every
factor is at most 1 whatever the length, which is why the stabilised state (not C_t, which grows
like exp(i_t) ~ e^15 per token) is the one `hook_state` shows and generation carries (with m).

The read h_t is a nonlinear function of the state, but only through the linear read o_t: an
edit of the write or the state changes o_t by the engine's exact response, and h_t is computed
from the edited o_t, so edits propagate exactly through the read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.components.mamba2 import chunk_ssd
from hooked_recurrent.hook_points import RecurrentHookPoint
from hooked_recurrent.mixer import RecurrentMixer
from hooked_recurrent.recurrence import Propagation
from hooked_recurrent.state import RunContext

__all__ = ["MLSTMMixer", "soft_cap", "mlstm_stabiliser"]


def soft_cap(x: Float[Tensor, "..."], cap: float | None) -> Float[Tensor, "..."]:
    """cap tanh(x / cap), or x when `cap` is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


def mlstm_stabiliser(
    log_f: Float[Tensor, "batch pos head"],
    i: Float[Tensor, "batch pos head"],
    m0: Float[Tensor, "batch head"],
) -> Float[Tensor, "batch pos head"]:
    """m_t = max(log f_t + m_{t-1}, i_t) from m_{-1} = m0, without a loop over positions.

    Unrolled, m_t = B_t + max(m0, max_{s <= t} (i_s - B_s)) with B_t = log f_0 + ... + log f_t;
    computed in float64 (the running sum B_t grows with t), returned in float32.
    """
    B = log_f.double().cumsum(1)
    best = torch.cummax(i.double() - B, dim=1).values
    return (B + torch.maximum(best, m0.double()[:, None])).float()


class MLSTMMixer(RecurrentMixer):
    """The mLSTM layer of an xLSTM block at `blocks.{l}.attn` (equations in the module docstring).

    Hooks: `hook_q` (scaled by d_k^-1/2), `hook_k` `[batch, pos, head, d_k]`, `hook_v` (the
    write's value side [v_t, 1], the normaliser's constant last) `[batch, pos, head, d_v + 1]`,
    `hook_igate` (i_t), `hook_fgate` (the forget pre-activation after
    its soft cap, before the logsigmoid), `hook_stabiliser` (m_t), `hook_strength`
    (exp(i_t - m_t)), `hook_decay` (exp(log f_t + m_{t-1} - m_t)) `[batch, pos, head]`,
    `hook_write` (exp(i_t - m_t) k_t [v_t, 1]^T) and `hook_state` (the stabilised [C_t, n_t])
    `[batch, pos, head, d_k, d_v + 1]`, `hook_read` (S_t^T q_t, the normaliser's read last)
    `[batch, pos, head, d_v + 1]`, `hook_h` (the normalised read h_t), `hook_gate` (W_o x, before
    its sigmoid) and `hook_z` (what the output projection reads) `[batch, pos, head, d_v]`,
    `hook_out` `[batch, pos, d_model]`.
    """

    write_strength_hook = "hook_strength"

    def __init__(
        self,
        layer: int,
        d_model: int,
        n_heads: int,
        d_k: int,
        d_v: int,
        gate_cap: float | None = 15.0,
        eps: float = 1e-6,
        norm_eps: float = 1e-6,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        self.layer, self.n_heads, self.d_k, self.d_v = layer, n_heads, d_k, d_v
        self.gate_cap, self.eps, self.norm_eps = gate_cap, eps, norm_eps
        self.chunk_size = chunk_size
        self.W_q = nn.Linear(d_model, n_heads * d_k, bias=False)
        self.W_k = nn.Linear(d_model, n_heads * d_k, bias=False)
        self.W_v = nn.Linear(d_model, n_heads * d_v, bias=False)
        self.W_gate = nn.Linear(d_model, n_heads * d_v, bias=False)
        self.W_i = nn.Linear(d_model, n_heads)
        self.W_f = nn.Linear(d_model, n_heads)
        self.norm_w = nn.Parameter(torch.ones(n_heads * d_v))
        self.W_out = nn.Linear(n_heads * d_v, d_model, bias=False)
        self.hook_q = RecurrentHookPoint()  # [batch, pos, head, d_k]
        self.hook_k = RecurrentHookPoint()  # [batch, pos, head, d_k]
        self.hook_v = RecurrentHookPoint()  # [batch, pos, head, d_v + 1]: [v, 1]
        self.hook_igate = RecurrentHookPoint()  # [batch, pos, head]
        self.hook_fgate = RecurrentHookPoint()  # [batch, pos, head]
        self.hook_stabiliser = RecurrentHookPoint()  # [batch, pos, head]
        self.hook_strength = RecurrentHookPoint()  # [batch, pos, head]
        self.hook_decay = RecurrentHookPoint()  # [batch, pos, head]
        self.hook_read = RecurrentHookPoint()  # [batch, pos, head, d_v + 1]
        self.hook_h = RecurrentHookPoint()  # [batch, pos, head, d_v]
        self.hook_gate = RecurrentHookPoint()  # [batch, pos, head, d_v]
        self.hook_z = RecurrentHookPoint()  # [batch, pos, head, d_v]
        self.hook_out = RecurrentHookPoint()  # [batch, pos, d_model]

    def _gates(
        self, x: Tensor, run: RunContext, B: int, T: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(m_t, m_{t-1}, log f_t, i_t) `[batch, pos, head]`, through their hooks; padded
        positions get log f = 0 and i = -inf, so m is carried on unchanged there."""
        past = run.layer_in(self.layer)
        i = self.hook_igate(soft_cap(self.W_i(x).float(), self.gate_cap))
        f = self.hook_fgate(soft_cap(self.W_f(x).float(), self.gate_cap))
        log_f = F.logsigmoid(f)
        if run.mask is not None:
            real = run.mask[..., None]
            log_f = log_f * real
            i = i.masked_fill(~real, float("-inf"))
        m0 = x.new_zeros(B, self.n_heads, dtype=torch.float32) if past is None else past["m"]
        m = self.hook_stabiliser(mlstm_stabiliser(log_f, i, m0))
        m_prev = torch.cat((m0[:, None].to(m.dtype), m[:, :-1]), 1)
        return m, m_prev, log_f, i

    def forward(self, x: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """Run the mixer on `x` `[batch, pos, d_model]` from the state in `run` (if any); returns
        `[batch, pos, d_model]` and saves the final state and stabiliser to `run`."""
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.d_k, self.d_v
        past = run.layer_in(self.layer)
        q = self.W_q(x).float().view(B, T, H, K) * K**-0.5
        k = self.W_k(x).float().view(B, T, H, K)
        v = self.W_v(x).float().view(B, T, H, V)
        if run.mask is not None:  # padding: zero q, k, v (and, below, a zero write, decay 1)
            real = run.mask[..., None, None].float()
            q, k, v = q * real, k * real, v * real
        v1 = torch.cat((v, v.new_ones(B, T, H, 1)), -1)  # the normaliser rides as a last column
        q, k, v1 = self.hook_q(q), self.hook_k(k), self.hook_v(v1)
        m, m_prev, log_f, i = self._gates(x, run, B, T)
        strength = self.hook_strength(torch.exp(i - m))
        log_decay = log_f + m_prev - m
        decay, log_decay = self.hooked_decay(log_decay.exp(), log_decay)

        S0 = None if past is None else past["S"]
        chunk = self.chunk_size
        o, S_T = self.recur(
            lambda: chunk_ssd(q, k, v1, strength, log_decay, S0, chunk),
            self.make_transition(decay),
            q,
            k * strength[..., None],
            v1,
            S0,
            Propagation.from_rule(
                lambda q, k, v, s, a, S0: chunk_ssd(q, k, v, s, a, S0, chunk),
                (q, k, v1, strength, log_decay),
                {2},
            ),
            run,
        )
        run.save(self.layer, S=S_T, m=m[:, -1])
        o = self.hook_read(o)
        floor = torch.maximum(o[..., V].abs(), torch.exp(-m))
        h = self.hook_h(o[..., :V] / (floor + self.eps)[..., None])

        mu = h.mean(-1, keepdim=True)
        var = (h - mu).pow(2).mean(-1, keepdim=True)
        n = ((h - mu) * torch.rsqrt(var + self.norm_eps)).reshape(B, T, H * V)
        gate = self.hook_gate(self.W_gate(x).view(B, T, H, V))
        z = torch.sigmoid(gate.float()) * (n * self.norm_w.float()).view(B, T, H, V)
        z = self.hook_z(z.to(x.dtype))
        return self.hook_out(self.W_out(z.reshape(B, T, H * V)))

    @property
    def W_O(self) -> Float[Tensor, "head d_v d_model"]:
        """The output projection per head (TransformerLens layout):
        hook_out = sum_h hook_z[h] @ W_O[h]."""
        return self.W_out.weight.T.reshape(self.n_heads, self.d_v, -1)

    def head_output_weight(self, head: int) -> Float[Tensor, "d_model d_v_state"]:
        """W_O^(h) `[d_model, d_v + 1]` against the state's columns: the normaliser's column
        reaches the output only through the read's division, so its column here is zero."""
        W = self.W_O[head].T
        return torch.cat((W, W.new_zeros(W.shape[0], 1)), 1)
