"""Qwen3.5 Gated DeltaNet, in the order of its equations.

Per token t and state head h (d_k x d_v state, key side first):

    [q~, k~, v] = silu(causal_conv1d(W_qkv x))              depthwise, kernel K, no bias
    q = l2norm(q~) / sqrt(d_k),  k = l2norm(k~)             l2norm(x) = x / sqrt(|x|^2 + 1e-6)
    beta = sigmoid(W_b x),  alpha = exp(-exp(A_log) softplus(W_a x + dt_bias))
    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t
    out = W_out( norm_w * rmsnorm(o_t) * silu(W_z x) )

Key heads are shared by `n_heads / n_key_heads` consecutive state heads (repeat_interleave), and
`hook_q` / `hook_k` are given per state head (already expanded, normalised, and for q scaled).
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
from hooked_recurrent.recurrence import Propagation, Transition
from hooked_recurrent.state import RunContext


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum(x^2) + eps): the epsilon sits inside the square root (not F.normalize)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def chunk_gated_delta_rule(
    q: Float[Tensor, "batch pos head d_k"],
    k: Float[Tensor, "batch pos head d_k"],
    v: Float[Tensor, "batch pos head d_v"],
    beta: Float[Tensor, "batch pos head"],
    g: Float[Tensor, "batch pos head"],
    S0: Float[Tensor, "batch head d_k d_v"] | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule in chunks (parallel within a chunk, sequential across chunks).

    Within a chunk, with Gamma_i = exp(sum_{j<=i} g_j), the deltas u_i = beta_i (v_i - alpha_i
    S_{i-1}^T k_i) solve the unit lower-triangular system

        u_i + sum_{j<i} beta_i (Gamma_i / Gamma_j) (k_i . k_j) u_j = beta_i (v_i - Gamma_i S0^T k_i)

    after which o_i = Gamma_i S0^T q_i + sum_{j<=i} (Gamma_i / Gamma_j)(q_i . k_j) u_j and
    S_C = Gamma_C S0 + sum_j (Gamma_C / Gamma_j) k_j u_j^T. All in float32.

    Returns:
        (o [batch, pos, head, d_v], final state [batch, head, d_k, d_v]).
    """
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    C = max(1, min(chunk_size, T))
    n = math.ceil(T / C)
    pad = n * C - T

    def prep(x: Tensor) -> Tensor:
        x = x.float().transpose(1, 2)  # [B, H, T, ...]
        if pad:
            x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
        return x.reshape(B, H, n, C, *x.shape[3:])

    q, k, v, beta, g = prep(q), prep(k), prep(v), prep(beta), prep(g)
    gc = g.cumsum(-1)  # [B, H, n, C]
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    # Gamma_i / Gamma_j below and on the diagonal, 0 above (in place: [B, H, n, C, C] tensors are
    # the largest here)
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill_(upper, float("-inf")).exp_()
    # the unit-triangular solve reads only the strictly lower triangle of A; its diagonal (here
    # beta_i |k_i|^2) stands for the implied 1s and is never used
    A = (k @ k.transpose(-1, -2)).mul_(decay).mul_(beta[..., None])
    rhs = torch.cat((beta[..., None] * v, (beta * gc.exp())[..., None] * k), dim=-1)
    X = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    U0, Wk = X[..., :dv], X[..., dv:]
    qk = (q @ k.transpose(-1, -2)).mul_(decay)
    k_to_end = k * (gc[..., -1:] - gc).exp()[..., None]

    S = q.new_zeros(B, H, dk, dv) if S0 is None else S0.float()
    out = []
    for c in range(n):
        U = U0[:, :, c] - Wk[:, :, c] @ S
        out.append(gc[:, :, c].exp()[..., None] * (q[:, :, c] @ S) + qk[:, :, c] @ U)
        S = gc[:, :, c, -1].exp()[..., None, None] * S + k_to_end[:, :, c].transpose(-1, -2) @ U
    o = torch.stack(out, 2).reshape(B, H, n * C, dv)[:, :, :T].transpose(1, 2)
    return o, S


