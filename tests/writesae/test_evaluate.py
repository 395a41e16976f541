"""Evaluations: Wilson intervals, the closed form on a linear read-out, substitution KLs."""

import math

import pytest
import torch
from torch import nn
from transformer_lens import HookedRootModule

from hooked_recurrent.hook_points import RecurrentHookPoint, at_positions
from hooked_recurrent.mixer import RecurrentMixer
from hooked_recurrent.recurrence import Transition, scan
from writesae import WriteSAE, WriteSAEConfig
from writesae.evaluate import evaluate_closed_form, evaluate_substitution
from writesae.stats import wilson


def test_wilson_contains_p_at_the_ends():
    for n in (1, 6, 12, 100, 4851):
        assert wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0
        assert wilson(0, n)[1] > 0 and wilson(n, n)[0] < 1


def test_wilson_reproduces_the_paper():
    lo, hi = wilson(4481, 4851)
    assert (round(100 * lo, 2), round(100 * hi, 2)) == (91.59, 93.09)
    lo, hi = wilson(2202, 2500)
    assert (round(100 * lo, 2), round(100 * hi, 2)) == (86.75, 89.29)


class _Mixer(RecurrentMixer):
    """One recurrent head group with scalar decays (and optionally a delta-rule erase)."""

    def __init__(self, d_model, n_heads, d_k, d_v, erase):
        super().__init__()
        self.n_heads, self.d_k, self.d_v, self.erase = n_heads, d_k, d_v, erase
        self.W_q = nn.Linear(d_model, n_heads * d_k, bias=False)
        self.W_k = nn.Linear(d_model, n_heads * d_k, bias=False)
        self.W_v = nn.Linear(d_model, n_heads * d_v, bias=False)
        self.W_a = nn.Linear(d_model, n_heads)
        self.W_b = nn.Linear(d_model, n_heads)
        self.W_O = nn.Linear(n_heads * d_v, d_model, bias=False)
        for n in ("q", "k", "v", "beta", "decay", "read"):
            setattr(self, f"hook_{n}", RecurrentHookPoint())

    def head_output_weight(self, head):
        return self.W_O.weight[:, head * self.d_v : (head + 1) * self.d_v]

    def transition_from_cache(self, cache, head):
        a = cache["blocks.0.attn.hook_decay"][:, :, head].double()
        b = cache["blocks.0.attn.hook_beta"][:, :, head].double()
        k = cache["blocks.0.attn.hook_k"][:, :, head].double()
        return Transition(
            a, -(a * b)[..., None] * k if self.erase else None, k if self.erase else None
        )

    def forward(self, x):
        B, T, _ = x.shape
        H = self.n_heads
        q = self.hook_q(self.W_q(x).view(B, T, H, self.d_k))
        k = self.W_k(x).view(B, T, H, self.d_k)
        k = self.hook_k(k / k.norm(dim=-1, keepdim=True))
        v = self.hook_v(self.W_v(x).view(B, T, H, self.d_v))
        beta = self.hook_beta(torch.sigmoid(self.W_b(x)))
        alpha = self.hook_decay(torch.sigmoid(self.W_a(x) + 2.0))
        tr = Transition(
            alpha, -(alpha * beta)[..., None] * k if self.erase else None, k if self.erase else None
        )
        wk = beta[..., None] * k
        o, _ = self.recur(lambda: scan(tr, q, wk, v)[:2], tr, q, wk, v, None)
        return self.W_O(self.hook_read(o).reshape(B, T, -1))


