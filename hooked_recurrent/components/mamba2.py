"""Mamba-2 (SSD) token mixer, in the order of its equations.

Per token t and head h (state key side first: S in R^{d_state x headdim}, the transpose of the
Hugging Face / mamba_ssm layout [headdim, d_state]):

    [z, xBC, dt~] = W_in u                                   split: d_inner | conv_dim | n_heads
    [x, B~, C~] = silu(causal_conv1d(xBC) + conv_bias)       depthwise, kernel K
    B_t, C_t = the group of head h, g = h // (n_heads / n_groups)
    dt_t = clamp(softplus(dt~_t + dt_bias), *time_step_limit),   A = -exp(A_log)
    S_t = exp(dt_t A) S_{t-1} + B_t (dt_t x_t)^T              (no removal term)
    o_t = S_t^T C_t                                           the read
    y_t = o_t + D x_t                                         D skip on the un-scaled x
    y = w * grouped_rmsnorm(y * silu(z))                      gate FIRST, then RMS over groups of
                                                              d_inner / n_groups channels
                                                              (Falcon-H1: optionally the norm first,
                                                              or no norm: y * silu(z))
    out = W_out y

Hooks (at `blocks.{l}.attn.`): `hook_q` = C_t and `hook_k` = B_t per head `[batch, pos, head,
d_state]` (group-expanded), `hook_v` = x_t `[batch, pos, head, headdim]`, `hook_dt` and
`hook_decay` = exp(dt_t A) `[batch, pos, head]`, `hook_write` = B_t (dt_t x_t)^T and `hook_state`
= S_t `[batch, pos, head, d_state, headdim]`, `hook_read` = o_t (before the D skip), `hook_gate` =
z (before its silu) `[batch, pos, head, headdim]`, `hook_z` (what the output projection reads,
after gate and norm; TransformerLens's z) `[batch, pos, head, headdim]`, `hook_out`
`[batch, pos, d_model]`.

Editing semantics: `hook_dt` fires before the decay is computed, so an edited dt changes both the
write (B (dt x)^T) and the decay exp(dt A), as in the model; `hook_decay` fires after and can
override the decay alone. An edited `hook_v` (x) also feeds the D skip, since it is the same x.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.components.conv import causal_conv
from hooked_recurrent.hook_points import RecurrentHookPoint
from hooked_recurrent.mixer import RecurrentMixer
from hooked_recurrent.recurrence import Propagation
from hooked_recurrent.state import RunContext

__all__ = ["Mamba2Mixer", "chunk_ssd", "recur_ssd", "segment_sum"]


def segment_sum(a: Float[Tensor, "... chunk"]) -> Float[Tensor, "... chunk chunk"]:
    """out[i, j] = sum_{j < m <= i} a_m for j <= i, and -inf above the diagonal.

    Built from a cumulative sum of masked copies (not as cumsum_i - cumsum_j), so nearby positions
    do not lose precision to a large running sum, and row i depends on a_{<=i} only.
    """
    L = a.shape[-1]
    x = a[..., :, None].expand(*a.shape, L)
    ones = torch.ones(L, L, dtype=torch.bool, device=a.device)
    x = x.masked_fill(~ones.tril(-1), 0.0)
    return x.cumsum(-2).masked_fill(~ones.tril(0), float("-inf"))


def chunk_ssd(
    q: Float[Tensor, "batch pos head d_state"],
    k: Float[Tensor, "batch pos head d_state"],
    v: Float[Tensor, "batch pos head headdim"],
    dt: Float[Tensor, "batch pos head"],
    log_decay: Float[Tensor, "batch pos head"],
    S0: Float[Tensor, "batch head d_state headdim"] | None = None,
    chunk_size: int = 256,
) -> tuple[Float[Tensor, "batch pos head headdim"], Float[Tensor, "batch head d_state headdim"]]:
    """The SSD recurrence S_t = exp(a_t) S_{t-1} + k_t (dt_t v_t)^T, o_t = S_t^T q_t, in chunks.

    With a_t = `log_decay` (dt_t A for Mamba-2) and, inside a chunk, the segment sums
    seg(i, j) = a_{j+1} + ... + a_i and prefix sums c_i = a_1 + ... + a_i:

        o_i = sum_{j <= i} exp(seg(i, j)) (q_i . k_j) dt_j v_j   +   exp(c_i) S_start^T q_i
        S_end = exp(c_L) S_start + sum_j exp(c_L - c_j) k_j (dt_j v_j)^T

    The first sum is a masked quadratic form within the chunk; the state is passed sequentially
    from chunk to chunk. The same algorithm family as Hugging Face's `mamba2_chunk_scan` (and
    mamba_ssm's `mamba_chunk_scan_combined`), in float32. A sequence whose length is not a multiple
    of the chunk size is zero-padded (a = 0, dt v = 0: the padding leaves the state unchanged).

    Returns:
        (o `[batch, pos, head, headdim]`, S_T `[batch, head, d_state, headdim]`), both float32.
    """
    Bsz, T, H, N = k.shape
    P = v.shape[-1]
    L = max(1, min(chunk_size, T))
    n = math.ceil(T / L)
    pad = n * L - T

    def prep(x: Tensor) -> Tensor:  # [B, T, H, ...] -> [B, H, n, L, ...]
        x = x.float().transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
        return x.reshape(Bsz, H, n, L, *x.shape[3:])

    q, k, a = prep(q), prep(k), prep(log_decay)
    xd = prep(v.float() * dt.float()[..., None])
    a_cum = a.cumsum(-1)  # [B, H, n, L]
    y = ((q @ k.transpose(-1, -2)) * segment_sum(a).exp()) @ xd  # within the chunk
    k_to_end = k * (a_cum[..., -1:] - a_cum).exp()[..., None]
    chunk_write = k_to_end.transpose(-1, -2) @ xd  # [B, H, n, N, P]
    chunk_decay = a_cum[..., -1].exp()[..., None, None]  # [B, H, n, 1, 1]
    q_from_start = q * a_cum.exp()[..., None]

    S = q.new_zeros(Bsz, H, N, P) if S0 is None else S0.float()
    carried = []
    for c in range(n):
        carried.append(q_from_start[:, :, c] @ S)
        S = chunk_decay[:, :, c] * S + chunk_write[:, :, c]
    y = y + torch.stack(carried, 2)
    return y.reshape(Bsz, H, n * L, P)[:, :, :T].transpose(1, 2), S


def recur_ssd(
    mixer: RecurrentMixer,
    q: Float[Tensor, "batch pos head d_state"],
    k: Float[Tensor, "batch pos head d_state"],
    v: Float[Tensor, "batch pos head headdim"],
    dt: Float[Tensor, "batch pos head"],
    log_decay: Float[Tensor, "batch pos head"],
    decay: Float[Tensor, "batch pos head"],
    write_v: Float[Tensor, "batch pos head headdim"],
    S0: Float[Tensor, "batch head d_state headdim"] | None,
    chunk_size: int,
    run: RunContext,
) -> tuple[Float[Tensor, "batch pos head headdim"], Float[Tensor, "batch head d_state headdim"]]:
    """`mixer.recur` for an SSD recurrence (`chunk_ssd` in chunks of `chunk_size`, the fast path
    and the propagation of edits): the write k (dt v)^T, `write_v` = dt v as the hooks see it,
    the transition `mixer.make_transition(decay)`. Returns the reads and the final state."""
    propagation = Propagation.from_rule(
        lambda q, k, v, dt, ld, S0: chunk_ssd(q, k, v, dt, ld, S0, chunk_size),
        (q, k, v, dt, log_decay),
        {2},
    )
    fast = lambda: chunk_ssd(q, k, v, dt, log_decay, S0, chunk_size)  # noqa: E731
    transition = mixer.make_transition(decay)
    return mixer.recur(fast, transition, q, k, write_v, S0, propagation, run)


class Mamba2Mixer(RecurrentMixer):
    """Mamba-2 token mixer at `blocks.{l}.attn` (see the module docstring for its equations).

    Parameters (Hugging Face name in brackets): `W_in` [in_proj], `conv_w` `[conv_dim, K]` and
    `conv_b` [conv1d.weight squeezed, conv1d.bias], `dt_bias`, `A_log`, `D`, `norm_w` [norm.weight;
    None with `gated_norm=False`], `W_out` [out_proj, with a bias `out_bias` (default `use_bias`)].
    """

    write_strength_hook = "hook_dt"

    def __init__(
        self,
        layer: int,
        d_model: int,
        n_heads: int,
        head_dim: int,
        d_state: int,
        n_groups: int,
        conv_kernel: int,
        eps: float,
        chunk_size: int = 256,
        time_step_limit: tuple[float, float] = (0.0, float("inf")),
        use_conv_bias: bool = True,
        use_bias: bool = False,
        gated_norm: bool = True,
        norm_before_gate: bool = False,
        out_bias: bool | None = None,
    ) -> None:
        super().__init__()
        if n_heads % n_groups:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_groups ({n_groups})")
        self.layer = layer
        self.n_heads, self.head_dim, self.d_state, self.n_groups = (
            n_heads,
            head_dim,
            d_state,
            n_groups,
        )
        self.d_inner = n_heads * head_dim
        self.conv_dim = self.d_inner + 2 * n_groups * d_state
        self.eps = eps
        self.chunk_size = chunk_size
        self.time_step_limit = (float(time_step_limit[0]), float(time_step_limit[1]))
        self.W_in = nn.Linear(d_model, self.d_inner + self.conv_dim + n_heads, bias=use_bias)
        self.conv_w = nn.Parameter(torch.zeros(self.conv_dim, conv_kernel))
        self.conv_b = nn.Parameter(torch.zeros(self.conv_dim)) if use_conv_bias else None
        self.dt_bias = nn.Parameter(torch.zeros(n_heads))
        self.A_log = nn.Parameter(torch.zeros(n_heads))
        self.D = nn.Parameter(torch.ones(n_heads))
        self.norm_w = nn.Parameter(torch.ones(self.d_inner)) if gated_norm else None
        self.norm_before_gate = norm_before_gate
        out_bias = use_bias if out_bias is None else out_bias
        self.W_out = nn.Linear(self.d_inner, d_model, bias=out_bias)
        self.hook_q = RecurrentHookPoint()  # [batch, pos, head, d_state]  (C, per head)
        self.hook_k = RecurrentHookPoint()  # [batch, pos, head, d_state]  (B, per head)
        self.hook_v = RecurrentHookPoint()  # [batch, pos, head, head_dim]  (x)
        self.hook_dt = RecurrentHookPoint()  # [batch, pos, head]
        self.hook_decay = RecurrentHookPoint()  # [batch, pos, head]  exp(dt A)
        self.hook_read = RecurrentHookPoint()  # [batch, pos, head, head_dim]
        self.hook_gate = RecurrentHookPoint()  # [batch, pos, head, head_dim]
        self.hook_z = RecurrentHookPoint()  # [batch, pos, head, head_dim]
        self.hook_out = RecurrentHookPoint()  # [batch, pos, d_model]

    def forward(
        self, u: Float[Tensor, "batch pos d_model"], run: RunContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """Run the mixer on `u` `[batch, pos, d_model]` from the state in `run` (if any); returns
        `[batch, pos, d_model]` and saves the final state and convolution buffer to `run`.
        """
        Bsz, T, _ = u.shape
        H, P, N, G = self.n_heads, self.head_dim, self.d_state, self.n_groups
        past = run.layer_in(self.layer)
        m = None if run.mask is None else run.mask[..., None]  # padding: zero inputs, identity step
        if m is not None:
            u = u * m.to(u.dtype)

        z, xBC, dt = self.W_in(u).split((self.d_inner, self.conv_dim, H), dim=-1)
        prev = None if past is None else past["conv"]
        xBC, conv_buf = causal_conv(xBC, self.conv_w, self.conv_b, prev, run.mask)
        xBC = F.silu(xBC)
        if m is not None:
            xBC = xBC * m.to(xBC.dtype)  # again after the conv (its bias), as Hugging Face does
        x, B, C = xBC.split((self.d_inner, G * N, G * N), dim=-1)
        rep = H // G
        q = self.hook_q(C.float().view(Bsz, T, G, N).repeat_interleave(rep, dim=2))
        k = self.hook_k(B.float().view(Bsz, T, G, N).repeat_interleave(rep, dim=2))
        v = self.hook_v(x.float().view(Bsz, T, H, P))
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)
        if m is not None:
            dt = dt * m  # zero write and decay 1 at padded positions
        dt = self.hook_dt(dt)
        log_decay = -self.A_log.float().exp() * dt  # dt A: computed from the (edited) dt
        decay, log_decay = self.hooked_decay(log_decay.exp(), log_decay)

        S0 = None if past is None else past["S"]
        o, S_T = recur_ssd(
            self, q, k, v, dt, log_decay, decay, dt[..., None] * v, S0, self.chunk_size, run
        )
        run.save(self.layer, S=S_T, conv=conv_buf)
        o = self.hook_read(o)

        y = o + self.D.float()[:, None] * v  # D skip on the un-scaled x
        gate = self.hook_gate(z.view(Bsz, T, H, P))
        y = self._gate_and_norm(y.reshape(Bsz, T, self.d_inner), gate.reshape(Bsz, T, -1))
        y = self.hook_z(y.to(u.dtype).view(Bsz, T, H, P))
        return self.hook_out(self.W_out(y.reshape(Bsz, T, self.d_inner)))

    def _gate_and_norm(
        self, y: Float[Tensor, "batch pos d_inner"], gate: Float[Tensor, "batch pos d_inner"]
    ) -> Float[Tensor, "batch pos d_inner"]:
        """y * silu(z), then the grouped RMSNorm (or the norm first with `norm_before_gate`; the
        gate alone without `gated_norm`), in float32."""
        g = F.silu(gate.float())
        if self.norm_w is None:
            return y * g
        if not self.norm_before_gate:
            y = y * g
        G = self.n_groups
        yg = y.unflatten(-1, (G, self.d_inner // G))
        y = (yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        y = self.norm_w.float() * y
        return y * g if self.norm_before_gate else y

    @property
    def W_O(self) -> Float[Tensor, "head head_dim d_model"]:
        """The output projection per head (TransformerLens layout): hook_out = sum_h z_h @ W_O[h]
        (+ the bias, if any)."""
        return self.W_out.weight.T.reshape(self.n_heads, self.head_dim, -1)