class GatedDeltaNet(RecurrentMixer):
    """Gated DeltaNet token mixer (Qwen3.5 `linear_attention` layers), at `blocks.{l}.attn`.

    With `beta_scale=2` (OLMo hybrid), beta = 2 sigmoid(W_b x) lies in (0, 2), so the factor
    (I - beta k k^T) has eigenvalue 1 - beta in (-1, 1) along k (DeltaProduct / "negative
    eigenvalues"); the recurrence and its propagation are otherwise unchanged.

    Hooks: `hook_q`, `hook_k` `[batch, pos, head, d_k]` (per state head, l2-normalised, q scaled
    by 1/sqrt(d_k)), `hook_v` `[batch, pos, head, d_v]`, `hook_beta`, `hook_decay` (alpha)
    `[batch, pos, head]`, `hook_write` (beta k v^T) and `hook_state` (S_t)
    `[batch, pos, head, d_k, d_v]`, `hook_read` (S_t^T q_t) `[batch, pos, head, d_v]`, `hook_gate`
    (z, before its silu) `[batch, pos, head, d_v]`, `hook_z` (what the output projection reads,
    after the norm and gate; TransformerLens's z) `[batch, pos, head, d_v]`, `hook_out`
    `[batch, pos, d_model]`.
    """

    write_strength_hook = "hook_beta"

    def __init__(
        self,
        layer: int,
        d_model: int,
        n_heads: int,
        n_key_heads: int,
        d_k: int,
        d_v: int,
        conv_kernel: int,
        eps: float,
        chunk_size: int = 64,
        beta_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_key_heads, self.d_k, self.d_v = n_heads, n_key_heads, d_k, d_v
        self.chunk_size = chunk_size
        self.eps = eps
        #: beta = beta_scale * sigmoid(W_b x): 2 lets the transition's eigenvalue along k reach -1
        #: (OLMo hybrid's `allow_neg_eigval`)
        self.beta_scale = beta_scale
        n_qkv = 2 * n_key_heads * d_k + n_heads * d_v
        self.W_qkv = nn.Linear(d_model, n_qkv, bias=False)
        self.W_z = nn.Linear(d_model, n_heads * d_v, bias=False)
        self.W_b = nn.Linear(d_model, n_heads, bias=False)
        self.W_a = nn.Linear(d_model, n_heads, bias=False)
        self.conv_w = nn.Parameter(torch.zeros(n_qkv, conv_kernel))
        self.dt_bias = nn.Parameter(torch.ones(n_heads))
        self.A_log = nn.Parameter(torch.zeros(n_heads))
        self.norm_w = nn.Parameter(torch.ones(d_v))
        self.W_out = nn.Linear(n_heads * d_v, d_model, bias=False)
        self.hook_q = RecurrentHookPoint()  # [batch, pos, head, d_k]
        self.hook_k = RecurrentHookPoint()  # [batch, pos, head, d_k]
        self.hook_v = RecurrentHookPoint()  # [batch, pos, head, d_v]
        self.hook_beta = RecurrentHookPoint()  # [batch, pos, head]
        self.hook_decay = RecurrentHookPoint()  # [batch, pos, head]
        self.hook_read = RecurrentHookPoint()  # [batch, pos, head, d_v]
        self.hook_gate = RecurrentHookPoint()  # [batch, pos, head, d_v]
        self.hook_z = RecurrentHookPoint()  # [batch, pos, head, d_v]
        self.hook_out = RecurrentHookPoint()  # [batch, pos, d_model]

    transition_hooks = ("hook_decay", "hook_beta", "hook_k")

    @staticmethod
    def make_transition(alpha: Tensor, beta: Tensor, k: Tensor) -> Transition:
        """A_t(S) = alpha_t (I - beta_t k_t k_t^T) S."""
        return Transition(alpha, -(alpha * beta)[..., None] * k, k)

    def forward(self, x: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """Run the mixer on `x` `[batch, pos, d_model]` from the state in `run` (if any); returns
        `[batch, pos, d_model]` and saves the final state and convolution buffer to `run`.
        """
        B, T, _ = x.shape
        H, Hk, dk, dv = self.n_heads, self.n_key_heads, self.d_k, self.d_v
        past = run.layer_in(self.layer)
        m = None if run.mask is None else run.mask[..., None]  # padding: zero inputs, identity step
        if m is not None:
            x = x * m.to(x.dtype)

        prev = None if past is None else past["conv"]
        conv, conv_buf = causal_conv(self.W_qkv(x), self.conv_w, None, prev, run.mask)
        conv = F.silu(conv)
        if m is not None:
            conv = conv * m.to(conv.dtype)
        q, k, v = conv.split((Hk * dk, Hk * dk, H * dv), dim=-1)
        rep = H // Hk
        q = l2norm(q.float().view(B, T, Hk, dk)).repeat_interleave(rep, dim=2) / math.sqrt(dk)
        k = l2norm(k.float().view(B, T, Hk, dk)).repeat_interleave(rep, dim=2)
        q = self.hook_q(q)
        k = self.hook_k(k)
        v = self.hook_v(v.float().view(B, T, H, dv))
        beta = torch.sigmoid(self.W_b(x)).float()
        if self.beta_scale != 1.0:
            beta = self.beta_scale * beta
        g = -self.A_log.float().exp() * F.softplus(self.W_a(x).float() + self.dt_bias.float())
        if m is not None:
            beta, g = beta * m, g * m  # beta 0, decay 1 at padded positions
        beta = self.hook_beta(beta)
        alpha, g = self.hooked_decay(g.exp(), g)

        S0 = None if past is None else past["S"]
        propagation = Propagation.from_rule(
            lambda q, k, v, beta, g, S0: chunk_gated_delta_rule(
                q, k, v, beta, g, S0, self.chunk_size
            ),
            (q, k, v, beta, g),
            {2},
        )
        o, S_T = self.recur(
            lambda: chunk_gated_delta_rule(q, k, v, beta, g, S0, self.chunk_size),
            self.make_transition(alpha, beta, k),
            q,
            beta[..., None] * k,
            v,
            S0,
            propagation,
            run,
        )
        run.save(self.layer, S=S_T, conv=conv_buf)
        o = self.hook_read(o.to(x.dtype))

        z = self.hook_gate(self.W_z(x).view(B, T, H, dv))
        of = o.float()
        n = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.hook_z(((self.norm_w * n.to(x.dtype)) * F.silu(z.float())).to(x.dtype))
        return self.hook_out(self.W_out(y.reshape(B, T, H * dv)))

    @property
    def W_O(self) -> Float[Tensor, "head d_v d_model"]:
        """The output projection per head (TransformerLens layout):
        hook_out = sum_h hook_z[h] @ W_O[h]."""
        return self.W_out.weight.T.reshape(self.n_heads, self.d_v, -1)
