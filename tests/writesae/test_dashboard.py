"""The atom dashboard's numbers against independent recomputations on the shipped tiny Qwen3.5
model: codes from `sae.encode` on one full cache, brute-force float64 matrices for the variance
share, explicit delta-rule transitions for the memory, and the first-order value effect by
reverse-over-reverse automatic differentiation (`torch.autograd.functional.jvp`), where the
dashboard uses forward mode from the carried state."""

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.pretrained import sample_text
from writesae import WriteSAE, WriteSAEConfig
from writesae.dashboards import DashboardConfig, dashboard, load_data

LAYER, HEAD = 1, 2  # a layer with an attention and a recurrent layer after it
CFG = DashboardConfig(n_contexts=6, batch_tokens=500, memory_lags=(1, 4, 16), memory_starts=5)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    model = HookedRecurrentModel.from_pretrained("tiny-qwen3.5-shakespeare").eval()
    ids = model.to_tokens(sample_text("heldout"))[0]
    tokens = ids[: 16 * 40].view(16, 40)
    cfg = WriteSAEConfig(
        d_k=model.cfg.d_k,
        d_v=model.cfg.d_v,
        n_atoms=40,
        k=5,
        hook_name=f"blocks.{LAYER}.attn.hook_state",
        head=HEAD,
    )
    sae = WriteSAE(cfg, seed=3)
    out = tmp_path_factory.mktemp("dash")
    dashboard(sae, model, tokens, out, win_rates={0: 0.625}, config=CFG)
    return model, sae, tokens, load_data(out)


def _cache(model, tokens):
    """The SAE's cell at every position: {"state", "q", "k", "decay", "beta"}, head selected."""
    short = ("state", "q", "k", "decay", "beta")
    names = [f"blocks.{LAYER}.attn.hook_{n}" for n in short]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return {n: cache[full][:, :, HEAD] for n, full in zip(short, names, strict=True)}


def _five_atoms(data):
    alive = [a["atom"] for a in data["atoms"] if not a["dead"]]
    return np.random.default_rng(0).choice(alive, 5, replace=False).tolist()


def test_firing_statistics_and_contexts_equal_a_recomputation(built):
    model, sae, tokens, data = built
    c = _cache(model, tokens)
    with torch.no_grad():
        codes = sae.encode(c["state"])  # [seq, pos, n]: the whole corpus in one call
    T = tokens.shape[1]
    for a in _five_atoms(data):
        rec = data["atoms"][a]
        col = codes[..., a].double()
        nz = col[col != 0].numpy()
        assert rec["fire_rate"] == pytest.approx(len(nz) / col.numel(), rel=1e-4)
        assert rec["mean_act"] == pytest.approx(nz.mean(), rel=1e-4)
        hist, _ = np.histogram(nz, bins=CFG.bins, range=(0.0, nz.max()))
        assert rec["hist"] == hist.tolist()
        vals, flat = col.flatten().topk(CFG.n_contexts)
        sites = flat[: CFG.value_contexts].tolist()
        assert rec["value_sites"] == [list(divmod(f, T)) for f in sites]
        for ctx, v, f in zip(rec["contexts"], vals.tolist(), flat.tolist(), strict=True):
            row, t = divmod(f, T)
            assert (ctx["row"], ctx["pos"]) == (row, t)
            assert ctx["act"] == pytest.approx(v, rel=1e-4)
            a0, b0 = max(0, t - CFG.left), min(T, t + CFG.right + 1)
            assert ctx["tokens"] == tokens[row, a0:b0].tolist()
            np.testing.assert_allclose(ctx["acts"], col[row, a0:b0].numpy(), rtol=1e-4, atol=1e-9)
        assert data["atoms"][0]["win_rate"] == 0.625


def test_variance_share_key_and_read_sides_equal_brute_force(built):
    model, sae, tokens, data = built
    c = _cache(model, tokens)
    with torch.no_grad():
        x = c["state"].double().flatten(0, 1)
        codes = sae.encode(c["state"]).double().flatten(0, 1)
        atoms = sae.W_dec.double()  # [n, d_k, d_v]
        resid = x - torch.einsum("ni,ikv->nkv", codes, atoms)
        tss = (x - x.mean(0)).pow(2).sum()
        assert data["meta"]["fve"] == pytest.approx(1 - float(resid.pow(2).sum() / tss), rel=1e-4)
        u = sae.key_factors.double()
        k = c["k"].double().flatten(0, 1)
        cos = (k / k.norm(dim=-1, keepdim=True)) @ (u / u.norm(dim=-1, keepdim=True)).T
        reads = c["q"].double().flatten(0, 1) @ u.T
        ids = tokens.flatten()
        for a in _five_atoms(data):
            rec = data["atoms"][a]
            without = resid + codes[:, a, None, None] * atoms[a]
            drop = float((without.pow(2).sum() - resid.pow(2).sum()) / tss)
            assert rec["fve_drop"] == pytest.approx(drop, rel=1e-3, abs=1e-7)
            for kt in rec["key_tokens"]:
                here = ids == kt["token"]
                assert kt["n"] == int(here.sum()) >= CFG.key_min_count
                assert kt["cos"] == pytest.approx(float(cos[here, a].mean()), rel=1e-4, abs=1e-6)
            best = max(
                float(cos[ids == t, a].mean())
                for t in ids.unique().tolist()
                if int((ids == t).sum()) >= CFG.key_min_count
            )
            assert rec["key_tokens"][0]["cos"] == pytest.approx(best, rel=1e-4, abs=1e-6)
            top = reads[:, a].abs().topk(CFG.n_reads)
            got = [r["value"] for r in rec["reads"]]
            np.testing.assert_allclose(got, reads[top.indices, a].numpy(), rtol=1e-4)


