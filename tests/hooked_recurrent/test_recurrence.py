"""The engine: chunked Gated DeltaNet against the step-by-step reference, and exact propagation."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hooked_recurrent.components.gated_deltanet import chunk_gated_delta_rule, l2norm
from hooked_recurrent.recurrence import Transition, propagate, scan


def gdn_inputs(B, T, H, dk, dv, seed, strong_decay=False):
    g = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(B, T, H, dk, generator=g)) / math.sqrt(dk)
    k = l2norm(torch.randn(B, T, H, dk, generator=g))
    v = torch.randn(B, T, H, dv, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    scale = 30.0 if strong_decay else 0.5
    log_decay = -torch.rand(B, T, H, generator=g) * scale
    S0 = torch.randn(B, H, dk, dv, generator=g) * 0.3
    return q, k, v, beta, log_decay, S0


def gdn_transition(k, beta, log_decay):
    alpha = log_decay.exp()
    return Transition(alpha, -(alpha * beta)[..., None] * k, k)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 90),
    H=st.integers(1, 3),
    dk=st.integers(1, 12),
    dv=st.integers(1, 12),
    chunk=st.sampled_from([1, 4, 16, 64]),
    seed=st.integers(0, 10_000),
    strong=st.booleans(),
    with_s0=st.booleans(),
)
def test_chunked_gated_delta_rule_equals_scan(B, T, H, dk, dv, chunk, seed, strong, with_s0):
    q, k, v, beta, log_decay, S0 = gdn_inputs(B, T, H, dk, dv, seed, strong)
    S0 = S0 if with_s0 else None
    o_fast, S_fast = chunk_gated_delta_rule(q, k, v, beta, log_decay, S0, chunk_size=chunk)
    o_ref, S_ref, _ = scan(gdn_transition(k, beta, log_decay), q, beta[..., None] * k, v, S0)
    # float32 both ways: agreement to float32 round-off, relative to the values' size
    torch.testing.assert_close(o_fast, o_ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(S_fast, S_ref, rtol=1e-4, atol=2e-5)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(T=st.integers(2, 30), seed=st.integers(0, 10_000), per_channel=st.booleans())
def test_propagate_equals_rerun_with_edited_writes(T, seed, per_channel):
    """propagate(delta) == scan(writes + delta) - scan(writes), for any diagonal-plus-rank-1 A_t."""
    B, H, dk, dv = 2, 3, 5, 4
    g = torch.Generator().manual_seed(seed)
    decay = torch.rand((B, T, H, dk) if per_channel else (B, T, H), generator=g)
    a, b = torch.randn(B, T, H, dk, generator=g) * 0.3, torch.randn(B, T, H, dk, generator=g)
    tr = Transition(decay, a, b)
    q = torch.randn(B, T, H, dk, generator=g)
    k, v = torch.randn(B, T, H, dk, generator=g), torch.randn(B, T, H, dv, generator=g)
    writes = k[..., :, None] * v[..., None, :]
    delta = torch.zeros_like(writes)
    t = int(torch.randint(0, T, (1,), generator=g))
    delta[1, t, 2] = torch.randn(dk, dv, generator=g)
    o0, S0, _ = scan(tr, q, None, None, writes=writes)
    o1, S1, _ = scan(tr, q, None, None, writes=writes + delta)
    d_o, E_T = propagate(tr, q, delta)
    assert (d_o - (o1 - o0)).abs().max() <= 1e-4
    assert (E_T - (S1 - S0)).abs().max() <= 1e-4
    assert torch.equal(d_o[:, :t], torch.zeros_like(d_o[:, :t]))


def test_chunked_gated_delta_rule_gradients_equal_scan_gradients():
    """The chunked path builds its triangular system in place; autograd must still be exact."""
    q, k, v, beta, log_decay, S0 = gdn_inputs(2, 37, 2, 8, 6, seed=21)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, log_decay, S0)]
    w = torch.randn(2, 37, 2, 6, generator=torch.Generator().manual_seed(22))

    def grads(run):
        for t in leaves:
            t.grad = None
        o, S = run(*leaves)
        ((o * w).sum() + S.sum()).backward()
        return [t.grad.clone() for t in leaves]

    fast = grads(lambda q, k, v, b, g, s0: chunk_gated_delta_rule(q, k, v, b, g, s0, chunk_size=8))
    ref = grads(
        lambda q, k, v, b, g, s0: scan(gdn_transition(k, b, g), q, b[..., None] * k, v, s0)[:2]
    )
    for name, a, b in zip(("q", "k", "v", "beta", "log_decay", "S0"), fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, msg=name)
        assert b.abs().max() > 1e-3, name  # every input has a gradient to compare


# ---------------------------------------------------------------- elementwise decay (Mamba-1)
def elementwise_inputs(B, T, H, dk, dv, seed):
    """A decay per state entry in (0, 1), rank-1 writes, reads and a start state."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.rand(B, T, H, dk, dv, generator=g)
    q = torch.randn(B, T, H, dk, generator=g)
    k, v = torch.randn(B, T, H, dk, generator=g), torch.randn(B, T, H, dv, generator=g)
    S0 = torch.randn(B, H, dk, dv, generator=g)
    return decay, q, k, v, S0


