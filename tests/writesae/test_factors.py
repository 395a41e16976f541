"""Write input from factors equals the materialised d_k x d_v computation."""

from __future__ import annotations

import pytest
import torch

import writesae
from writesae import TrainConfig, WriteSAE, WriteSAEConfig
from writesae.activations import WriteFactors
from writesae.train import training_step_loss

D_K, D_V, N = 7, 5, 24


def make(
    encoder="bilinear", activation="topk", bias=True, seed=0, dtype_name="float64"
) -> WriteSAE:
    cfg = WriteSAEConfig(
        d_k=D_K,
        d_v=D_V,
        n_atoms=N,
        k=4,
        hook_name="blocks.0.attn.hook_write",
        head=0,
        encoder=encoder,
        activation=activation,
        decoder_bias=bias,
        input_kind="write",
        dtype=dtype_name,
    )
    sae = WriteSAE(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():  # untie encoder from decoder and give the biases values
            if p is not sae.W_dec_key and p is not sae.W_dec_value:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return sae


def factors(b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, D_K, generator=g, dtype=torch.float64)
    v = torch.randn(b, D_V, generator=g, dtype=torch.float64)
    return k, v


def brute_sq_error(sae, k, v, codes):
    """||k v^T - sum_i c_i u_i w_i^T - B||_F^2 by an explicit loop over atoms and entries."""
    out = []
    for s in range(k.shape[0]):
        recon = torch.zeros(D_K, D_V, dtype=torch.float64)
        for i in range(N):
            recon += codes[s, i] * torch.outer(sae.W_dec_key[i], sae.W_dec_value[i]).detach()
        if sae.b_dec is not None:
            recon += sae.b_dec.detach()
        out.append(float(((torch.outer(k[s], v[s]) - recon) ** 2).sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("encoder", ["bilinear", "dense"])
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_encode_and_loss_from_factors(encoder, activation, bias):
    sae = make(encoder, activation, bias)
    k, v = factors()
    x = k[:, :, None] * v[:, None, :]
    codes_f = sae.encode_factors(k, v)
    torch.testing.assert_close(codes_f, sae.encode(x), rtol=1e-5, atol=1e-5)
    assert int((codes_f != 0).sum()) > 0
    ref = brute_sq_error(sae, k, v, codes_f.detach())
    torch.testing.assert_close(sae.factor_sq_error(k, v).detach(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.sq_error(x).detach(), ref, rtol=1e-5, atol=1e-5)


def test_bilinear_pre_activation_is_frobenius_inner_product():
    sae = make()
    k, v = factors(4)
    x = torch.randn(4, D_K, D_V, dtype=torch.float64)
    filt = sae.W_enc_key[:, :, None] * sae.W_enc_value[:, None, :]  # e_i f_i^T
    ref = torch.einsum("bkv,nkv->bn", x, filt) + sae.b_enc
    torch.testing.assert_close(sae.pre_acts(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        sae.pre_acts_factors(k, v), torch.einsum("bk,bv,nkv->bn", k, v, filt) + sae.b_enc
    )


@pytest.mark.parametrize("encoder", ["bilinear", "dense"])
def test_training_loss_and_gradients_from_factors(encoder):
    """Main + AuxK loss and every parameter gradient agree between the two input paths."""
    k, v = factors(32, seed=3)
    x = k[:, :, None] * v[:, None, :]
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    cfg = TrainConfig(aux_coef=0.5, aux_k=5)
    results, grads = [], []
    for batch in (WriteFactors(k, v), x):
        sae = make(encoder)
        res = training_step_loss(sae, batch, dead, cfg)
        res.loss.backward()
        results.append(res)
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    assert float(results[0].aux.detach()) > 0
    torch.testing.assert_close(results[0].loss, results[1].loss, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(results[0].aux, results[1].aux, rtol=1e-5, atol=1e-8)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-8, msg=n)


def test_rank1_error_hand_written_backward_matches_finite_differences():
    from writesae.sae import _Rank1SqError

    g = torch.Generator().manual_seed(4)

    def arg(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)

    idx = torch.tensor([[0, 2, 5, 1], [3, 3, 6, 0], [6, 5, 4, 2]])  # an atom twice in row 1
    args = (arg(3, 5), arg(3, 6), arg(3, 4), idx, arg(7, 5), arg(7, 6))
    assert torch.autograd.gradcheck(_Rank1SqError.apply, args)
    # and the value is the brute-force squared error of k v^T - sum_j c_j u_j w_j^T
    key, value, coef, _, u, w = args
    recon = torch.einsum("bj,bjk,bjv->bkv", coef, u[idx], w[idx])
    brute = (key[:, :, None] * value[:, None, :] - recon).pow(2).sum((1, 2))
    torch.testing.assert_close(_Rank1SqError.apply(*args), brute)


def test_selected_bilinear_gradients_match_autograd_of_the_formula():
    """The hand-written backward of the selected encoder pre-activations, for every input
    (tables, bias, and the key and value themselves, e.g. for attribution), against autograd on
    p_bj = (k_b . e_j)(v_b . f_j) + b_j written out directly, with atoms repeated across rows."""
    from writesae.sae import _SelectedBilinear

    g = torch.Generator().manual_seed(7)

    def arg(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)

    key, value, E, F, b = arg(4, 5), arg(4, 6), arg(9, 5), arg(9, 6), arg(9)
    idx = torch.tensor([[0, 3, 8], [3, 2, 1], [8, 0, 4], [5, 6, 3]])
    weight = torch.randn(4, 3, generator=g, dtype=torch.float64)

    def grads(p):
        (p * weight).sum().backward()
        out = [t.grad.clone() for t in (key, value, E, F, b)]
        for t in (key, value, E, F, b):
            t.grad = None
        return p.detach(), out

    with torch.no_grad():
        pk, pv = key @ E.T, value @ F.T
    fast, fast_grads = grads(_SelectedBilinear.apply(idx, pk, pv, key, value, E, F, b))
    ref, ref_grads = grads(
        (E[idx] * key[:, None]).sum(-1) * (F[idx] * value[:, None]).sum(-1) + b[idx]
    )
    torch.testing.assert_close(fast, ref)
    for name, a, r in zip(("key", "value", "E", "F", "b"), fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, msg=name)
        assert r.abs().max() > 1e-3, name


@pytest.mark.parametrize("bias", [True, False])
def test_fused_topk_loss_gradients_match_autograd_of_the_formula(bias):
    """The one-function TopK training loss (codes and squared error, one hand-written backward)
    against autograd on the plain formula: p = (k.e)(v.f) + b, c = ReLU(p) on the TopK atoms,
    err = ||k v^T - sum_j c_j u_j w_j^T - B||^2, for every input, with a gradient arriving on the
    codes as well as on the error."""
    from writesae.sae import _TopKFactorLoss

    g = torch.Generator().manual_seed(11)

    def arg(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)

    B, m = 6, 8
    key, value = arg(B, D_K), arg(B, D_V)
    E, F, b_enc, U, W = arg(N, D_K), arg(N, D_V), arg(N), arg(N, D_K), arg(N, D_V)
    with torch.no_grad():
        b_enc -= 4.0  # so that some selected pre-activations are negative (ReLU gives 0)
    b_dec = arg(D_K, D_V) if bias else None
    with torch.no_grad():
        pk, pv = key @ E.T, value @ F.T
        idx = (pk * pv + b_enc).topk(m, dim=-1).indices
    assert len(idx.unique()) < idx.numel()  # some atom is chosen by several samples
    inputs = [t for t in (key, value, b_enc, U, W, b_dec, E, F) if t is not None]

    def fused():
        return _TopKFactorLoss.apply(key, value, idx, pk, pv, b_enc, U, W, b_dec, E, F)

    def formula():
        p = (E[idx] * key[:, None]).sum(-1) * (F[idx] * value[:, None]).sum(-1) + b_enc[idx]
        c = torch.relu(p)
        recon = torch.einsum("bj,bjk,bjv->bkv", c, U[idx], W[idx])
        if b_dec is not None:
            recon = recon + b_dec
        return c, (key[:, :, None] * value[:, None, :] - recon).pow(2).sum((1, 2))

    w_c = torch.randn(B, m, generator=g, dtype=torch.float64)
    w_e = torch.randn(B, generator=g, dtype=torch.float64)

    def run(f):
        c, err = f()
        ((c * w_c).sum() + (err * w_e).sum()).backward()
        grads = [t.grad.clone() for t in inputs]
        for t in inputs:
            t.grad = None
        return c.detach(), err.detach(), grads

    c1, e1, g1 = run(fused)
    c2, e2, g2 = run(formula)
    assert int((c2 == 0).sum()) > 0 and int((c2 > 0).sum()) > 0  # both ReLU branches are tested
    torch.testing.assert_close(c1, c2)
    torch.testing.assert_close(e1, e2)
    for i, (a, r) in enumerate(zip(g1, g2, strict=True)):
        torch.testing.assert_close(a, r, msg=f"input {i}")
        assert r.abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_selection_sums_equal_loops(dtype):
    """The sorted-atom sparse sums against explicit loops, with an atom repeated within a row
    (bfloat16: torch's sparse kernels do not take it, the sums run in float32)."""
    from writesae.sae import _Selection

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
    sel = _Selection(idx, n)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    for name in ("", "scratch"):  # fresh memory, and the reused memory of a training step
        got = sel.per_sample(coef, x, name), sel.per_slot(rows_, name), sel.per_atom(coef)
        for a, want in zip(got, (want_sample, want_slot, want_atom), strict=True):
            assert a.dtype == dtype
            torch.testing.assert_close(a, want, **tol)


def test_half_precision_training_from_factors():
    """bfloat16 trains from factors like float32 (its sparse sums fall back to float32); float16,
    whose Adam steps underflow to NaN, is refused with a message that says so; a NaN loss stops
    training with the step number instead of failing later in resampling."""
    k, v = factors(256, seed=4)
    src = [(k[i : i + 32].float(), v[i : i + 32].float()) for i in range(0, 256, 32)]
    fve = {}
    for dtype_name in ("float32", "bfloat16"):
        cfg = WriteSAEConfig(
            d_k=D_K, d_v=D_V, n_atoms=N, k=4, hook_name="blocks.0.attn.hook_write", head=0,
            input_kind="write", dtype=dtype_name,
        )  # fmt: skip
        kw = dict(n_steps=80, lr=1e-2, warmup_steps=5, log_every=20, progress=False)
        fve[dtype_name] = writesae.train(WriteSAE(cfg, seed=0), src, **kw).fve
    assert fve["float32"][-1] > fve["float32"][0] + 0.05  # it learns
    assert max(abs(a - b) for a, b in zip(fve["float32"], fve["bfloat16"], strict=True)) < 0.02
    with pytest.raises(ValueError, match="bfloat16"):
        writesae.train(make(dtype_name="float16"), src, n_steps=2, progress=False)
    bad = [(k[:16].float() * float("nan"), v[:16].float())]
    with pytest.raises(FloatingPointError, match="step 0"):
        writesae.train(make(), bad, n_steps=2, progress=False)


def test_reused_memory_is_never_overwritten_while_in_use():
    """Two training losses built before either backward pass (so both keep their gathered rows
    alive) give the same gradients as the two computed one after the other."""
    sae = make()
    batches = [factors(16, seed=s) for s in (1, 2)]
    separate = []
    for k, v in batches:
        _, err = sae.factor_loss(k, v)
        err.sum().backward()
        separate.append({n: p.grad.clone() for n, p in sae.named_parameters()})
        sae.zero_grad()
    errs = [sae.factor_loss(k, v)[1] for k, v in batches]
    (errs[0].sum() + errs[1].sum()).backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, separate[0][n] + separate[1][n], msg=n)
    # gradients the caller still holds after zero_grad are not overwritten by the next step
    held = {n: p.grad for n, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    sae.factor_loss(*batches[0])[1].sum().backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(held[n], separate[0][n] + separate[1][n], msg=n)
        torch.testing.assert_close(p.grad, separate[0][n], msg=n)
