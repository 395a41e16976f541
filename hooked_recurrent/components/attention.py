"""Qwen3.5 gated attention: q/k RMSNorm, partial RoPE, GQA, causal softmax, sigmoid output gate.

q_h, gate_h = split(q_proj x)          (per head: d_head query rows, then d_head gate rows)
q = rope(qnorm(q)),  k = rope(knorm(k_proj x)),  v = v_proj x
z = softmax(q k^T * scale + causal) v   (scale = 1 / sqrt(d_head) unless given)
out = o_proj (z * sigmoid(gate))        (W_Q, W_K, W_V, W_O, W_gate: TransformerLens layout)

With `gated=False` and `qk_norm="none"` it is plain GQA attention with RoPE (MiniMax's softmax
layers): no gate rows in `q_proj`, no q/k norms, out = o_proj z. OLMo hybrid's attention is
`gated=False`, `qk_norm="all"` (one RMSNorm over all heads' channels together, weight applied as
is) and `rotary_dim=0` for its released checkpoints without position encoding (NoPE). The Mamba-2
hybrids (Bamba, Nemotron-H, Falcon-H1, Granite 4) use `gated=False`, `qk_norm="none"`, optional
biases, NoPE or RoPE, and Granite's own softmax `scale`. Zamba2's shared attention reads a wider
input (`d_in` = 2 d_model: the residual and the embeddings) and adds a per-layer low-rank adapter
to each of q, k, v (`adapter_rank`): q = q_proj x + B_q A_q x, and so on.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.components.mlp import LowRankAdapter
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


def rope_angles(inv_freq: Float[Tensor, " half"], run: RunContext) -> Float[Tensor, "*pos half"]:
    """The RoPE angles position * inv_freq: `[pos, half]`, or `[batch, pos, half]` with padding
    (positions counted over each row's real tokens)."""
    if run.row_positions is None:
        return run.positions.float()[:, None] * inv_freq[None, :]
    return run.row_positions.float()[..., None] * inv_freq


def attend(
    mod: Any,
    q: Float[Tensor, "batch pos head d_qk"],
    k: Float[Tensor, "batch pos kv_head d_qk"],
    v: Float[Tensor, "batch pos kv_head d_v"],
    run: RunContext,
    scale: float | None = None,
) -> Float[Tensor, "batch pos head d_v"]:
    """`mod`: the attention module (its `layer` and its `hook_attn_scores` / `hook_pattern`).

    softmax(q k^T * scale + causal mask) v (scale 1 / sqrt(d_qk) unless given), continuing
    the KV cache of `mod.layer` in `run` (and saving it there), with padding masks; the scores
    and the pattern go through `mod.hook_attn_scores` / `mod.hook_pattern` (then computed
    explicitly, else fused).
    Key/value heads are shared by consecutive query heads (GQA)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D]
    past = run.layer_in(mod.layer)
    if past is not None and "k" in past:
        k_all = torch.cat((past["k"], k_all), dim=2)
        v_all = torch.cat((past["v"], v_all), dim=2)
    run.save(mod.layer, k=k_all, v=v_all)
    rep = H // Hkv
    k_rep = k_all.repeat_interleave(rep, dim=1)
    v_rep = v_all.repeat_interleave(rep, dim=1)

    n_past = k_all.shape[2] - T
    allowed = None
    if run.key_mask is not None:  # padding: no padded key, except a padded query's own
        Tk = k_all.shape[2]
        causal = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(n_past)
        keys = torch.arange(Tk, device=q.device)
        own = keys[None, :] == keys[n_past:, None]  # query t's own key, [T, Tk]
        allowed = causal & (run.key_mask[:, None, None, :] | own)  # [B, 1, T, Tk]
    if mod.hook_attn_scores.active or mod.hook_pattern.active:
        Tk = k_all.shape[2]
        if allowed is None:
            future = torch.ones(T, Tk, dtype=torch.bool, device=q.device).triu(n_past + 1)
            mask = torch.zeros(T, Tk, dtype=q.dtype, device=q.device).masked_fill_(
                future, -math.inf
            )
            mask = mask.expand(B * H, T, Tk)
        else:
            mask = torch.zeros(B, H, T, Tk, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill_(~allowed, -math.inf).view(B * H, T, Tk)
        # q k^T / sqrt(d) + mask in one batched GEMM: one [batch, head, query, key] tensor
        scores = torch.baddbmm(
            mask,
            q.transpose(1, 2).reshape(B * H, T, D),
            k_rep.reshape(B * H, Tk, D).transpose(1, 2),
            alpha=scale,
        ).view(B, H, T, Tk)
        scores = mod.hook_attn_scores(scores)
        pattern = mod.hook_pattern(torch.softmax(scores.float(), dim=-1).to(q.dtype))
        z = torch.matmul(pattern, v_rep)
    elif allowed is not None:
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_rep, v_rep, attn_mask=allowed, scale=scale
        )
    else:  # same maths, fused; the explicit path above runs whenever the pattern is hooked
        mask = None
        if n_past and T > 1:
            mask = torch.ones(T, k_all.shape[2], dtype=torch.bool, device=q.device).tril(n_past)
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k_rep,
            v_rep,
            attn_mask=mask,
            is_causal=not n_past and T > 1,
            scale=scale,
        )
    return z.transpose(1, 2)


@runtime_checkable
class AttentionShape(Protocol):
    """The config fields `GatedAttention.from_config` reads (every hybrid config has them)."""

    d_model: int
    attn_n_heads: int
    attn_n_kv_heads: int
    attn_d_head: int
    rotary_dim: int
    rope_theta: float
    eps: float


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
        gated: bool = True,
        qk_norm: str = "head",
        bias: bool = False,
        scale: float | None = None,
        d_in: int | None = None,
        adapter_rank: int = 0,
    ) -> None:
        super().__init__()
        if qk_norm not in ("head", "all", "none"):
            raise ValueError(f"qk_norm must be 'head', 'all' or 'none', not {qk_norm!r}")
        if adapter_rank and gated:
            raise ValueError("q/k/v adapters are not supported with the output gate (gated=True)")
        d_in = d_model if d_in is None else d_in
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.gated, self.qk_norm, self.scale = gated, qk_norm, scale
        # the projections as in Hugging Face; the TransformerLens layout is the W_* properties
        self.q_proj = nn.Linear(d_in, (1 + gated) * n_heads * d_head, bias=bias)
        self.k_proj = nn.Linear(d_in, n_kv_heads * d_head, bias=bias)
        self.v_proj = nn.Linear(d_in, n_kv_heads * d_head, bias=bias)
        self.o_proj = nn.Linear(n_heads * d_head, d_model, bias=bias)
        self.adapters = (
            nn.ModuleDict(
                {
                    n: LowRankAdapter(d_in, adapter_rank, h * d_head)
                    for n, h in (("q", n_heads), ("k", n_kv_heads), ("v", n_kv_heads))
                }
            )
            if adapter_rank
            else None
        )
        self.q_norm: nn.Module
        self.k_norm: nn.Module
        if qk_norm == "head":  # Qwen: per head, scale (1 + w)
            self.q_norm = RMSNorm(d_head, eps, zero_centred=True)
            self.k_norm = RMSNorm(d_head, eps, zero_centred=True)
        elif qk_norm == "all":  # OLMo: over all heads' channels, scale w
            self.q_norm = RMSNorm(n_heads * d_head, eps)
            self.k_norm = RMSNorm(n_kv_heads * d_head, eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        inv_freq = 1.0 / (
            rope_theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / max(rotary_dim, 1))
        )
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.hook_q = RecurrentHookPoint()  # [batch, pos, head, d_head]
        self.hook_k = RecurrentHookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = RecurrentHookPoint()  # [batch, pos, kv_head, d_head]
        self.rotary_dim = rotary_dim
        if rotary_dim:  # NoPE (rotary_dim 0) has nothing to rotate and no rotated hooks
            self.hook_rot_q = RecurrentHookPoint()  # [batch, pos, head, d_head]
            self.hook_rot_k = RecurrentHookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_attn_scores = RecurrentHookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = RecurrentHookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = RecurrentHookPoint()  # [batch, pos, head, d_head]
        if gated:
            self.hook_gate = RecurrentHookPoint()  # [batch, pos, head, d_head]

    @classmethod
    def from_config(cls, cfg: AttentionShape, layer: int, **options: Any) -> GatedAttention:
        """The attention of layer `layer`, its shape from `cfg`'s `attn_*` fields; `options` are
        the keyword arguments of the constructor (`gated`, `qk_norm`, `bias`, `scale`)."""
        shape = (cfg.attn_n_heads, cfg.attn_n_kv_heads, cfg.attn_d_head, cfg.rotary_dim)
        return cls(layer, cfg.d_model, *shape, cfg.rope_theta, cfg.eps, **options)

    def _project(self, name: str, x: Tensor) -> Tensor:
        """`x` through the "q", "k" or "v" projection, plus its adapter (if any)."""
        out = getattr(self, f"{name}_proj")(x)
        return out if self.adapters is None else out + self.adapters[name](x)

    def _weight(self, name: str) -> Tensor:
        """The "q", "k" or "v" projection's weight, its adapter's B A added (if any)."""
        w = getattr(self, f"{name}_proj").weight
        return w if self.adapters is None else w + self.adapters[name].weight

    def _norm(self, norm: nn.Module, x: Tensor) -> Tensor:
        """q or k `[batch, pos, heads, d_head]` through its norm (per head, or over all heads)."""
        return norm(x.flatten(2)).view_as(x) if self.qk_norm == "all" else norm(x)

    def forward(self, x: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """Causal attention over `x` `[batch, pos, d_model]`, continuing the KV cache in `run`;
        returns the mixer output `[batch, pos, d_model]` (the KV cache is saved to `run`).
        """
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.d_head
        qg = self._project("q", x).view(B, T, H, -1)
        q = self.hook_q(self._norm(self.q_norm, qg[..., :D]))
        k = self.hook_k(self._norm(self.k_norm, self._project("k", x).view(B, T, Hkv, D)))
        v = self.hook_v(self._project("v", x).view(B, T, Hkv, D))
        gate = self.hook_gate(qg[..., D:]) if self.gated else None

        if self.rotary_dim:
            freqs = rope_angles(self.inv_freq, run)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(x.dtype)[..., None, :], emb.sin().to(x.dtype)[..., None, :]
            q = self.hook_rot_q(rotate_partial(q, cos, sin))
            k = self.hook_rot_k(rotate_partial(k, cos, sin))

        z = attend(self, q, k, v, run, self.scale)
        z = self.hook_z(z)  # [B, T, H, D]
        out = z.reshape(B, T, H * D)
        if self.gated:
            out = out * torch.sigmoid(gate.reshape(B, T, H * D))
        return self.o_proj(out)

    # TransformerLens layout: [head, d_model, d_head] in, [head, d_head, d_model] out
    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        """Query weights per head (before q-norm and RoPE; with a q adapter, its B A added):
        `x @ W_Q[h]`; the gate rows that `q_proj` interleaves with them are `W_gate`."""
        H, D = self.n_heads, self.d_head
        return self._weight("q").view(H, (1 + self.gated) * D, -1)[:, :D].transpose(-1, -2)

    @property
    def W_gate(self) -> Float[Tensor, "head d_model d_head"]:
        """Output-gate weights per head: out = W_O(z * sigmoid(x @ W_gate[h]))."""
        if not self.gated:
            raise AttributeError("this attention has no output gate (gated=False)")
        H, D = self.n_heads, self.d_head
        return self.q_proj.weight.view(H, 2 * D, -1)[:, D:].transpose(-1, -2)

    @property
    def _W_K(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return self._weight("k").view(self.n_kv_heads, self.d_head, -1).transpose(-1, -2)

    @property
    def _W_V(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return self._weight("v").view(self.n_kv_heads, self.d_head, -1).transpose(-1, -2)

    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        """Key weights per query head (kv heads repeated, as TransformerLens's GQA `W_K`; the
        kv heads alone are `_W_K`)."""
        return self._W_K.repeat_interleave(self.n_heads // self.n_kv_heads, 0)

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        """Value weights per query head (kv heads repeated; the kv heads alone are `_W_V`)."""
        return self._W_V.repeat_interleave(self.n_heads // self.n_kv_heads, 0)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        """Output weights per head: out = sum_h (z * sigmoid(gate))[h] @ W_O[h]."""
        return self.o_proj.weight.T.reshape(self.n_heads, self.d_head, -1)
