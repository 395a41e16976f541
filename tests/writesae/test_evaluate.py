"""Evaluations: Wilson intervals, the closed form on a linear read-out, substitution KLs."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformer_lens import HookedRootModule

from hooked_recurrent.hook_points import RecurrentHookPoint, at_positions
from hooked_recurrent.mixer import RecurrentMixer
from hooked_recurrent.recurrence import Transition, scan
from writesae import WriteSAE, WriteSAEConfig
from writesae.evaluate import (
    closed_form_logit_shift,
    evaluate_closed_form,
    evaluate_substitution,
)
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
        self.W_out = nn.Linear(n_heads * d_v, d_model, bias=False)
        self.hook_q = RecurrentHookPoint()
        self.hook_k = RecurrentHookPoint()
        self.hook_v = RecurrentHookPoint()
        self.hook_beta = RecurrentHookPoint()
        self.hook_decay = RecurrentHookPoint()
        self.hook_read = RecurrentHookPoint()

    @property
    def W_O(self):
        return self.W_out.weight.T.reshape(self.n_heads, self.d_v, -1)

    transition_hooks = ("hook_decay", "hook_beta", "hook_k")

    def make_transition(self, a, b, k):
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
        tr = self.make_transition(alpha, beta, k)
        wk = beta[..., None] * k
        o, _ = self.recur(lambda: scan(tr, q, wk, v)[:2], tr, q, wk, v, None)
        return self.W_out(self.hook_read(o).reshape(B, T, -1))


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
        eps_values=(0.01, 0.1, 1.0, 4.0),
        position=3,
        read_offset=4,
        propagator=propagator,
        progress=False,
    )
    assert res.n_points == 4 * 4 * 12
    assert res.r2 >= 0.9999 and res.r2_direct >= 0.9999
    assert res.sign_agreement == {"first_order": 1.0, "direct": 1.0}
    # on a linear read-out the paper's direct path is the exact first order
    for eps_scale, eps in (("write_norm", 0.1), ("absolute", 2.0)):
        kw = dict(tokens=tokens, read_position=7, eps=eps, eps_scale=eps_scale)
        direct = closed_form_logit_shift(
            model, sae, 0, 1, 2, 3, [0, 5, 9], method="direct", propagator=propagator, **kw
        )
        first = closed_form_logit_shift(model, sae, 0, 1, 2, 3, [0, 5, 9], **kw)
        assert direct.shape == first.shape == (12, 3)
        assert torch.allclose(direct, first, rtol=1e-5, atol=1e-7 * first.abs().max())
        # several atoms in one batch of edits give the same as one call per atom
        both = closed_form_logit_shift(model, sae, 0, 1, [7, 2], 3, [0, 5, 9], **kw)
        assert both.shape == (2, 12, 3)
        assert torch.allclose(both[1], first, rtol=1e-6, atol=1e-9 * first.abs().max())


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
    assert res.r2_direct < 0.9999
    assert res.r2 >= 0.9999  # the first order always propagates exactly


def _tiny(family):
    from hooked_recurrent import HookedRecurrentModel

    if family == "qwen3_5":
        from tests.hooked_recurrent.qwen_helpers import qwen_hf

        return HookedRecurrentModel.from_hf_model(qwen_hf("gqa", seed=5))
    if family == "mamba2":
        from tests.hooked_recurrent.mamba_helpers import mamba_hf

        return HookedRecurrentModel.from_hf_model(mamba_hf(seed=5))
    from hooked_recurrent.pretrained import rwkv7

    return rwkv7.random_model(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, head_dim=16, seed=5
    )


def _state_sae(model, n_atoms=32, k=3, shape=(3, 12)):
    """(layer, head, a random state SAE for head 1 of the last recurrent layer, tokens)."""
    layer, head = model.cfg.recurrent_layers[-1], 1
    sae = WriteSAE(
        WriteSAEConfig(
            d_k=model.cfg.d_k,
            d_v=model.cfg.d_v,
            n_atoms=n_atoms,
            k=k,
            hook_name=f"blocks.{layer}.attn.hook_state",
            head=head,
        ),
        seed=0,
    )
    tokens = torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(0))
    return layer, head, sae, tokens


@pytest.mark.parametrize(
    "family,kl_position",
    [("qwen3_5", "edited"), ("mamba2", "edited"), ("rwkv7", "edited"), ("qwen3_5", "end"),
     ("rwkv7", "mean")],
)  # fmt: skip
@torch.no_grad()
def test_substitution_kls_equal_full_recomputation(family, kl_position):
    """Every family: the prefix-reusing conditions equal a full forward with the edit by hand, at
    the edited token, at the end of the prompt, or averaged over the rest of the prompt."""
    model = _tiny(family)
    layer, head, sae, tokens = _state_sae(model)
    res = evaluate_substitution(
        model,
        sae,
        tokens,
        max_firings=6,
        positions_per_prompt=3,
        kl_position=kl_position,
        progress=False,
    )
    assert res.n == len(res.firings) >= 6
    assert res.settings["kl_position"] == kl_position
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
        at = {"edited": [t], "end": [tokens.shape[1] - 1], "mean": range(t, tokens.shape[1])}
        kl = sum(
            float((clean[b, s].exp() * (clean[b, s] - edited[0, s])).sum()) for s in at[kl_position]
        ) / len(at[kl_position])
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


@pytest.mark.parametrize("family", ["qwen3_5", "mamba2", "rwkv7"])
@torch.no_grad()
def test_first_order_equals_the_central_finite_difference(family):
    """`first_order` is the derivative of every logit along the edit, through the per-head norm,
    the later positions and layers and the final norm: it equals a central finite difference of
    the logits measured with `run_with_hooks` edits of the write (fourth-order stencil, so the
    step can stay large enough for float32)."""
    from writesae.closed_form import native_write_norm

    model = _tiny(family)
    layer, head, t0, t = model.cfg.recurrent_layers[0], 1, 3, 6
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
    tokens = torch.randint(0, 97, (4, 10), generator=torch.Generator().manual_seed(1))
    vocab = torch.arange(model.cfg.d_vocab)
    atom = 3
    # eps = 1 relative: the derivative with respect to the edit's size in units of the write norm
    pred = closed_form_logit_shift(
        model, sae, layer, head, atom, t0, vocab, tokens=tokens, read_position=t, eps=1.0
    )
    prefix = f"blocks.{layer}.attn"
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(prefix + ".hook_"))
    norm = native_write_norm(model, cache, layer, head)[:, t0]
    _, c2 = model.run_with_cache(tokens, names_filter=[f"{prefix}.hook_write"])
    native = c2[f"{prefix}.hook_write"][:, t0, head].flatten(-2).norm(dim=-1).double()
    assert torch.allclose(norm, native, rtol=1e-5)
    A = sae.atom_matrices(torch.tensor(atom)).detach()

    def logits_at(h):
        def add(w, hook):
            w = w.clone()
            w[:, t0, head] += (h * norm)[:, None, None].to(w.dtype) * A
            return w

        out = model.run_with_hooks(tokens, fwd_hooks=[(f"{prefix}.hook_write", add)])
        return out[:, t].double()

    h = 0.05
    fd = (8 * (logits_at(h) - logits_at(-h)) - (logits_at(2 * h) - logits_at(-2 * h))) / (12 * h)
    rel = float((fd - pred).norm() / pred.norm())
    assert rel <= 1e-3, rel
    assert float(pred.norm()) > 0
    batched = closed_form_logit_shift(
        model, sae, layer, head, [0, atom], t0, vocab, tokens=tokens, read_position=t, eps=1.0
    )
    assert torch.allclose(batched[1], pred, rtol=1e-4, atol=1e-6 * float(pred.abs().max()))


def test_planted_substitute_has_the_asked_cosine():
    from writesae.evaluate.substitution import frobenius_cosine, planted_rank1

    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(5, 6, generator=gen), torch.randn(5, 4, generator=gen)
    W = 0.3 * k[:, :, None] * v[:, None, :]
    for c in (0.0, 0.1, 0.5, 0.9, 1.0):
        P = planted_rank1(W, c, torch.randn(5, 6, generator=gen), torch.randn(5, 4, generator=gen))
        assert torch.allclose(P.flatten(-2).norm(dim=-1), torch.ones(5, dtype=P.dtype))
        assert torch.allclose(frobenius_cosine(P, W), torch.full((5,), c, dtype=P.dtype), atol=1e-6)


@torch.no_grad()
def test_substitution_controls_and_scales():
    """Planted cosine 1 at matched norm is the native write (KL 0); a fraction 1.0 of the native
    norm is the matched-norm atom; the best dictionary atom is at least as aligned as the top one;
    the calibration bins count every firing."""
    model = _tiny("qwen3_5")
    layer, head, sae, tokens = _state_sae(model)
    res = evaluate_substitution(
        model,
        sae,
        tokens,
        max_firings=12,
        positions_per_prompt=4,
        best_atom=True,
        planted_cosines=(0.5, 1.0),
        sweep_scales=("coefficient", 1.0, 0.1),
        progress=False,
    )
    assert max(res.kl["planted_1"]) < 1e-9
    assert res.kl["atom_1x_norm"] == pytest.approx(res.kl["atom"], rel=1e-4, abs=1e-9)
    assert set(res.scale_sweep) == {"matched_norm", "coefficient", "1x_norm", "0.1x_norm"}
    assert res.scale_sweep["matched_norm"]["wins"] == res.wins_vs_delete
    assert res.best_atom["median_cosine"] >= float(np.median(np.abs(res.cosine))) - 1e-12
    assert sum(res.calibration["n"]) == res.n == len(res.cosine)
    kd, k1 = np.array(res.kl["delete"]), np.array(res.kl["planted_1"])
    assert res.calibration["planted"]["1"]["wins"] == int((k1 < kd).sum())


@torch.no_grad()
def test_install_raises_a_reachable_target_at_the_same_position():
    """Where one head can move the target (logit gap below the bound), the install (first-order
    direction, key signed by the query, norm without beta) raises the target's rank at the first
    edited position, compared with the unedited rank at that same position."""
    from writesae.evaluate import evaluate_install

    model = _tiny("qwen3_5")
    layer, head, sae, tokens = _state_sae(model, n_atoms=8, k=2, shape=(6, 10))
    res = evaluate_install(
        model, sae, tokens, rank_band=(5, 40), n_targets=2, max_new_tokens=6, progress=False
    )
    reachable = [t for t in res.trials if t["gap"] < t["bound"]]
    assert res.n_reachable == len(reachable) >= 3
    for t in reachable:
        assert t["edited_rank_first_edit"] < t["native_rank_first_edit"], t
    shifts = [t["native_rank_first_edit"] - t["edited_rank_first_edit"] for t in res.trials]
    assert res.median_rank_shift == float(np.median(shifts)) > 0
    assert all(math.isfinite(t["bound"]) and t["gap"] >= 0 for t in res.trials)


def test_evaluations_refuse_an_sae_from_another_model():
    """The library evaluations check the model as the CLI does: an SAE whose recorded weights
    fingerprint differs is refused unless allow_other_model=True."""
    from hooked_recurrent import HookedRecurrentModel
    from hooked_recurrent.validation import model_fingerprint
    from writesae.evaluate import evaluate_closed_form, evaluate_install

    model = HookedRecurrentModel.from_pretrained("tiny-qwen3.5-shakespeare")
    c = model.cfg
    sae = WriteSAE(
        WriteSAEConfig(
            d_k=c.d_k, d_v=c.d_v, n_atoms=8, k=2, hook_name="blocks.1.attn.hook_write", head=1
        )
    )
    sae.cfg.model_fingerprint = model_fingerprint(model)
    other = HookedRecurrentModel.from_pretrained("tiny-qwen3.5-shakespeare")
    with torch.no_grad():
        other.blocks[0].attn.W_out.weight.mul_(1.5)
    tokens = model.to_tokens("To be, or not to be, that is the question")
    for run in (evaluate_substitution, evaluate_closed_form, evaluate_install):
        with pytest.raises(ValueError, match="fingerprint"):
            run(other, sae, tokens)
    sae.check_model(model)  # its own model passes
    sae.check_model(other, allow_other_model=True)
