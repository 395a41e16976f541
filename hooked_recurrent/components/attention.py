"""Qwen3.5 gated attention: q/k RMSNorm, partial RoPE, GQA, causal softmax, sigmoid output gate.

q_h, gate_h = split(W_Q x)             (per head: d_head query rows, then d_head gate rows)
q = rope(qnorm(q)),  k = rope(knorm(W_K x)),  v = W_V x
z = softmax(q k^T / sqrt(d_head) + causal) v
out = W_O (z * sigmoid(gate))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.hook_points import RecurrentHookPoint
from hooked_recurrent.state import RunContext


def rotate_partial(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first `rotary_dim` channels (rotate-half convention); pass the rest through."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
    rotated = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, xp), dim=-1)


class GatedAttention(nn.Module):
    """Gated multi-head attention with a KV cache for stepwise decoding.

    Hooks (TransformerLens names): `hook_q`, `hook_k`, `hook_v` `[batch, pos, head, d_head]`
    (after the q/k norms, before RoPE), `hook_rot_q`, `hook_rot_k`, `hook_attn_scores` and
    `hook_pattern` `[batch, head, query_pos, key_pos]`, `hook_z` `[batch, pos, head, d_head]`,
    `hook_gate` `[batch, pos, head, d_head]` (before the sigmoid).
    """

    def __init__(
        self,
        layer: int,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        d_head: int,
        rotary_dim: int,
        rope_theta: float,
        eps: float,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.W_Q = nn.Linear(d_model, 2 * n_heads * d_head, bias=False)
        self.W_K = nn.Linear(d_model, n_kv_heads * d_head, bias=False)
        self.W_V = nn.Linear(d_model, n_kv_heads * d_head, bias=False)
        self.W_O = nn.Linear(n_heads * d_head, d_model, bias=False)
        self.q_norm = RMSNorm(d_head, eps, zero_centred=True)
        self.k_norm = RMSNorm(d_head, eps, zero_centred=True)
        inv_freq = 1.0 / (
            rope_theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for name in ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z", "gate"):
            setattr(self, f"hook_{name}", RecurrentHookPoint())

    def forward(self, x: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """Causal attention over `x` `[batch, pos, d_model]`, continuing the KV cache in `run`;
        returns the mixer output `[batch, pos, d_model]` (the KV cache is saved to `run`).
        """
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.d_head
        qg = self.W_Q(x).view(B, T, H, 2 * D)
        q, gate = qg[..., :D], qg[..., D:]
        q = self.hook_q(self.q_norm(q))
        k = self.hook_k(self.k_norm(self.W_K(x).view(B, T, Hkv, D)))
        v = self.hook_v(self.W_V(x).view(B, T, Hkv, D))
        gate = self.hook_gate(gate)

        if run.row_positions is None:
            freqs = run.positions.float()[:, None] * self.inv_freq[None, :]
        else:  # padding: positions counted over each row's real tokens, [B, T, rd / 2]
            freqs = run.row_positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[..., None, :], emb.sin().to(x.dtype)[..., None, :]
        q = self.hook_rot_q(rotate_partial(q, cos, sin))
        k = self.hook_rot_k(rotate_partial(k, cos, sin))

        k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D]
        past = run.layer_in(self.layer)
        if past is not None and "k" in past:
            k_all = torch.cat((past["k"], k_all), dim=2)
            v_all = torch.cat((past["v"], v_all), dim=2)
        run.save(self.layer, k=k_all, v=v_all)
        rep = H // Hkv
        k_rep = k_all.repeat_interleave(rep, dim=1)
        v_rep = v_all.repeat_interleave(rep, dim=1)

        n_past = k_all.shape[2] - T
        allowed = None
        if run.key_mask is not None:  # padding: no padded key, except a padded query's own
            Tk = k_all.shape[2]
            causal = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(n_past)
            keys = torch.arange(Tk, device=x.device)
            own = keys[None, :] == keys[n_past:, None]  # query t's own key, [T, Tk]
            allowed = causal & (run.key_mask[:, None, None, :] | own)  # [B, 1, T, Tk]
        if self.hook_attn_scores.active or self.hook_pattern.active:
            Tk = k_all.shape[2]
            if allowed is None:
                future = torch.ones(T, Tk, dtype=torch.bool, device=x.device).triu(n_past + 1)
                mask = torch.zeros(T, Tk, dtype=q.dtype, device=x.device).masked_fill_(
                    future, -math.inf
                )
                mask = mask.expand(B * H, T, Tk)
            else:
                mask = torch.zeros(B, H, T, Tk, dtype=q.dtype, device=x.device)
                mask = mask.masked_fill_(~allowed, -math.inf).view(B * H, T, Tk)
            # q k^T / sqrt(d) + mask in one batched GEMM: one [batch, head, query, key] tensor
            scores = torch.baddbmm(
                mask,
                q.transpose(1, 2).reshape(B * H, T, D),
                k_rep.reshape(B * H, Tk, D).transpose(1, 2),
                alpha=1 / math.sqrt(D),
            ).view(B, H, T, Tk)
            scores = self.hook_attn_scores(scores)
            pattern = self.hook_pattern(torch.softmax(scores.float(), dim=-1).to(x.dtype))
            z = torch.matmul(pattern, v_rep)
        elif allowed is not None:
            z = F.scaled_dot_product_attention(q.transpose(1, 2), k_rep, v_rep, attn_mask=allowed)
        else:  # same maths, fused; the explicit path above runs whenever the pattern is hooked
            mask = None
            if n_past and T > 1:
                mask = torch.ones(T, k_all.shape[2], dtype=torch.bool, device=x.device).tril(n_past)
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2), k_rep, v_rep, attn_mask=mask, is_causal=not n_past and T > 1
            )
        z = self.hook_z(z.transpose(1, 2))  # [B, T, H, D]
        out = z.reshape(B, T, H * D) * torch.sigmoid(gate.reshape(B, T, H * D))
        return self.W_O(out)
