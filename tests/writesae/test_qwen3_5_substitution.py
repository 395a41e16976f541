"""WriteSAE substitution through a tiny random Qwen3.5 equals a hand-made brute-force recurrence.

The reference is written from the Gated DeltaNet equations (the WriteSAE paper, section 1.1),
token by token, with the Hugging Face layer's own weights: first the native recurrence gives S_t,
the SAE's firing decision is made by hand on S_t, then a second recurrence runs with the native
write replaced by ``||beta k v^T||_F u_j w_j^T`` at the firing positions.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hooked_recurrent")
from hooked_recurrent import HookedRecurrentModel  # noqa: E402
from tests.hooked_recurrent.qwen_helpers import qwen_hf  # noqa: E402
from tests.hooked_recurrent.references import (  # noqa: E402
    brute_force_states,
    gdn_transition,
    hf_gdn_inputs,
    hf_gdn_output,
)
from writesae import WriteSAE, WriteSAEConfig  # noqa: E402

LAYER, HEAD, T = 1, 1, 24


def run_states(k, alpha, beta, writes):
    """S_t = alpha_t (S - beta_t k k^T S) + W_t, step by step; returns [b, L, h, dk, dv]."""
    q = torch.zeros_like(k)  # the reads are not needed here
    return brute_force_states(q, *gdn_transition(k, alpha, beta), writes)[0]


def brute_force_substituted(la, h, sae, log):
    q, k, v, beta, alpha = hf_gdn_inputs(la, h)
    native = beta[..., None, None] * k[..., :, None] * v[..., None, :]
    states = run_states(k, alpha, beta, native)
    e, f = sae.W_enc_key.detach().double(), sae.W_enc_value.detach().double()
    b_enc = sae.b_enc.detach().double()
    writes = native.clone()
    for bi in range(h.shape[0]):
        for t in range(h.shape[1]):
            pre = torch.einsum("ik,kv,iv->i", e, states[bi, t, HEAD].double(), f) + b_enc
            top = pre.topk(sae.cfg.k).values
            if float(top[0]) > 0:  # some atom fires; the top atom is the argmax of the codes
                j = int(pre.argmax())
                atom = torch.outer(sae.W_dec_key[j], sae.W_dec_value[j]).detach()
                writes[bi, t, HEAD] = native[bi, t, HEAD].norm() * atom
                log.append((bi, t))
    states = run_states(k, alpha, beta, writes)
    return hf_gdn_output(la, h, torch.einsum("blhkv,blhk->blhv", states, q))


@torch.no_grad()
def substitution_vs_brute_force():
    """(logits with ``sae.substitute`` on hook_write, logits of the brute-force recurrence with
    the writes replaced by hand, clean logits, the firing (batch, position) list)."""
    hf = qwen_hf("gqa", seed=5)
    model = HookedRecurrentModel.from_hf_model(hf)
    la = hf.model.layers[LAYER].linear_attn
    tokens = torch.randint(
        0, hf.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1)
    )
    cfg = WriteSAEConfig(
        d_k=la.head_k_dim,
        d_v=la.head_v_dim,
        n_atoms=32,
        k=4,
        hook_name=f"blocks.{LAYER}.attn.hook_state",
        head=HEAD,
        n_heads=la.num_v_heads,
    )
    sae = WriteSAE(cfg, seed=0)
    # bias at minus the median top pre-activation: about half the positions fire
    _, cache = model.run_with_cache(tokens, names_filter=[cfg.hook_name])
    pre = sae.pre_acts(cache[cfg.hook_name][:, :, HEAD])
    sae.b_enc.fill_(-float(pre.max(-1).values.median()))

    clean = model(tokens)
    ours = model.run_with_hooks(tokens, fwd_hooks=[(cfg.write_hook_name, sae.substitute)])

    fired: list[tuple[int, int]] = []
    original = la.forward
    la.forward = lambda hidden_states, **kw: brute_force_substituted(la, hidden_states, sae, fired)
    try:
        ref = hf(tokens, use_cache=False).logits
    finally:
        la.forward = original
    return ours, ref, clean, fired


def test_substitute_matches_brute_force_recurrence():
    ours, ref, clean, fired = substitution_vs_brute_force()
    assert 0.2 * 2 * T < len(fired) < 0.8 * 2 * T
    assert (ours - ref).abs().max() <= 1e-4
    first = min(t for _, t in fired)
    assert torch.equal(ours[:, :first], clean[:, :first]) or first == 0
    assert (ours - clean).abs().max() > 1e-3  # the substitution does change the output


@torch.no_grad()
def test_write_factors_and_generation_hooks():
    from writesae import extract_cell

    hf = qwen_hf("gqa", seed=5)
    model = HookedRecurrentModel.from_hf_model(hf)
    la = hf.model.layers[LAYER].linear_attn
    tokens = torch.randint(
        0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3)
    )
    # the streamed factors rebuild the model's own hook_write: (beta * k) v^T
    f = extract_cell(model, tokens, LAYER, HEAD, kind="write")
    name = f"blocks.{LAYER}.attn.hook_write"
    _, cache = model.run_with_cache(tokens, names_filter=[name])
    ref = cache[name][:, :, HEAD].reshape(-1, la.head_k_dim, la.head_v_dim)
    torch.testing.assert_close(f.key[:, :, None] * f.value[:, None, :], ref, rtol=1e-5, atol=1e-6)

    cfg = WriteSAEConfig(
        d_k=la.head_k_dim,
        d_v=la.head_v_dim,
        n_atoms=16,
        k=2,
        hook_name=f"blocks.{LAYER}.attn.hook_state",
        head=HEAD,
    )
    sae = WriteSAE(cfg, seed=1)
    sae.b_enc.fill_(10.0)  # every position fires, so the substitution below is certain to act
    prompt = tokens[:, :5]
    # absolute positions 6..8 are generated one token at a time (pos axis of length 1)
    hooks = [
        # substitution first: before position 6 nothing is edited, so the native state the SAE
        # reads is the same in generation and in the full pass
        (name, sae.substitute_hook(positions=[6])),
        (name, sae.install(3, positions=[7, 8], scale=4.0)),
    ]
    out = model.generate(prompt, max_new_tokens=6, fwd_hooks=hooks)
    full = model.run_with_hooks(out, fwd_hooks=hooks)
    # greedy decoding with the hooks == argmax of one full pass with the same hooks
    assert torch.equal(full[:, 4:-1].argmax(-1), out[:, 5:])
    clean = model.generate(prompt, max_new_tokens=6)
    assert not torch.equal(clean, out)
