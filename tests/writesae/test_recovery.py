"""Planted-dictionary recovery through a gated delta recurrence."""

from __future__ import annotations

import torch

import writesae
from writesae import FlatSAE, TensorSource, WriteSAE, WriteSAEConfig

D, N_TRUE, N_SEQ, T, BURN_IN = 16, 32, 64, 128, 16


def planted_states(seed: int = 0):
    """States of S_t = alpha_t (I - beta_t k k^T) S_{t-1} + beta_t k v^T, k = u_i, v = c w_i.

    Each step writes one planted atom u_i w_i^T (i uniform, c ~ U[0.5, 1.5]); alpha ~ U[0.3, 0.6]
    and beta ~ U[0.5, 1] make S_t a decaying sparse mix of atoms plus the delta rule's erasures.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(N_TRUE, D, generator=g), dim=1)
    w = torch.nn.functional.normalize(torch.randn(N_TRUE, D, generator=g), dim=1)
    s = torch.zeros(N_SEQ, D, D)
    out = []
    for t in range(T):
        i = torch.randint(N_TRUE, (N_SEQ,), generator=g)
        c = 0.5 + torch.rand(N_SEQ, generator=g)
        alpha = (0.3 + 0.3 * torch.rand(N_SEQ, generator=g))[:, None, None]
        beta = (0.5 + 0.5 * torch.rand(N_SEQ, generator=g))[:, None, None]
        k, v = u[i], c[:, None] * w[i]
        s = (
            alpha * (s - beta * k[:, :, None] * (k[:, None, :] @ s))
            + beta * k[:, :, None] * v[:, None, :]
        )
        if t >= BURN_IN:
            out.append(s.clone())
    return torch.cat(out), u, w


def mean_best_cosine(sae, u, w) -> float:
    """Mean over planted atoms of the best |cosine| between flattened atoms (brute force)."""
    planted = (u[:, :, None] * w[:, None, :]).flatten(1)
    learned = sae.atom_matrices(torch.arange(sae.cfg.n_atoms)).detach().flatten(1)
    best = []
    for p in planted:
        cos = [abs(float(p @ a / (p.norm() * a.norm()))) for a in learned]
        best.append(max(cos))
    return sum(best) / len(best)


def recovery() -> dict:
    """Train a WriteSAE and a FlatSAE of (nearly) equal parameter count on the planted states;
    return both, their training metrics, the mean best |cosine| and both FVEs (recomputed here
    on all samples)."""
    torch.manual_seed(0)
    # the matrices are 16 x 16: one thread is faster than two that wait on each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run()
    finally:
        torch.set_num_threads(threads)


def _run() -> dict:
    x, u, w = planted_states()
    train_kw = dict(
        n_steps=600,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=50,
        dead_steps=50,
        resample_every=150,
        log_every=150,
        progress=False,
    )
    cfg = WriteSAEConfig(
        d_k=D, d_v=D, n_atoms=2 * N_TRUE, k=4, hook_name="blocks.0.attn.hook_state", head=0
    )
    sae = WriteSAE(cfg, seed=1)
    m = writesae.train(sae, TensorSource(x, batch_size=256, seed=0), **train_kw)
    flat_n = FlatSAE.matched_n_atoms(cfg)
    flat = FlatSAE(
        WriteSAEConfig(
            d_k=D,
            d_v=D,
            n_atoms=flat_n,
            k=min(4, flat_n),
            hook_name=cfg.hook_name,
            head=0,
            kind="flat",
        ),
        seed=1,
    )
    mf = writesae.train(flat, TensorSource(x, batch_size=256, seed=0), **train_kw)

    # fraction of variance explained on all samples, computed here from scratch
    def fve(model):
        with torch.no_grad():
            err = (x - model(x)).pow(2).sum()
        return float(1 - err / (x - x.mean(0)).pow(2).sum())

    return dict(
        sae=sae, flat=flat, metrics=m, flat_metrics=mf, cosine=mean_best_cosine(sae, u, w),
        fve=fve(sae), flat_fve=fve(flat),
    )  # fmt: skip


def test_planted_dictionary_recovery_and_flat_baseline():
    r = recovery()
    sae, flat = r["sae"], r["flat"]
    assert r["cosine"] >= 0.9, r["cosine"]
    # equal parameter count (within one FlatSAE atom's worth)
    assert abs(flat.n_parameters - sae.n_parameters) <= 2 * D * D + 1
    f_write, f_flat = r["fve"], r["flat_fve"]
    assert f_write > 0.95 and f_write > f_flat + 0.2, (f_write, f_flat)
    assert abs(f_write - r["metrics"].fve[-1]) < 0.05
    assert abs(f_flat - r["flat_metrics"].fve[-1]) < 0.05
    # every decoder atom has unit Frobenius norm after training
    norms = sae.atom_matrices(torch.arange(sae.cfg.n_atoms)).detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
