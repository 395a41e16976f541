"""Edits at the recurrent hooks propagate exactly: compared with a brute-force recomputation.

The brute force is written here, independently of the package: a token-by-token Gated DeltaNet
using the Hugging Face layer's own weights, with the edit applied by hand, swapped into the HF
model for the edited layer.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from qwen_helpers import qwen_hf

from hooked_recurrent import HookedRecurrentModel

LAYER, T, POS, HEAD = 1, 40, 17, 1


def brute_force_gdn(la, h, edit_name, edit):
    """Qwen3.5 Gated DeltaNet, one token at a time, with `edit` applied to `edit_name` at POS."""
    B, L, _ = h.shape
    Hk, Hv = la.num_k_heads, la.num_v_heads
    dk, dv = la.head_k_dim, la.head_v_dim
    qkv = la.in_proj_qkv(h).transpose(1, 2)
    conv = F.silu(la.conv1d(qkv)[..., :L]).transpose(1, 2)
    q, k, v = conv.split((Hk * dk, Hk * dk, Hv * dv), dim=-1)
    r = Hv // Hk

    def unit(x):
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)

    q = unit(q.reshape(B, L, Hk, dk)).repeat_interleave(r, 2) / math.sqrt(dk)
    k = unit(k.reshape(B, L, Hk, dk)).repeat_interleave(r, 2)
    v = v.reshape(B, L, Hv, dv).clone()
    beta = torch.sigmoid(la.in_proj_b(h))
    alpha = torch.exp(-la.A_log.exp() * F.softplus(la.in_proj_a(h) + la.dt_bias))
    for name, x in (("hook_k", k), ("hook_v", v), ("hook_beta", beta), ("hook_decay", alpha)):
        if edit_name == name:
            x[:, POS] = edit(x[:, POS])
    S = torch.zeros(B, Hv, dk, dv)
    outs = []
    for t in range(L):
        kt = k[:, t]
        S = alpha[:, t, :, None, None] * (
            S
            - beta[:, t, :, None, None]
            * kt[..., :, None]
            * torch.einsum("bhk,bhkv->bhv", kt, S)[..., None, :]
        )
        W = beta[:, t, :, None, None] * kt[..., :, None] * v[:, t, :, None, :]
        if edit_name == "hook_write" and t == POS:
            W = edit(W)
        S = S + W
        if edit_name == "hook_state" and t == POS:
            S = edit(S)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outs, 1)
    z = la.in_proj_z(h).reshape(B, L, Hv, dv)
    y = la.norm(o.reshape(-1, dv), z.reshape(-1, dv)).reshape(B, L, Hv * dv)
    return la.out_proj(y)


def _memo(make_delta):
    """An edit x -> x + delta whose random delta is drawn once, on first use, from x's shape."""

    def factory(gen):
        cache = {}

        def edit(x):
            if "d" not in cache:
                cache["d"] = make_delta(x, gen)
            return x + cache["d"]

        return edit

    return factory


def _head_only(delta_of_head):
    def make(x, gen):
        d = torch.zeros_like(x)
        d[:, HEAD] = delta_of_head(x[:, HEAD], gen)
        return d

    return make


def _rank1(x, gen):
    return 0.8 * torch.outer(
        torch.randn(x.shape[-2], generator=gen), torch.randn(x.shape[-1], generator=gen)
    )


EDITS = {
    "hook_write:rank1": _memo(_head_only(_rank1)),
    "hook_write:dense": _memo(
        _head_only(lambda x, g: 0.3 * torch.randn(x.shape[-2:], generator=g))
    ),
    "hook_state:rank1": _memo(_head_only(_rank1)),
    "hook_state:dense": _memo(
        _head_only(lambda x, g: 0.3 * torch.randn(x.shape[-2:], generator=g))
    ),
    "hook_k:head": _memo(_head_only(lambda x, g: 0.5 * torch.randn(x.shape[-1], generator=g))),
    "hook_k:all": _memo(lambda x, g: 0.5 * torch.randn(x.shape, generator=g)),
    "hook_v:head": _memo(_head_only(lambda x, g: torch.randn(x.shape[-1], generator=g))),
    "hook_v:all": _memo(lambda x, g: torch.randn(x.shape, generator=g)),
    "hook_beta:head": _memo(_head_only(lambda x, g: 0.97 - x)),
    "hook_beta:all": _memo(lambda x, g: -0.5 * x),
    "hook_decay:head": _memo(_head_only(lambda x, g: 0.3 - x)),
    "hook_decay:all": _memo(lambda x, g: -0.5 * x),
}


@pytest.fixture(scope="module")
def models():
    hf = qwen_hf("gqa", seed=5)
    return hf, HookedRecurrentModel.from_hf_model(hf)


@pytest.mark.parametrize("case", list(EDITS))
@torch.no_grad()
def test_edit_matches_brute_force(models, case):
    hf, model = models
    hook_name = case.split(":")[0]
    tokens = torch.randint(
        0, hf.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1)
    )
    edit = EDITS[case](torch.Generator().manual_seed(2))

    def hook(x, hook):
        x = x.clone()
        x[:, POS] = edit(x[:, POS])
        return x

    clean = model(tokens)
    ours = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.attn.{hook_name}", hook)])

    la = hf.model.layers[LAYER].linear_attn
    original = la.forward
    la.forward = lambda hidden_states, **kw: brute_force_gdn(la, hidden_states, hook_name, edit)
    try:
        ref = hf(tokens, use_cache=False).logits
    finally:
        la.forward = original

    assert (ours - ref).abs().max() <= 1e-4
    assert torch.equal(ours[:, :POS], clean[:, :POS])
    # the edit does reach later tokens (else the test would not test propagation)
    assert (ours[:, POS + 1 :] - clean[:, POS + 1 :]).abs().max() > 1e-3