def test_memory_equals_explicit_delta_rule_products(built):
    model, sae, tokens, data = built
    c = _cache(model, tokens)
    with torch.no_grad():
        codes = sae.encode(c["state"])
    T = tokens.shape[1]
    alpha, beta, k = c["decay"].double(), c["beta"].double(), c["k"].double()
    for a in _five_atoms(data):
        u = sae.key_factors[a].detach().double()
        u = u / u.norm()
        col = codes[..., a]
        for j, lag in enumerate(CFG.memory_lags):
            cand = [(float(col[r, t]), r, t) for r, t in col.nonzero().tolist() if t + lag < T]
            cand = sorted(cand, reverse=True)[: CFG.memory_starts]
            decay_only, exact = [], []
            for _, r, t in cand:
                g, p = u.clone(), u.clone()
                for s in range(t + 1, t + lag + 1):
                    g = alpha[r, s] * g
                    p = alpha[r, s] * (p - beta[r, s] * k[r, s] * (k[r, s] @ p))
                decay_only.append(float(g.norm()))
                exact.append(float(p.norm()))
            mem = data["atoms"][a]["memory"]
            assert mem["n"][j] == len(cand)
            assert mem["decay"][j] == pytest.approx(np.mean(decay_only), rel=1e-4)
            assert mem["exact"][j] == pytest.approx(np.mean(exact), rel=1e-4)


def test_promoted_tokens_are_the_top_of_the_first_order_logit_effect(built):
    model, sae, tokens, data = built
    name = f"blocks.{LAYER}.attn.hook_read"
    W_O = model.blocks[LAYER].attn.W_out.weight.detach().double()[:, HEAD * 32 : (HEAD + 1) * 32]
    W_U = model.unembed.weight.detach().double()
    for a in _five_atoms(data):
        rec = data["atoms"][a]
        w = sae.value_factors[a].detach().float()
        effects = []
        for row, t in rec["value_sites"]:
            seq = tokens[row : row + 1, : t + 1]

            def logits_at_t(delta, seq=seq, t=t):
                def add(o, hook):
                    o = o.clone()
                    o[0, t, HEAD] = o[0, t, HEAD] + delta
                    return o

                return model.run_with_hooks(seq, fwd_hooks=[(name, add)])[0, t]

            with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel has no double backward
                _, jw = torch.autograd.functional.jvp(logits_at_t, torch.zeros(32), w)
            effects.append(jw.double())
        effect = torch.stack(effects).mean(0)
        want = effect.topk(CFG.n_tokens).indices.tolist()
        assert [p["token"] for p in rec["promoted"]] == want
        np.testing.assert_allclose(
            [p["value"] for p in rec["promoted"]], effect[want].numpy(), rtol=1e-3
        )
        low = effect.topk(CFG.n_tokens, largest=False).indices.tolist()
        assert [p["token"] for p in rec["suppressed"]] == low
        direct = (W_U @ (W_O @ w.double())).detach()
        top = direct.topk(CFG.n_tokens).indices.tolist()
        assert [p["token"] for p in rec["direct_promoted"]] == top
        np.testing.assert_allclose(
            [p["value"] for p in rec["direct_promoted"]], direct[top].numpy(), rtol=1e-4
        )


def test_bad_input_is_a_clear_error(built, tmp_path):
    model, sae, tokens, _ = built
    # a TypeError from jaxtyping where the tests check annotations at run time, else ours
    with pytest.raises((ValueError, TypeError), match="tokens|integer tensor"):
        dashboard(sae, model, tokens.float(), tmp_path)
    with pytest.raises(TypeError, match="sae|rank-1 WriteSAE"):
        dashboard(object(), model, tokens, tmp_path)
    with pytest.raises(ValueError, match="n_contexts"):
        DashboardConfig(n_contexts=0)
