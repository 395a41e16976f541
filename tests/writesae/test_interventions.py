"""substitute / ablate / install hooks on a stub recurrent model, against hand computations."""

from __future__ import annotations

import pytest
import torch

from tests.writesae.stub_model import StubModel, recurrence
from writesae import WriteSAE, WriteSAEConfig

HOOK = "blocks.0.attn.hook_write"
TOKENS = torch.tensor([[1, 4, 2, 7, 3, 9, 5, 0], [6, 6, 2, 8, 10, 1, 3, 4]])


def make_sae(input_kind="state", head=1, d_k=4, d_v=3, seed=0, bias=-0.05) -> WriteSAE:
    cfg = WriteSAEConfig(
        d_k=d_k,
        d_v=d_v,
        n_atoms=6,
        k=2,
        hook_name="blocks.0.attn.hook_" + input_kind,
        head=head,
        input_kind=input_kind,
        dtype="float64",
    )
    sae = WriteSAE(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.W_enc_key.copy_(torch.randn(6, d_k, generator=g, dtype=torch.float64))
        sae.W_enc_value.copy_(torch.randn(6, d_v, generator=g, dtype=torch.float64))
        # a negative bias makes some positions fire nothing, so both branches are exercised
        sae.b_enc.fill_(bias)
    return sae


def capture(model, tokens, hooks=()):
    """Run with ``hooks`` on HOOK, then record the write tensor that the model actually uses."""
    seen = {}

    def rec(t, hook):
        seen[hook.name] = t.clone()

    model.run_with_hooks(tokens, fwd_hooks=[*((HOOK, h) for h in hooks), (HOOK, rec)])
    return seen[HOOK]


def native_quantities(model, tokens):
    names = [f"blocks.0.attn.hook_{n}" for n in ("k", "v", "beta", "decay", "write")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    k, v, beta, alpha, write = (cache[n] for n in names)
    return k, v, beta, alpha, write


def hand_codes(sae, x):
    """TopK codes by brute force: p_i = sum_ab e_ia X_ab f_ib + b_i; keep the k largest, ReLU."""
    e, f, b = sae.W_enc_key.detach(), sae.W_enc_value.detach(), sae.b_enc.detach()
    n = e.shape[0]
    out = torch.zeros(*x.shape[:-2], n, dtype=x.dtype)
    flat_x, flat_out = x.reshape(-1, *x.shape[-2:]), out.view(-1, n)
    for s in range(flat_x.shape[0]):
        pre = [float(e[i] @ flat_x[s] @ f[i] + b[i]) for i in range(n)]
        for i in sorted(range(n), key=lambda i: -pre[i])[: sae.cfg.k]:
            flat_out[s, i] = max(pre[i], 0.0)
    return out


def test_substitute_matched_norm_equals_hand_computation():
    model, sae = StubModel(), make_sae()
    k, v, beta, alpha, write = native_quantities(model, TOKENS)
    # independent native state: brute-force recurrence from the hooked k, v, beta, alpha
    states = recurrence(beta[..., None, None] * k[..., :, None] * v[..., None, :], k, alpha, beta)
    torch.testing.assert_close(states, recurrence(write, k, alpha, beta), rtol=0, atol=1e-12)
    codes = hand_codes(sae, states[:, :, 1])
    expected = write.clone()
    n_fire = 0
    for bi in range(2):
        for t in range(TOKENS.shape[1]):
            c = codes[bi, t]
            if c.max() > 0:
                n_fire += 1
                j = int(c.argmax())
                atom = torch.outer(sae.W_dec_key[j], sae.W_dec_value[j]).detach()
                expected[bi, t, 1] = write[bi, t, 1].norm() * atom / atom.norm()
    assert 0 < n_fire < 16  # both branches happen
    got = capture(model, TOKENS, [sae.substitute])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # matched norm: every firing position keeps the native Frobenius norm
    torch.testing.assert_close(got.flatten(-2).norm(dim=-1), write.flatten(-2).norm(dim=-1))


def test_substitute_positions_atom_and_coefficient_scaling():
    model, sae = StubModel(), make_sae(bias=0.5)  # bias > 0: every atom in the top-k fires
    k, v, beta, alpha, write = native_quantities(model, TOKENS)
    codes = hand_codes(sae, recurrence(write, k, alpha, beta)[:, :, 1])
    hook = sae.substitute_hook(positions=[2, 5], atom=3, scaling="coefficient")
    got = capture(model, TOKENS, [hook])
    expected = write.clone()
    atom = torch.outer(sae.W_dec_key[3], sae.W_dec_value[3]).detach()
    for bi in range(2):
        for t in (2, 5):
            if codes[bi, t, 3] > 0:
                expected[bi, t, 1] = codes[bi, t, 3] * atom
    assert (codes[:, [2, 5], 3] > 0).any()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_substitute_write_input_decides_on_the_write():
    model, sae = StubModel(), make_sae(input_kind="write", bias=0.0)
    *_, write = native_quantities(model, TOKENS)
    codes = hand_codes(sae, write[:, :, 1])
    got = capture(model, TOKENS, [sae.substitute])
    expected = write.clone()
    for bi in range(2):
        for t in range(TOKENS.shape[1]):
            if codes[bi, t].max() > 0:
                j = int(codes[bi, t].argmax())
                atom = torch.outer(sae.W_dec_key[j], sae.W_dec_value[j]).detach()
                expected[bi, t, 1] = write[bi, t, 1].norm() * atom
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_ablate_delete_and_random_control():
    model, sae = StubModel(), make_sae()
    *_, write = native_quantities(model, TOKENS)
    got = capture(model, TOKENS, [sae.ablate])
    expected = write.clone()
    expected[:, :, 1] = 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    got = capture(model, TOKENS, [sae.ablate_hook(control="random", positions=[1, 6], seed=3)])
    untouched = [t for t in range(8) if t not in (1, 6)]
    torch.testing.assert_close(got[:, untouched], write[:, untouched], rtol=0, atol=0)
    torch.testing.assert_close(got[:, :, 0], write[:, :, 0], rtol=0, atol=0)
    rep = got[:, [1, 6], 1]
    # matched Frobenius norm, exactly rank 1, and not the native write
    torch.testing.assert_close(
        rep.flatten(-2).norm(dim=-1), write[:, [1, 6], 1].flatten(-2).norm(dim=-1)
    )
    sv = torch.linalg.svdvals(rep.detach())
    assert float((sv[..., 1] / sv[..., 0]).max()) < 1e-12
    rep = rep.detach()
    cos = (rep * write[:, [1, 6], 1].detach()).sum((-2, -1)) / (rep.norm(dim=(-2, -1)) ** 2)
    assert float(cos.abs().max()) < 0.999


def test_ablate_only_firing_positions():
    model, sae = StubModel(), make_sae()
    k, v, beta, alpha, write = native_quantities(model, TOKENS)
    fires = hand_codes(sae, recurrence(write, k, alpha, beta)[:, :, 1]).amax(-1) > 0
    got = capture(model, TOKENS, [sae.ablate_hook(only_firing=True)])
    expected = write.clone()
    expected[:, :, 1][fires] = 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_install_atom_direction_and_generation():
    model, sae = StubModel(), make_sae()
    *_, write = native_quantities(model, TOKENS)
    got = capture(model, TOKENS, [sae.install(2, positions=[3, 4], scale=1.5)])
    expected = write.clone()
    expected[:, [3, 4], 1] += 1.5 * torch.outer(sae.W_dec_key[2], sae.W_dec_value[2]).detach()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)

    u, w = torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    direction = torch.randn(4, 3, dtype=torch.float64)
    got = capture(model, TOKENS, [sae.install((u, w), [0], 2.0), sae.install(direction, 7, -1.0)])
    expected = write.clone()
    expected[:, 0, 1] += 2.0 * torch.outer(u, w)
    expected[:, 7, 1] -= direction
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)

    # token-by-token (pos axis of length 1, absolute positions from hook.positions) == full pass
    hook = sae.install(2, positions=[3, 4], scale=1.5)
    full = model.run_with_hooks(TOKENS, fwd_hooks=[(HOOK, hook)])
    states, steps = None, []
    for t in range(TOKENS.shape[1]):
        with model.hooks(fwd_hooks=[(HOOK, hook)]):
            logits, states = model(
                TOKENS[:, t : t + 1], start_pos=t, states=states, return_states=True
            )
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-10)
    assert not torch.allclose(full, model(TOKENS))


