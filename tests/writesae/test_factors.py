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
