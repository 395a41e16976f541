"""The hand-written autograd functions of writesae.factor_loss against their plain references.

Each fast function is held to its ``naive_*`` reference (dense, ordinary autograd) in value and in
the gradient of every input; each reference is first held to an explicit loop over samples and
atoms, so neither side is checked only against itself.
"""

from __future__ import annotations

import pytest
import torch

from writesae.factor_loss import (
    Rank1SqError,
    SelectedBilinear,
    Selection,
    TopKFactorLoss,
    naive_rank1_sq_error,
    naive_selected_bilinear,
    naive_topk_factor_loss,
    rank1_sq_error,
)

D_K, D_V, N = 5, 6, 9


def _args(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def _value_and_grads(fn, inputs, weights):
    """Outputs of ``fn()`` and the gradients of ``sum_i <out_i, weights_i>`` wrt ``inputs``."""
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
    grads = torch.autograd.grad(total, inputs)
    return [o.detach() for o in outs], grads


def _loop_recon(coef, idx, u, w, bias=None):
    """sum_j coef_bj u_{idx_bj} w_{idx_bj}^T (+ bias), one sample and atom at a time."""
    B, m = idx.shape
    out = torch.zeros(B, u.shape[1], w.shape[1], dtype=torch.float64)
    for b in range(B):
        for j in range(m):
            out[b] += coef[b, j] * torch.outer(u[idx[b, j]], w[idx[b, j]])
        if bias is not None:
            out[b] += bias
    return out


def test_naive_references_equal_explicit_loops():
    key, value, E, F, b, U, W, B = (
        t.detach() for t in _args(1, (4, D_K), (4, D_V), (N, D_K), (N, D_V), (N,), (N, D_K),
                                  (N, D_V), (D_K, D_V))
    )  # fmt: skip
    idx = torch.tensor([[0, 3, 8], [3, 2, 1], [8, 0, 4], [5, 6, 3]])
    p = naive_selected_bilinear(idx, key, value, E, F, b)
    for s in range(4):
        for j in range(3):
            i = int(idx[s, j])
            want = float(E[i] @ key[s]) * float(F[i] @ value[s]) + float(b[i])
            assert abs(float(p[s, j]) - want) < 1e-12
    coef = torch.relu(p)
    x = key[:, :, None] * value[:, None, :]
    want = (x - _loop_recon(coef, idx, U, W, B)).pow(2).sum((1, 2))
    torch.testing.assert_close(naive_rank1_sq_error(key, value, coef, idx, U, W, B), want)
    c, err = naive_topk_factor_loss(key, value, idx, b, U, W, B, E, F)
    torch.testing.assert_close(c, coef)
    torch.testing.assert_close(err, want)


def test_rank1_sq_error_matches_reference_and_finite_differences():
    key, value, coef, u, w = _args(4, (3, D_K), (3, D_V), (3, 4), (7, D_K), (7, D_V))
    idx = torch.tensor([[0, 2, 5, 1], [3, 3, 6, 0], [6, 5, 4, 2]])  # an atom twice in row 1
    args = (key, value, coef, idx, u, w)
    assert torch.autograd.gradcheck(Rank1SqError.apply, args)
    inputs = [key, value, coef, u, w]
    weight = [torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)]
    fast = _value_and_grads(lambda: Rank1SqError.apply(*args), inputs, weight)
    ref = _value_and_grads(lambda: naive_rank1_sq_error(*args), inputs, weight)
    torch.testing.assert_close(fast[0], ref[0])
    for name, a, r in zip(("key", "value", "coef", "u", "w"), fast[1], ref[1], strict=True):
        torch.testing.assert_close(a, r, msg=name)


def test_rank1_sq_error_with_bias_matches_reference():
    key, value, coef, u, w, bias = _args(
        8, (2, 3, D_K), (2, 3, D_V), (2, 3, 4), (7, D_K), (7, D_V), (D_K, D_V)
    )
    idx = torch.randint(0, 7, (2, 3, 4), generator=torch.Generator().manual_seed(2))
    inputs = [key, value, coef, u, w, bias]
    weight = [torch.randn(2, 3, dtype=torch.float64)]
    fast = _value_and_grads(
        lambda: rank1_sq_error(key, value, coef, idx, u, w, bias), inputs, weight
    )

    def ref():
        flat = (t.reshape(6, -1) for t in (key, value, coef))
        return naive_rank1_sq_error(*flat, idx.reshape(6, -1), u, w, bias).reshape(2, 3)

    ref_out = _value_and_grads(ref, inputs, weight)
    torch.testing.assert_close(fast[0], ref_out[0])
    for i, (a, r) in enumerate(zip(fast[1], ref_out[1], strict=True)):
        torch.testing.assert_close(a, r, msg=f"input {i}")