class _Block(nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.attn = mixer


class LinearReadoutStub(HookedRootModule):
    """logits = W_U W_O o: a recurrent layer read out linearly (no norm, no later layer)."""

    def __init__(self, vocab=40, d_model=24, n_heads=2, d_k=6, d_v=5, erase=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList([_Block(_Mixer(d_model, n_heads, d_k, d_v, erase))])
        self.unembed = nn.Linear(d_model, vocab, bias=False)
        self.setup()

    def forward(self, tokens):
        with at_positions(torch.arange(tokens.shape[1])):
            return self.unembed(self.blocks[0].attn(self.embed(tokens)))


@pytest.mark.parametrize("erase,propagator", [(False, "gate"), (True, "exact")])
def test_closed_form_is_exact_on_a_linear_readout(erase, propagator):
    torch.manual_seed(0)
    model = LinearReadoutStub(erase=erase)
    sae = WriteSAE(
        WriteSAEConfig(d_k=6, d_v=5, n_atoms=16, k=4, hook_name="blocks.0.attn.hook_state", head=1),
        seed=1,
    )
    tokens = torch.randint(0, 40, (12, 10))
    res = evaluate_closed_form(
        model,
        sae,
        tokens,
        n_atoms=4,
        position=3,
        read_offset=4,
        propagator=propagator,
        progress=False,
    )
    assert res.n_points == 4 * 4 * 12
    assert res.r2 >= 0.9999
    assert res.sign_agreement == 1.0


def test_gate_form_is_not_exact_with_an_erase():
    """The scalar-gate form ignores the delta rule's projections: it must not look exact there."""
    torch.manual_seed(0)
    model = LinearReadoutStub(erase=True)
    sae = WriteSAE(
        WriteSAEConfig(d_k=6, d_v=5, n_atoms=16, k=4, hook_name="blocks.0.attn.hook_state", head=1),
        seed=1,
    )
    tokens = torch.randint(0, 40, (12, 10))
    res = evaluate_closed_form(
        model, sae, tokens, n_atoms=4, position=3, read_offset=4, propagator="gate", progress=False
    )
    assert res.r2 < 0.9999


def _tiny(family):
    from hooked_recurrent import HookedRecurrentModel

    if family == "qwen3_5":
        from qwen_helpers import qwen_hf

        return HookedRecurrentModel.from_hf_model(qwen_hf("gqa", seed=5))
    if family == "mamba2":
        from mamba_helpers import mamba_hf

        return HookedRecurrentModel.from_hf_model(mamba_hf(seed=5))
    from hooked_recurrent.pretrained import rwkv7

    return rwkv7.random_model(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, head_dim=16, seed=5
    )


@pytest.mark.parametrize("family", ["qwen3_5", "mamba2", "rwkv7"])
@torch.no_grad()
def test_substitution_kls_equal_full_recomputation(family):
    """Every family: the prefix-reusing conditions equal a full forward with the edit by hand."""
    model = _tiny(family)
    layer, head = model.cfg.recurrent_layers[-1], 1
    sae = WriteSAE(
        WriteSAEConfig(
            d_k=model.cfg.d_k,
            d_v=model.cfg.d_v,
            n_atoms=32,
            k=3,
            hook_name=f"blocks.{layer}.attn.hook_state",
            head=head,
        ),
        seed=0,
    )
    tokens = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    res = evaluate_substitution(
        model, sae, tokens, max_firings=6, positions_per_prompt=3, progress=False
    )
    assert res.n == len(res.firings) >= 6
    clean = torch.log_softmax(model(tokens).double(), -1)
    for i, (b, t) in enumerate(res.firings[:6]):

        def delete(w, hook, t=t):
            w = w.clone()
            w[:, t, head] = 0
            return w

        edited = torch.log_softmax(
            model.run_with_hooks(
                tokens[b : b + 1], fwd_hooks=[(f"blocks.{layer}.attn.hook_write", delete)]
            ).double(),
            -1,
        )
        kl = float((clean[b, t].exp() * (clean[b, t] - edited[0, t])).sum())
        assert math.isclose(res.kl["delete"][i], kl, rel_tol=1e-3, abs_tol=1e-7)
    assert 0.0 <= res.win_rate_vs_delete <= 1.0
    assert res.ci_vs_delete == wilson(res.wins_vs_delete, res.n)


@pytest.mark.parametrize("family", ["mamba2", "rwkv7"])
@torch.no_grad()
def test_closed_form_exact_propagator_matches_the_measured_read(family):
    """The exact propagator P u must reproduce the change of the read itself (before any norm)."""
    model = _tiny(family)
    layer, head, t0, t = model.cfg.recurrent_layers[-1], 1, 3, 9
    sae = WriteSAE(
        WriteSAEConfig(
            d_k=model.cfg.d_k,
            d_v=model.cfg.d_v,
            n_atoms=8,
            k=2,
            hook_name=f"blocks.{layer}.attn.hook_state",
            head=head,
        ),
        seed=0,
    )
    tokens = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    prefix = f"blocks.{layer}.attn"
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(prefix))
    u, w = sae.key_factors[0], sae.value_factors[0]

    def add(state, hook):
        state[:, t0, head] += torch.outer(u, w)
        return state

    with model.hooks(fwd_hooks=[(f"{prefix}.hook_state", add)]):
        _, edited = model.run_with_cache(tokens, names_filter=[f"{prefix}.hook_read"])
    d_read = (edited[f"{prefix}.hook_read"] - cache[f"{prefix}.hook_read"])[:, t, head].double()
    tr = model.blocks[layer].attn.transition_from_cache(cache, head)
    from hooked_recurrent.recurrence import Transition

    pu = u.double().expand(4, -1)[:, None, :, None]
    sub = Transition(
        tr.decay[:, :, None],
        None if tr.erase_a is None else tr.erase_a[:, :, None],
        None if tr.erase_b is None else tr.erase_b[:, :, None],
    )
    for s in range(t0 + 1, t + 1):
        pu = sub.step(pu, s)
    q = cache[f"{prefix}.hook_q"][:, t, head].double()
    predicted = (pu[:, 0, :, 0] * q).sum(-1)[:, None] * w.double()
    assert (d_read - predicted).abs().max() <= 1e-5
