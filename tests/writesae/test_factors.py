"""Write input from factors equals the materialised d_k x d_v computation."""

from __future__ import annotations

import pytest
import torch

from writesae import TrainConfig, WriteSAE, WriteSAEConfig
from writesae.activations import WriteFactors
from writesae.train import training_step_loss

D_K, D_V, N = 7, 5, 24


def make(encoder="bilinear", activation="topk", bias=True, seed=0) -> WriteSAE:
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
        dtype="float64",
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
