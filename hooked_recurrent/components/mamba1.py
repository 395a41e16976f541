"""Mamba-1 (the selective SSM, Gu & Dao 2023, Algorithm 2) token mixer, in the order of its
equations.

Per token t, with d_inner channels and a state of d_state entries per channel. We hold the state
key side first, as one head: S in R^{d_state x d_inner}, the transpose of the Hugging Face /
mamba_ssm layout [d_inner, d_state]:

    [x~, z] = W_in u                                         split: d_inner | d_inner
    x_t = silu(causal_conv1d(x~)_t + conv_bias)               depthwise, kernel K
    [dt~, B_t, C_t] = W_x x_t                                 split: dt_rank | d_state | d_state
    (Falcon-Mamba: RMSNorm without weights on dt~, B_t, C_t; Jamba: with weights)
    dt_t = softplus(W_dt dt~ + b_dt)                          one step size per channel [d_inner]
    A = -exp(A_log)                                           [d_inner, d_state]
    S_t = exp(dt_t A)^T * S_{t-1} + B_t (dt_t * x_t)^T        elementwise decay per state entry
    o_t = S_t^T C_t                                           the read [d_inner]
    y_t = (o_t + D * x_t) * silu(z_t)
    out = W_out y

Hooks (at `blocks.{l}.attn.`), one head: `hook_x` = x_t `[batch, pos, 1, d_inner]` (before W_x,
so an edit changes dt, B and C too), `hook_q` = C_t and `hook_k` = B_t `[batch, pos, 1, d_state]`,
`hook_dt` = dt_t `[batch, pos, 1, d_inner]`, `hook_v` = dt_t * x_t `[batch, pos, 1, d_inner]`
(the write's value: the step size is per value channel, so it is part of the value, and the write
is the rank-1 `hook_k hook_v^T`), `hook_decay` = exp(dt_t A)^T, `hook_write` = B_t (dt_t * x_t)^T
and `hook_state` = S_t `[batch, pos, 1, d_state, d_inner]`, `hook_read` = o_t (before the D skip)
`[batch, pos, 1, d_inner]`, `hook_gate` = z_t (before its silu), `hook_z` = y_t (what W_out reads)
`[batch, pos, 1, d_inner]`, `hook_out` `[batch, pos, d_model]`.

Editing semantics: `hook_dt` fires before the value and the decay are computed, so an edited dt
changes both, as in the model; `hook_v` and `hook_decay` fire after and override one of them.
An edited `hook_x` feeds W_x and the D skip and, through dt * x, the write.

The fast path is `recurrence.chunked_reads` on the elementwise transition (about 3 sqrt(T)
sequential steps over the d_state x d_inner state); one decoding step is one recurrence step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.components.conv import causal_conv
from hooked_recurrent.hook_points import RecurrentHookPoint
from hooked_recurrent.mixer import RecurrentMixer
from hooked_recurrent.recurrence import Propagation, Transition, chunked_reads
from hooked_recurrent.state import RunContext

__all__ = ["Mamba1Mixer"]

#: the norm on dt~, B and C: none (Mamba), RMSNorm without weights (Falcon-Mamba), RMSNorm with
#: weights (Jamba)
BCDT_NORMS = ("none", "weightless", "weighted")


def _rms(x: Tensor, w: Tensor | None, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps), times w when given (float32)."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else w.float() * y


class Mamba1Mixer(RecurrentMixer):
    """Mamba-1 token mixer at `blocks.{l}.attn` (see the module docstring for its equations).

    Parameters (Hugging Face name in brackets): `W_in` [in_proj], `conv_w` `[d_inner, K]` and
    `conv_b` [conv1d.weight squeezed, conv1d.bias], `W_x` [x_proj], `W_dt` [dt_proj], `A_log`
    `[d_inner, d_state]`, `D`, `W_out` [out_proj]; with `bcdt_norm="weighted"` also `dt_norm_w`,
    `B_norm_w`, `C_norm_w` [dt_layernorm, b_layernorm, c_layernorm .weight].
    """

    write_strength_hook = None  # dt is per value channel: it is folded into hook_v

    def __init__(
        self,
        layer: int,
        d_model: int,
        d_inner: int,
        d_state: int,
        dt_rank: int,
        conv_kernel: int,
        use_conv_bias: bool = True,
        use_bias: bool = False,
        bcdt_norm: str = "none",
        bcdt_eps: float = 1e-6,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if bcdt_norm not in BCDT_NORMS:
            raise ValueError(f"bcdt_norm must be one of {BCDT_NORMS}, not {bcdt_norm!r}")
        self.layer = layer
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.bcdt_norm, self.bcdt_eps = bcdt_norm, bcdt_eps
        self.chunk_size = chunk_size
        self.W_in = nn.Linear(d_model, 2 * d_inner, bias=use_bias)
        self.conv_w = nn.Parameter(torch.zeros(d_inner, conv_kernel))
        self.conv_b = nn.Parameter(torch.zeros(d_inner)) if use_conv_bias else None
        self.W_x = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.W_dt = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d_inner, d_state))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.W_out = nn.Linear(d_inner, d_model, bias=use_bias)
        if bcdt_norm == "weighted":
            self.dt_norm_w = nn.Parameter(torch.ones(dt_rank))
            self.B_norm_w = nn.Parameter(torch.ones(d_state))
            self.C_norm_w = nn.Parameter(torch.ones(d_state))
        self.hook_x = RecurrentHookPoint()  # [batch, pos, 1, d_inner]
        self.hook_q = RecurrentHookPoint()  # [batch, pos, 1, d_state]
        self.hook_k = RecurrentHookPoint()  # [batch, pos, 1, d_state]
        self.hook_dt = RecurrentHookPoint()  # [batch, pos, 1, d_inner]
        self.hook_v = RecurrentHookPoint()  # [batch, pos, 1, d_inner]
        self.hook_decay = RecurrentHookPoint()  # [batch, pos, 1, d_state, d_inner]
        self.hook_read = RecurrentHookPoint()  # [batch, pos, 1, d_inner]
        self.hook_gate = RecurrentHookPoint()  # [batch, pos, 1, d_inner]
        self.hook_z = RecurrentHookPoint()  # [batch, pos, 1, d_inner]
        self.hook_out = RecurrentHookPoint()  # [batch, pos, d_model]

    def _dt_B_C(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(dt~, B, C) = W_x x, with the family's norm on each (float32)."""
        dt, B, C = self.W_x(x).float().split((self.dt_rank, self.d_state, self.d_state), dim=-1)
        if self.bcdt_norm != "none":
            weighted = self.bcdt_norm == "weighted"
            eps = self.bcdt_eps
            dt = _rms(dt, self.dt_norm_w if weighted else None, eps)
            B = _rms(B, self.B_norm_w if weighted else None, eps)
            C = _rms(C, self.C_norm_w if weighted else None, eps)
        return dt, B, C

    def forward(
        self, u: Float[Tensor, "batch pos d_model"], run: RunContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """Run the mixer on `u` from the state in `run` (if any); returns `[batch, pos, d_model]`
        and saves the final state and convolution buffer to `run`."""
        Bsz, T, _ = u.shape
        past = run.layer_in(self.layer)
        m = None if run.mask is None else run.mask[..., None]  # padding: zero inputs, identity step
        if m is not None:
            u = u * m.to(u.dtype)
        x, z = self.W_in(u).split((self.d_inner, self.d_inner), dim=-1)
        prev = None if past is None else past["conv"]
        x, conv_buf = causal_conv(x, self.conv_w, self.conv_b, prev, run.mask)
        x = F.silu(x)
        if m is not None:
            x = x * m.to(x.dtype)  # again after the conv (its bias), as Hugging Face does
        x = self.hook_x(x.view(Bsz, T, 1, self.d_inner))
        dt, B, C = self._dt_B_C(x.to(self.W_x.weight.dtype))
        q = self.hook_q(C)
        k = self.hook_k(B)
        dt = F.softplus(dt @ self.W_dt.weight.float().T + self.W_dt.bias.float())
        if m is not None:
            dt = dt * m[..., None]  # zero write and decay 1 at padded positions
        dt = self.hook_dt(dt)
        v = self.hook_v(dt * x.float())
        A = -self.A_log.float().exp().T  # [d_state, d_inner]
        decay = self.hook_decay(torch.exp(dt[..., None, :] * A))  # [b, T, 1, d_state, d_inner]

        S0 = None if past is None else past["S"]

        def rule(decay: Tensor, q: Tensor, k: Tensor, v: Tensor, S0: Tensor | None) -> tuple:
            return chunked_reads(Transition(decay), q, k, v, S0, self.chunk_size)

        o, S_T = self.recur(
            lambda: rule(decay, q, k, v, S0),
            self.make_transition(decay),
            q,
            k,
            v,
            S0,
            Propagation.from_rule(rule, (decay, q, k, v), {3}),
            run,
        )
        run.save(self.layer, S=S_T, conv=conv_buf)
        o = self.hook_read(o)
        y = o + self.D.float() * x.float()  # D skip on the un-scaled x
        y = y * F.silu(self.hook_gate(z.view(Bsz, T, 1, self.d_inner)).float())
        y = self.hook_z(y.to(u.dtype))
        return self.hook_out(self.W_out(y.reshape(Bsz, T, self.d_inner)))

    @property
    def W_O(self) -> Float[Tensor, "head d_inner d_model"]:
        """The output projection as one head (TransformerLens layout): hook_out = z @ W_O[0]
        (+ the bias, if any)."""
        return self.W_out.weight.T[None]
