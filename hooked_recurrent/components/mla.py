"""Multi-head latent attention (DeepSeek-V2's MLA), as in Kimi Linear and Bailing's softmax layers.

Per token x:

    q = W_q x   or   W_qb rmsnorm(W_qa x)         per head: [q_nope (d_nope), q_r (d_rope)]
    [c, k_r] = W_kva x,  c = rmsnorm(c)           latent c (kv_rank), k_r shared by the heads
    [k_nope, v] = W_kvb c                         per head
    k = [k_nope, k_r],  q_r, k_r rotated (interleaved pairs) when `rope` (Bailing), not at all
                                                            on Kimi Linear (no position encoding)
    z = softmax(q k^T / sqrt(d_nope + d_rope) + causal) v
    out = W_o (z * sigmoid(W_g x)_head)                     the head gate only with `head_gate`

The KV cache holds the expanded per-head keys and values (not the latent).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.components.attention import attend, rope_angles
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.hook_points import RecurrentHookPoint
from hooked_recurrent.state import RunContext

__all__ = ["LatentAttention", "rotate_interleaved"]


def rotate_interleaved(
    x: Float[Tensor, "*lead d_rope"],
    cos: Float[Tensor, "*bcast half"],
    sin: Float[Tensor, "*bcast half"],
) -> Float[Tensor, "*lead d_rope"]:
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ...; the rotated pairs come out split in
    halves ([x_even', x_odd']), as DeepSeek's checkpoints were trained."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LatentAttention(nn.Module):
    """MLA with a KV cache for stepwise decoding (equations in the module docstring).

    Hooks (TransformerLens names): `hook_q`, `hook_k` `[batch, pos, head, d_nope + d_rope]`
    (before RoPE), `hook_v` `[batch, pos, head, d_v]`, `hook_attn_scores` and `hook_pattern`
    `[batch, head, query_pos, key_pos]`, `hook_z` `[batch, pos, head, d_v]`; with `rope` also
    `hook_rot_q`, `hook_rot_k`; with `head_gate` also `hook_gate` `[batch, pos, head]` (before
    its sigmoid).
    """

    def __init__(
        self,
        layer: int,
        d_model: int,
        n_heads: int,
        d_nope: int,
        d_rope: int,
        d_v: int,
        kv_rank: int,
        q_rank: int | None = None,
        rope_theta: float | None = None,
        head_gate: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.layer, self.n_heads = layer, n_heads
        self.d_nope, self.d_rope, self.d_v, self.kv_rank = d_nope, d_rope, d_v, kv_rank
        d_qk = d_nope + d_rope
        if q_rank is None:
            self.W_q = nn.Linear(d_model, n_heads * d_qk, bias=False)
        else:
            self.W_qa = nn.Linear(d_model, q_rank, bias=bias)
            self.q_norm = RMSNorm(q_rank, 1e-6)
            self.W_qb = nn.Linear(q_rank, n_heads * d_qk, bias=False)
        self.W_kva = nn.Linear(d_model, kv_rank + d_rope, bias=bias)
        self.kv_norm = RMSNorm(kv_rank, 1e-6)
        self.W_kvb = nn.Linear(kv_rank, n_heads * (d_nope + d_v), bias=False)
        self.o_proj = nn.Linear(n_heads * d_v, d_model, bias=bias)
        self.W_g = nn.Linear(d_model, n_heads, bias=False) if head_gate else None
        self.rope = rope_theta is not None
        self.hook_q = RecurrentHookPoint()  # [batch, pos, head, d_nope + d_rope]
        self.hook_k = RecurrentHookPoint()  # [batch, pos, head, d_nope + d_rope]
        self.hook_v = RecurrentHookPoint()  # [batch, pos, head, d_v]
        self.hook_attn_scores = RecurrentHookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = RecurrentHookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = RecurrentHookPoint()  # [batch, pos, head, d_v]
        if self.rope:
            inv_freq = 1.0 / (rope_theta ** (torch.arange(0, d_rope, 2).float() / d_rope))
            self.inv_freq: Tensor
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            self.hook_rot_q = RecurrentHookPoint()  # [batch, pos, head, d_nope + d_rope]
            self.hook_rot_k = RecurrentHookPoint()  # [batch, pos, head, d_nope + d_rope]
        if head_gate:
            self.hook_gate = RecurrentHookPoint()  # [batch, pos, head]

    def forward(self, x: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """Causal MLA over `x` `[batch, pos, d_model]`, continuing the KV cache in `run`; returns
        `[batch, pos, d_model]`."""
        B, T, _ = x.shape
        H, dn, dr = self.n_heads, self.d_nope, self.d_rope
        q = self.W_q(x) if hasattr(self, "W_q") else self.W_qb(self.q_norm(self.W_qa(x)))
        c, k_r = self.W_kva(x).split((self.kv_rank, dr), dim=-1)
        k_nope, v = (
            self.W_kvb(self.kv_norm(c)).view(B, T, H, dn + self.d_v).split((dn, self.d_v), dim=-1)
        )
        k = torch.cat((k_nope, k_r[:, :, None].expand(B, T, H, dr)), -1)
        q = self.hook_q(q.view(B, T, H, dn + dr))
        k = self.hook_k(k)
        v = self.hook_v(v)
        if self.rope:
            freqs = rope_angles(self.inv_freq, run)
            cos, sin = freqs.cos().to(x.dtype)[..., None, :], freqs.sin().to(x.dtype)[..., None, :]
            q = self.hook_rot_q(
                torch.cat((q[..., :dn], rotate_interleaved(q[..., dn:], cos, sin)), -1)
            )
            k = self.hook_rot_k(
                torch.cat((k[..., :dn], rotate_interleaved(k[..., dn:], cos, sin)), -1)
            )
        z = self.hook_z(attend(self, q, k, v, run))
        if self.W_g is not None:
            gate = self.hook_gate(self.W_g(x))
            z = z * torch.sigmoid(gate.float()).to(z.dtype)[..., None]
        return self.o_proj(z.reshape(B, T, H * self.d_v))

    @property
    def W_O(self) -> Float[Tensor, "head d_v d_model"]:
        """Output weights per head: out = sum_h (z * gate)[h] @ W_O[h]."""
        return self.o_proj.weight.T.reshape(self.n_heads, self.d_v, -1)
