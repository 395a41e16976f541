"""Brute-force references shared by the tests: the recurrence one token at a time, in the
precision of its inputs (the tests pass float64), and the Gated DeltaNet layers of `transformers`
(Qwen3.5, Qwen3.5-MoE, Qwen3-Next, OLMo hybrid) written out from their equations with the layer's
own weights.

Nothing here calls `hooked_recurrent`: these are the independent side of the comparisons.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def transition_step(
    decay: Tensor, erase_a: Tensor | None, erase_b: Tensor | None, S: Tensor, t: int
) -> Tensor:
    """A_t(S) = diag(decay_t) S + erase_a_t (erase_b_t^T S) for S `[batch, head, d_k, d_v]`;
    `decay` is `[batch, pos, head]` (per head) or `[batch, pos, head, d_k]` (per key channel)."""
    d = decay[:, t]
    out = S * (d[..., None, None] if d.dim() == 2 else d[..., None])
    if erase_a is not None:
        read = torch.einsum("bhk,bhkv->bhv", erase_b[:, t], S)
        out = out + erase_a[:, t, :, :, None] * read[:, :, None]
    return out


def brute_force_states(
    q: Tensor,
    decay: Tensor,
    erase_a: Tensor | None,
    erase_b: Tensor | None,
    writes: Tensor,
    assign: tuple[Tensor, Tensor] | None = None,
    perturb: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """States and reads of S_t = A_t(S_{t-1}) + W_t, o_t = S_t^T q_t, token by token from zero.

    `writes` `[batch, pos, head, d_k, d_v]`; `assign` = (mask `[batch, pos, head]`, values): the
    state is set to the value there; `perturb` (same shape as the writes) is added to every state
    after the step (a zero leaf whose gradient is dL/dS_t). Returns (states, reads).
    """
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, writes.shape[-1], dtype=writes.dtype)
    states, reads = [], []
    for t in range(T):
        S = transition_step(decay, erase_a, erase_b, S, t) + writes[:, t]
        if assign is not None:
            m, X = assign
            S = torch.where(m[:, t, :, None, None], X[:, t].to(S.dtype), S)
        if perturb is not None:
            S = S + perturb[:, t]
        states.append(S)
        reads.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(states, 1), torch.stack(reads, 1)


def hf_gdn_projections(la, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """(q|k|v before the convolution, z, b, a, beta scale) of a `transformers` Gated DeltaNet
    layer: Qwen3.5 / Qwen3.5-MoE (separate projections), Qwen3-Next (fused per key-head group,
    split by the layer's own method) or OLMo hybrid (q/k/v/g/b/a projections, beta up to 2)."""
    B, L, _ = h.shape
    if hasattr(la, "in_proj_qkvz"):
        q, k, v, z, b, a = la.fix_query_key_value_ordering(la.in_proj_qkvz(h), la.in_proj_ba(h))
        qkv = torch.cat([t.reshape(B, L, -1) for t in (q, k, v)], -1)
        return qkv, z.reshape(B, L, -1), b, a, 1.0
    if hasattr(la, "q_proj"):
        qkv = torch.cat((la.q_proj(h), la.k_proj(h), la.v_proj(h)), -1)
        scale = 2.0 if la.allow_neg_eigval else 1.0
        return qkv, la.g_proj(h), la.b_proj(h), la.a_proj(h), scale
    return la.in_proj_qkv(h), la.in_proj_z(h), la.in_proj_b(h), la.in_proj_a(h), 1.0


def hf_gdn_inputs(la, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """q (normalised and scaled), k (normalised), v, beta, alpha of a `transformers` Gated
    DeltaNet layer `la` (any of `hf_gdn_projections`') on hidden states `h`, per value head."""
    b, L, _ = h.shape
    hk, hv, dk, dv = la.num_k_heads, la.num_v_heads, la.head_k_dim, la.head_v_dim
    qkv, _, b_raw, a_raw, beta_scale = hf_gdn_projections(la, h)
    qkv = F.silu(la.conv1d(qkv.transpose(1, 2))[..., :L]).transpose(1, 2)
    q, k, v = qkv.split((hk * dk, hk * dk, hv * dv), dim=-1)

    def unit(x: Tensor) -> Tensor:
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)

    r = hv // hk
    q = unit(q.reshape(b, L, hk, dk)).repeat_interleave(r, 2) / math.sqrt(dk)
    k = unit(k.reshape(b, L, hk, dk)).repeat_interleave(r, 2)
    v = v.reshape(b, L, hv, dv)
    beta = beta_scale * torch.sigmoid(b_raw)
    alpha = torch.exp(-la.A_log.exp() * F.softplus(a_raw + la.dt_bias))
    return q, k, v, beta, alpha


def gdn_transition(k: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(decay, erase_a, erase_b) of S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + W_t."""
    return alpha, -(alpha * beta)[..., None] * k, k


def hf_gdn_output(la, h: Tensor, o: Tensor) -> Tensor:
    """The layer's output from its reads `o` `[batch, pos, head, d_v]`: the gated RMSNorm with
    the layer's z, then the output projection."""
    dv = la.head_v_dim
    z = hf_gdn_projections(la, h)[1].reshape(*o.shape)
    norm, out_proj = (la.o_norm, la.o_proj) if hasattr(la, "o_norm") else (la.norm, la.out_proj)
    y = norm(o.reshape(-1, dv), z.reshape(-1, dv)).reshape(*h.shape[:2], -1)
    return out_proj(y)
