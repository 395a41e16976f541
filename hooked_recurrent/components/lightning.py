"""MiniMax lightning attention: linear attention with a constant decay per head.

Per token t and head h (state key side first, d_k = d_v = head_dim):

    [q, k, v] = silu(W_qkv x)                     per head: d_head query, key and value rows
    lambda_h = exp(-s_h),  s_h = 2^(-8 (h + 1) / H) (1 - l / (L - 1 + 1e-5) + 1e-5)
    S_t = lambda_h S_{t-1} + k_t v_t^T             no removal term, no write strength
    o_t = S_t^T q_t                                no 1/sqrt(d) scale
    out = W_out( sigmoid(W_gate x) * rmsnorm_{all heads}(o) * w )

The slope s_h depends only on the head h and the layer l of L (ALiBi-style slopes scaled down
with depth), so `hook_decay` shows the same constant at every position; an edit of it changes the
decay at the positions it changes. The RMSNorm runs over all heads together (width H d_head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.components.mamba2 import recur_ssd
from hooked_recurrent.hook_points import RecurrentHookPoint
from hooked_recurrent.mixer import RecurrentMixer
from hooked_recurrent.state import RunContext

__all__ = ["LightningAttention", "lightning_slopes"]


def lightning_slopes(n_heads: int, layer: int, n_layers: int) -> Float[Tensor, " head"]:
    """s_h, the log-decay rate of each head of layer `layer` (float32, as the reference)."""
    base = 1 / (2 ** (8 / n_heads))
    factor = 1 - layer / (n_layers - 1 + 1e-5) + 1e-5
    return base ** (torch.arange(n_heads) + 1) * factor


class LightningAttention(RecurrentMixer):
    """MiniMax's lightning attention at `blocks.{l}.attn` (equations in the module docstring).

    Hooks: `hook_q`, `hook_k` `[batch, pos, head, d_head]`, `hook_v` `[batch, pos, head, d_head]`,
    `hook_decay` (exp(-s_h), the same at every position) `[batch, pos, head]`, `hook_write`
    (k v^T) and `hook_state` (S_t) `[batch, pos, head, d_head, d_head]`, `hook_read` (S_t^T q_t)
    `[batch, pos, head, d_head]`, `hook_gate` (W_gate x, before its sigmoid) and `hook_z` (what
    the output projection reads) `[batch, pos, head, d_head]`, `hook_out` `[batch, pos, d_model]`.
    """

    write_strength_hook = None

    def __init__(
        self,
        layer: int,
        n_layers: int,
        d_model: int,
        n_heads: int,
        d_head: int,
        eps: float = 1e-6,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        self.layer, self.n_heads, self.d_head = layer, n_heads, d_head
        self.eps, self.chunk_size = eps, chunk_size
        self.W_qkv = nn.Linear(d_model, 3 * n_heads * d_head, bias=False)
        self.W_gate = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.norm_w = nn.Parameter(torch.ones(n_heads * d_head))
        self.W_out = nn.Linear(n_heads * d_head, d_model, bias=False)
        self.slopes: Tensor
        self.register_buffer("slopes", lightning_slopes(n_heads, layer, n_layers), persistent=False)
        self.hook_q = RecurrentHookPoint()  # [batch, pos, head, d_head]
        self.hook_k = RecurrentHookPoint()  # [batch, pos, head, d_head]
        self.hook_v = RecurrentHookPoint()  # [batch, pos, head, d_head]
        self.hook_decay = RecurrentHookPoint()  # [batch, pos, head]
        self.hook_read = RecurrentHookPoint()  # [batch, pos, head, d_head]
        self.hook_gate = RecurrentHookPoint()  # [batch, pos, head, d_head]
        self.hook_z = RecurrentHookPoint()  # [batch, pos, head, d_head]
        self.hook_out = RecurrentHookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """Run the mixer on `x` `[batch, pos, d_model]` from the state in `run` (if any); returns
        `[batch, pos, d_model]` and saves the final state to `run`.
        """
        B, T, _ = x.shape
        H, D = self.n_heads, self.d_head
        past = run.layer_in(self.layer)
        qkv = F.silu(self.W_qkv(x))
        if run.mask is not None:  # padding: zero q, k, v and decay 1 (an identity step)
            qkv = qkv * run.mask[..., None].to(qkv.dtype)
        q, k, v = qkv.float().view(B, T, H, 3 * D).split(D, dim=-1)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        log_decay = -self.slopes.float().expand(B, T, H)
        if run.mask is not None:
            log_decay = log_decay * run.mask[..., None]
        decay, log_decay = self.hooked_decay(log_decay.exp(), log_decay)
        ones = q.new_ones(B, T, H)  # chunk_ssd's write strength

        S0 = None if past is None else past["S"]
        o, S_T = recur_ssd(self, q, k, v, ones, log_decay, decay, v, S0, self.chunk_size, run)
        run.save(self.layer, S=S_T)
        o = self.hook_read(o).reshape(B, T, H * D)

        n = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)
        gate = self.hook_gate(self.W_gate(x).view(B, T, H, D))
        z = torch.sigmoid(gate.float()) * (self.norm_w.float() * n).view(B, T, H, D)
        z = self.hook_z(z.to(x.dtype))
        return self.hook_out(self.W_out(z.reshape(B, T, H * D)))

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        """The output projection per head (TransformerLens layout):
        hook_out = sum_h hook_z[h] @ W_O[h]."""
        return self.W_out.weight.T.reshape(self.n_heads, self.d_head, -1)
