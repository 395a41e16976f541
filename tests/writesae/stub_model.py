"""A tiny recurrent stub model following the hooked_recurrent model contract (tests only).

The stub is a HookedRootModule with gated-delta-rule mixers (per head h, token t)::

    write_t = beta_t k_t v_t^T
    S_t     = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + write_t
    o_t     = S_t^T q_t

and hook points ``blocks.{l}.attn.hook_{q,k,v,beta,decay,write,state,read}`` whose objects carry
``.positions`` (absolute positions) and, on ``hook_write``, ``.native_state(head)``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint


class StubHookPoint(HookPoint):
    def __init__(self) -> None:
        super().__init__()
        self.positions: torch.Tensor | None = None
        self._native = None

    def native_state(self, head: int | None = None) -> torch.Tensor:
        s = self._native()
        return s if head is None else s[:, :, head]


def recurrence(
    writes: torch.Tensor,
    k: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    s0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step-by-step gated delta rule; writes [b,p,h,dk,dv], k [b,p,h,dk], alpha/beta [b,p,h]."""
    b, p, h, dk, dv = writes.shape
    s = torch.zeros(b, h, dk, dv, dtype=writes.dtype) if s0 is None else s0
    out = []
    for t in range(p):
        kt = k[:, t]
        erase = kt[..., :, None] * (kt[..., None, :] @ s)  # k k^T S
        s = alpha[:, t, :, None, None] * (s - beta[:, t, :, None, None] * erase) + writes[:, t]
        out.append(s)
    return torch.stack(out, 1)


class StubMixer(nn.Module):
    write_strength_hook = "hook_beta"

    def __init__(self, d_model: int, n_heads: int, d_k: int, d_v: int, gen: torch.Generator):
        super().__init__()
        self.n_heads, self.d_k, self.d_v = n_heads, d_k, d_v
        r = lambda *s: nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64) * 0.5)  # noqa: E731
        self.W_q, self.W_k = r(d_model, n_heads * d_k), r(d_model, n_heads * d_k)
        self.W_v, self.W_b = r(d_model, n_heads * d_v), r(d_model, n_heads)
        self.W_a, self.W_o = r(d_model, n_heads), r(n_heads * d_v, d_model)
        for name in ("q", "k", "v", "beta", "decay", "write", "state", "read"):
            setattr(self, f"hook_{name}", StubHookPoint())

    def forward(self, x: torch.Tensor, start_pos: int, s0: torch.Tensor | None):
        b, p, _ = x.shape
        h = self.n_heads
        pos = torch.arange(start_pos, start_pos + p)
        for m in self.children():
            if isinstance(m, StubHookPoint):
                m.positions = pos
        q = self.hook_q((x @ self.W_q).view(b, p, h, self.d_k))
        k = torch.nn.functional.normalize((x @ self.W_k).view(b, p, h, self.d_k), dim=-1)
        k = self.hook_k(k)
        v = self.hook_v((x @ self.W_v).view(b, p, h, self.d_v))
        beta = self.hook_beta(torch.sigmoid(x @ self.W_b))
        alpha = self.hook_decay(torch.sigmoid(x @ self.W_a))
        native = beta[..., None, None] * k[..., :, None] * v[..., None, :]
        self.hook_write._native = lambda: recurrence(native, k, alpha, beta, s0)
        write = self.hook_write(native)
        states = self.hook_state(recurrence(write, k, alpha, beta, s0))
        read = self.hook_read((states * q[..., :, None]).sum(-2))
        return read.reshape(b, p, -1) @ self.W_o, states[:, -1]


class StubBlock(nn.Module):
    def __init__(self, *args, **kw) -> None:
        super().__init__()
        self.attn = StubMixer(*args, **kw)


class StubModel(HookedRootModule):
    """Embedding -> n_layers residual recurrent blocks -> unembedding (float64)."""

    def __init__(self, n_layers=2, d_model=8, n_heads=2, d_k=4, d_v=3, d_vocab=11, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.cfg = SimpleNamespace(
            n_layers=n_layers,
            d_model=d_model,
            d_vocab=d_vocab,
            n_heads=n_heads,
            d_k=d_k,
            d_v=d_v,
            layer_types=["recurrent"] * n_layers,
            architecture="stub",
        )
        self.W_E = nn.Parameter(torch.randn(d_vocab, d_model, generator=gen, dtype=torch.float64))
        self.blocks = nn.ModuleList(
            [StubBlock(d_model, n_heads, d_k, d_v, gen) for _ in range(n_layers)]
        )
        self.W_U = nn.Parameter(torch.randn(d_model, d_vocab, generator=gen, dtype=torch.float64))
        self.setup()

    def forward(self, tokens, start_pos: int = 0, states=None, return_states: bool = False):
        x = self.W_E[tokens]
        new_states = []
        for i, blk in enumerate(self.blocks):
            out, s = blk.attn(x, start_pos, None if states is None else states[i])
            x = x + out
            new_states.append(s)
        logits = x @ self.W_U
        return (logits, new_states) if return_states else logits

    def to_tokens(self, text: str) -> torch.Tensor:
        return torch.tensor([[ord(c) % self.cfg.d_vocab for c in text]])
