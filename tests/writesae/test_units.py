"""Sparsifiers, schedule, parameter counts, resampling and config help against references."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from writesae import FlatSAE, TrainConfig, WriteSAE, WriteSAEConfig, field_help, lr_at
from writesae.activations import WriteFactors
from writesae.train import resample_dead, training_step_loss


def cfg(**kw):
    base = dict(d_k=5, d_v=4, n_atoms=10, k=3, hook_name="blocks.0.attn.hook_state", head=0)
    base.update(kw)
    return WriteSAEConfig(**base)


def test_topk_and_batchtopk_match_brute_force():
    pre = torch.randn(6, 10, dtype=torch.float64)
    sae = WriteSAE(cfg(dtype="float64"))
    codes = sae.sparsify(pre).codes
    for s in range(6):
        keep = sorted(range(10), key=lambda i: -float(pre[s, i]))[:3]
        ref = [max(float(pre[s, i]), 0.0) if i in keep else 0.0 for i in range(10)]
        assert codes[s].tolist() == ref
    sae = WriteSAE(cfg(activation="batchtopk", dtype="float64"))
    codes = sae.sparsify(pre).codes
    flat = sorted(pre.flatten().tolist(), reverse=True)
    thresh = flat[3 * 6 - 1]  # the (k * B)-th largest value
    ref = torch.where((pre >= thresh) & (pre > 0), pre, torch.zeros_like(pre))
    assert torch.equal(codes, ref)
    assert int((codes != 0).sum()) <= 18
    relu = WriteSAE(cfg(activation="relu", dtype="float64")).sparsify(pre).codes
    assert torch.equal(relu, pre.clamp_min(0))


def test_decode_equals_sum_of_scaled_atoms():
    sae = WriteSAE(cfg(dtype="float64"), seed=2)
    with torch.no_grad():
        sae.b_dec.normal_()
    codes = torch.zeros(2, 10, dtype=torch.float64)
    codes[0, 1], codes[0, 7], codes[1, 4] = 0.5, -2.0, 3.0
    ref = (
        torch.stack(
            [
                0.5 * torch.outer(sae.W_dec_key[1], sae.W_dec_value[1])
                - 2.0 * torch.outer(sae.W_dec_key[7], sae.W_dec_value[7]),
                3.0 * torch.outer(sae.W_dec_key[4], sae.W_dec_value[4]),
            ]
        )
        + sae.b_dec
    )
    torch.testing.assert_close(sae.decode(codes), ref.detach())
    assert sae.key_factors.shape == (10, 5) and sae.value_factors.shape == (10, 4)
    norms = sae.atom_matrices(torch.arange(10)).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(10, dtype=torch.float64))


def test_lr_schedule_values():
    tc = TrainConfig(n_steps=1050, lr=3e-4, min_lr=3e-5, warmup_steps=50)
    assert lr_at(0, tc) == 0.0
    assert lr_at(25, tc) == pytest.approx(1.5e-4)
    assert lr_at(50, tc) == pytest.approx(3e-4)
    assert lr_at(550, tc) == pytest.approx((3e-4 + 3e-5) / 2)
    assert lr_at(1050, tc) == pytest.approx(3e-5)
    assert lr_at(300, tc) == pytest.approx(3e-5 + 2.7e-4 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_parameter_counts_match_paper_formulas():
    # method file section 2.2: param-matched control at d_k = d_v = 128
    w = WriteSAE(
        WriteSAEConfig(
            d_k=128, d_v=128, n_atoms=16384, k=32, hook_name="blocks.9.attn.hook_state", head=4
        )
    )
    f = FlatSAE(
        WriteSAEConfig(
            d_k=128,
            d_v=128,
            n_atoms=256,
            k=32,
            hook_name="blocks.9.attn.hook_state",
            head=4,
            kind="flat",
        )
    )
    assert w.n_parameters == 8_421_376
    assert f.n_parameters == 8_405_248
    assert FlatSAE.matched_n_atoms(w.cfg) == 256  # the paper's param-matched control


def test_resampling_uses_top_singular_pair_and_resets_adam():
    sae = WriteSAE(cfg(dtype="float64"), seed=0)
    opt = torch.optim.Adam(sae.parameters())
    x = torch.randn(8, 5, 4, dtype=torch.float64)
    res = training_step_loss(sae, x, None, TrainConfig())
    res.loss.backward()
    opt.step()
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[2, 6]] = True
    err = torch.zeros(8, dtype=torch.float64)
    err[5] = 1.0  # all probability on sample 5
    before = sae.W_dec_key.detach().clone()
    n = resample_dead(sae, opt, x, err, dead, TrainConfig(), torch.Generator().manual_seed(0))
    assert n == 2
    u, s, vh = torch.linalg.svd(x[5])
    for i in (2, 6):
        atom = torch.outer(sae.W_dec_key[i], sae.W_dec_value[i]).detach()
        torch.testing.assert_close(atom, torch.outer(u[:, 0], vh[0]))
        assert float(sae.b_enc.detach()[i]) == 0.0
        assert float(opt.state[sae.W_dec_key]["exp_avg"][i].abs().sum()) == 0.0
        assert float(opt.state[sae.W_enc_value]["exp_avg_sq"][i].abs().sum()) == 0.0
    alive = ~dead
    assert torch.equal(sae.W_dec_key.detach()[alive], before[alive])
    mean_norm = sae.W_enc_key.detach()[alive].norm(dim=1).mean()
    torch.testing.assert_close(sae.W_enc_key[2].norm().detach(), 0.2 * mean_norm)
    # from write factors the singular pair is (k/|k|, v/|v|), no SVD needed
    k, v = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    resample_dead(sae, opt, WriteFactors(k, v), err, dead, TrainConfig(), torch.Generator())
    torch.testing.assert_close(sae.W_dec_key[6].detach(), k[5] / k[5].norm())


def test_config_help_and_validation():
    helps = field_help(WriteSAEConfig)
    assert set(helps) == {f.name for f in dataclasses.fields(WriteSAEConfig)}
    assert all(len(h) > 10 for h in helps.values())
    assert all(len(h) > 10 for h in field_help(TrainConfig).values())
    with pytest.raises(ValueError, match="encoder='conv'"):
        cfg(encoder="conv")
    with pytest.raises(ValueError, match="hook_name"):
        cfg(hook_name="blocks.0.attn.hook_q")
    with pytest.raises(ValueError, match="k=11 exceeds n_atoms=10"):
        cfg(k=11)
    assert cfg(hook_name="blocks.7.attn.hook_state").write_hook_name == "blocks.7.attn.hook_write"