def test_mismatched_hook_errors():
    model = StubModel()
    with pytest.raises(ValueError, match="wrong hook name.*blocks.1.attn.hook_write"):
        model.run_with_hooks(
            TOKENS, fwd_hooks=[("blocks.1.attn.hook_write", make_sae().substitute)]
        )
    with pytest.raises(ValueError, match="wrong hook name"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_state", make_sae().ablate)])
    with pytest.raises(ValueError, match="d_k mismatch.*d_k=4.*d_k=5"):
        model.run_with_hooks(TOKENS, fwd_hooks=[(HOOK, make_sae(d_k=5).substitute)])
    with pytest.raises(ValueError, match="d_v mismatch"):
        model.run_with_hooks(TOKENS, fwd_hooks=[(HOOK, make_sae(d_v=4).install(0, [1]))])
    with pytest.raises(ValueError, match="head index out of range.*head 2.*2 heads"):
        model.run_with_hooks(TOKENS, fwd_hooks=[(HOOK, make_sae(head=2).ablate)])


def test_random_control_is_the_same_in_a_full_pass_and_token_by_token():
    model, sae = StubModel(), make_sae()
    hook = sae.ablate_hook(control="random", positions=[2, 5], seed=7)
    full = model.run_with_hooks(TOKENS, fwd_hooks=[(HOOK, hook)])
    states, steps = None, []
    for t in range(TOKENS.shape[1]):
        with model.hooks(fwd_hooks=[(HOOK, hook)]):
            logits, states = model(
                TOKENS[:, t : t + 1], start_pos=t, states=states, return_states=True
            )
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-10)
    assert not torch.allclose(full, model(TOKENS))