def elementwise_brute_force(decay, q, k, v, S0):
    """float64 loop: S_t = decay_t * S_{t-1} + k_t v_t^T, o_t = S_t^T q_t; (o, states)."""
    S = S0.double()
    outs, states = [], []
    for t in range(q.shape[1]):
        S = decay[:, t].double() * S + k[:, t, :, :, None].double() * v[:, t, :, None, :].double()
        outs.append((S * q[:, t, :, :, None].double()).sum(-2))
        states.append(S)
    return torch.stack(outs, 1), torch.stack(states, 1)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 40),
    H=st.integers(1, 2),
    dk=st.integers(1, 6),
    dv=st.integers(1, 7),
    chunk=st.sampled_from([None, 1, 3, 8]),
    seed=st.integers(0, 10_000),
)
def test_elementwise_decay_scan_chunked_states_and_reads_equal_brute_force(
    B, T, H, dk, dv, chunk, seed
):
    from hooked_recurrent.recurrence import chunked_reads, chunked_states

    decay, q, k, v, S0 = elementwise_inputs(B, T, H, dk, dv, seed)
    o_ref, states_ref = elementwise_brute_force(decay, q, k, v, S0)
    tr = Transition(decay)
    o, S_T, states = scan(tr, q, k, v, S0, keep_states=True)
    assert (o.double() - o_ref).abs().max() <= 1e-4
    assert (states.double() - states_ref).abs().max() <= 1e-4
    assert (S_T.double() - states_ref[:, -1]).abs().max() <= 1e-4
    chunked = chunked_states(tr, k, v, S0, chunk=chunk)
    assert (chunked.double() - states_ref).abs().max() <= 1e-4
    o_fast, S_fast = chunked_reads(tr, q, k, v, S0, chunk=chunk)
    assert (o_fast.double() - o_ref).abs().max() <= 1e-4
    assert (S_fast.double() - states_ref[:, -1]).abs().max() <= 1e-4


def test_elementwise_decay_adjoint_states_equal_autograd():
    """adjoint_states with a per-entry decay == dL/dS_t by autograd through the brute force."""
    from hooked_recurrent.recurrence import adjoint_states

    B, T, H, dk, dv = 2, 23, 2, 4, 5
    decay, q, k, v, S0 = elementwise_inputs(B, T, H, dk, dv, seed=3)
    g = torch.Generator().manual_seed(4)
    w_o, w_S = torch.randn(B, T, H, dv, generator=g), torch.randn(B, H, dk, dv, generator=g)
    # dL/dS_t = dL/dW_t: differentiate with respect to an added zero write at every position
    Z = torch.zeros(B, T, H, dk, dv, dtype=torch.float64, requires_grad=True)
    S = S0.double()
    outs = []
    for t in range(T):
        S = decay[:, t].double() * S + k[:, t, :, :, None].double() * v[:, t, :, None, :] + Z[:, t]
        outs.append((S * q[:, t, :, :, None].double()).sum(-2))
    loss = (torch.stack(outs, 1) * w_o.double()).sum() + (S * w_S.double()).sum()
    (ref,) = torch.autograd.grad(loss, Z)
    lam = adjoint_states(Transition(decay), q, w_o, w_S)
    assert (lam.double() - ref).abs().max() <= 1e-4
    assert ref.abs().max() > 1e-2


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(T=st.integers(2, 40), seed=st.integers(0, 10_000), n_edits=st.integers(1, 4))
def test_elementwise_decay_propagate_equals_brute_force_rerun(T, seed, n_edits):
    """propagate(delta) == brute force(writes + delta) - brute force(writes), per-entry decay;
    edits at one or several positions (spans past the stepped limit run chunked)."""
    B, H, dk, dv = 2, 2, 3, 4
    decay, q, k, v, _ = elementwise_inputs(B, T, H, dk, dv, seed)
    g = torch.Generator().manual_seed(seed + 1)
    delta = torch.zeros(B, T, H, dk, dv)
    first = T
    for _ in range(n_edits):
        b, t, h = (int(torch.randint(0, n, (1,), generator=g)) for n in (B, T, H))
        delta[b, t, h] += torch.randn(dk, dv, generator=g)
        first = min(first, t)
    zero = torch.zeros(B, H, dk, dv)
    o0, s0 = elementwise_brute_force(decay, q, k, v, zero)
    # the brute force with dense writes: fold delta in as a second write through a unit key
    S, outs = zero.double(), []
    for t in range(T):
        W = k[:, t, :, :, None].double() * v[:, t, :, None, :].double() + delta[:, t].double()
        S = decay[:, t].double() * S + W
        outs.append((S * q[:, t, :, :, None].double()).sum(-2))
    d_o, E_T = propagate(Transition(decay), q, delta)
    assert (d_o.double() - (torch.stack(outs, 1) - o0)).abs().max() <= 1e-4
    assert (E_T.double() - (S - s0[:, -1])).abs().max() <= 1e-4
    assert torch.equal(d_o[:, :first], torch.zeros_like(d_o[:, :first]))