def test_selected_bilinear_matches_reference():
    """Values and the gradient of every input (tables, bias, and the key and value themselves,
    e.g. for attribution), with atoms repeated across rows."""
    key, value, E, F, b = _args(7, (4, D_K), (4, D_V), (N, D_K), (N, D_V), (N,))
    idx = torch.tensor([[0, 3, 8], [3, 2, 1], [8, 0, 4], [5, 6, 3]])
    weight = [torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)]
    with torch.no_grad():
        pk, pv = key @ E.T, value @ F.T
    inputs = [key, value, E, F, b]
    fast = _value_and_grads(
        lambda: SelectedBilinear.apply(idx, pk, pv, key, value, E, F, b), inputs, weight
    )
    ref = _value_and_grads(
        lambda: naive_selected_bilinear(idx, key, value, E, F, b), inputs, weight
    )
    torch.testing.assert_close(fast[0], ref[0])
    for name, a, r in zip(("key", "value", "E", "F", "b"), fast[1], ref[1], strict=True):
        torch.testing.assert_close(a, r, msg=name)
        assert r.abs().max() > 1e-3, name


@pytest.mark.parametrize("bias", [True, False])
def test_topk_factor_loss_matches_reference(bias):
    """The one-function TopK training loss (codes and squared error, one hand-written backward)
    against the reference, for every input, with a gradient arriving on the codes as well as on
    the error, and both ReLU branches among the selected atoms."""
    B, m = 6, 8
    key, value, E, F, b_enc, U, W, b_dec = _args(
        11, (B, D_K), (B, D_V), (N, D_K), (N, D_V), (N,), (N, D_K), (N, D_V), (D_K, D_V)
    )
    b_dec = b_dec if bias else None
    with torch.no_grad():
        b_enc -= 4.0  # so that some selected pre-activations are negative (ReLU gives 0)
        pk, pv = key @ E.T, value @ F.T
        idx = (pk * pv + b_enc).topk(m, dim=-1).indices
    assert len(idx.unique()) < idx.numel()  # some atom is chosen by several samples
    inputs = [t for t in (key, value, b_enc, U, W, b_dec, E, F) if t is not None]
    g = torch.Generator().manual_seed(12)
    weights = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((B, m), (B,))]
    fast = _value_and_grads(
        lambda: TopKFactorLoss.apply(key, value, idx, pk, pv, b_enc, U, W, b_dec, E, F),
        inputs,
        weights,
    )
    ref = _value_and_grads(
        lambda: naive_topk_factor_loss(key, value, idx, b_enc, U, W, b_dec, E, F), inputs, weights
    )
    c = ref[0][0]
    assert int((c == 0).sum()) > 0 and int((c > 0).sum()) > 0
    for a, r in zip(fast[0], ref[0], strict=True):
        torch.testing.assert_close(a, r)
    for i, (a, r) in enumerate(zip(fast[1], ref[1], strict=True)):
        torch.testing.assert_close(a, r, msg=f"input {i}")
        assert r.abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_selection_sums_equal_loops(dtype):
    """The sorted-atom sparse sums against explicit loops, with an atom repeated within a row
    (bfloat16: torch's sparse kernels do not take it, the sums run in float32)."""
    g = torch.Generator().manual_seed(5)
    idx = torch.tensor([[0, 2, 5, 1], [3, 3, 6, 0], [6, 5, 4, 2]])
    n, (B, m), d = 8, idx.shape, 3
    coef = torch.randn(B, m, generator=g).to(dtype)
    x = torch.randn(B, d, generator=g).to(dtype)
    rows_ = torch.randn(B, m + 2, d, generator=g).to(dtype)  # atoms' rows: the last m of each
    want_sample, want_slot = torch.zeros(n, d, dtype=dtype), torch.zeros(n, d, dtype=dtype)
    want_atom = torch.zeros(n, dtype=dtype)
    for b in range(B):
        for j in range(m):
            want_sample[idx[b, j]] += coef[b, j] * x[b]
            want_slot[idx[b, j]] += rows_[b, 2 + j]
            want_atom[idx[b, j]] += coef[b, j]
    sel = Selection(idx, n)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    for name in ("", "scratch"):  # fresh memory, and the reused memory of a training step
        got = sel.per_sample(coef, x, name), sel.per_slot(rows_, name), sel.per_atom(coef)
        for a, want in zip(got, (want_sample, want_slot, want_atom), strict=True):
            assert a.dtype == dtype
            torch.testing.assert_close(a, want, **tol)
