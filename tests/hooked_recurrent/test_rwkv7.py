"""RWKV-7: parity with the `rwkv` package, the fla-hub layout, exact edit propagation, generation.

The references are independent of the package under test: the `rwkv` pip package (BlinkDL's own
CPU implementation, RWKV_V7_ON=1, "cpu fp32") on tiny random BlinkDL `.pth` files, and
`reference_forward` below, a token-by-token float64 transcription of BlinkDL's equations in
BlinkDL's own state orientation ([V, K]) with a callback at every hookable quantity.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.components.rwkv7 import chunk_dplr_rule, kappa_normalize
from hooked_recurrent.pretrained.rwkv7 import WorldTokenizer, blinkdl_to_fla, to_fla_state_dict
from hooked_recurrent.recurrence import Transition, scan
from tests.hooked_recurrent.rwkv_helpers import RWKV_CONFIGS, rwkv_package_model, write_blinkdl

N = 64  # head size


@pytest.fixture(scope="module", params=sorted(RWKV_CONFIGS))
def tiny(request, tmp_path_factory):
    """(name, .pth path, BlinkDL state dict, rwkv package model, our model)."""
    path, sd = write_blinkdl(tmp_path_factory.mktemp("rwkv7"), request.param, seed=1)
    ref = rwkv_package_model(path)
    ours = HookedRecurrentModel.from_pretrained(str(path)).eval()
    return request.param, path, sd, ref, ours


@pytest.fixture(scope="module")
def c128(tmp_path_factory):
    path, sd = write_blinkdl(tmp_path_factory.mktemp("rwkv7_c128"), "c128", seed=2)
    return path, sd, HookedRecurrentModel.from_pretrained(str(path)).eval()


def _tokens(vocab: int, T: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- independent reference
def reference_forward(sd: dict, tokens: list[int], edit=None) -> torch.Tensor:
    """Token-by-token RWKV-7 in float64 from BlinkDL weights; logits [T, vocab].

    `edit(layer, name, t, x) -> x` is called on r ("hook_q"), a, kappa, k (after its update), v
    (after the value residual), exp(w) ("hook_decay") as [H, N]; on the write k v^T and the state
    S_t in the shared [H, K, V] orientation; and on the read S_t^T r. Layer 0's (edited) v is
    v_first. The state is kept as BlinkDL keeps it, [H, V, K].
    """
    z = {k: v.double() for k, v in sd.items()}
    C = z["emb.weight"].shape[1]
    H = C // N
    L = 1 + max(int(k.split(".")[1]) for k in z if k.startswith("blocks."))

    def E(i, name, t, x):
        return x if edit is None else edit(i, name, t, x)

    def ln(x, p):
        return F.layer_norm(x, (C,), z[p + ".weight"], z[p + ".bias"], 1e-5)

    def vec(name):
        return z[name].reshape(-1)

    att_prev = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    ffn_prev = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    S = [torch.zeros(H, N, N, dtype=torch.float64) for _ in range(L)]
    S_nat = [torch.zeros(H, N, N, dtype=torch.float64) for _ in range(L)]
    logits = []
    for t, tok in enumerate(tokens):
        x = ln(z["emb.weight"][tok], "blocks.0.ln0")
        v_first = None
        for i in range(L):
            p = f"blocks.{i}.att."
            h = ln(x, f"blocks.{i}.ln1")
            d = att_prev[i] - h
            att_prev[i] = h
            xr, xw, xk, xv, xa, xg = (h + d * vec(p + "x_" + c) for c in "rwkvag")
            r = z[p + "receptance.weight"] @ xr
            k = z[p + "key.weight"] @ xk
            v = z[p + "value.weight"] @ xv
            w = -math.exp(-0.5) * torch.sigmoid(
                vec(p + "w0") + torch.tanh(xw @ z[p + "w1"]) @ z[p + "w2"]
            )
            a = torch.sigmoid(vec(p + "a0") + (xa @ z[p + "a1"]) @ z[p + "a2"])
            g = torch.sigmoid(xg @ z[p + "g1"]) @ z[p + "g2"]
            if i > 0:
                v = v + (v_first - v) * torch.sigmoid(
                    vec(p + "v0") + (xv @ z[p + "v1"]) @ z[p + "v2"]
                )
            r = E(i, "hook_q", t, r.view(H, N))
            a = E(i, "hook_a", t, a.view(H, N))
            kk = E(i, "hook_kappa", t, F.normalize((k * vec(p + "k_k")).view(H, N), dim=-1))
            k = E(i, "hook_k", t, k.view(H, N) * (1 + (a - 1) * vec(p + "k_a").view(H, N)))
            v = E(i, "hook_v", t, v.view(H, N))
            if i == 0:
                v_first = v.reshape(C)
            decay = E(i, "hook_decay", t, w.exp().view(H, N))
            write = E(i, "hook_write", t, k[:, :, None] * v[:, None, :])  # [H, K, V]

            def step(s, decay=decay, kk=kk, a=a, write=write):  # [H, V, K]
                s = s * decay[:, None, :] - (s @ kk[:, :, None]) @ (a * kk)[:, None, :]
                return s + write.transpose(-1, -2)

            s, S_nat[i] = step(S[i]), step(S_nat[i])
            # hook_state is given the trajectory without state edits and assigns where it changes
            x_nat = S_nat[i].transpose(-1, -2)
            x_new = E(i, "hook_state", t, x_nat)
            assigned = (x_new != x_nat).flatten(1).any(-1)[:, None, None]
            s = torch.where(assigned, x_new.transpose(-1, -2), s)
            S[i] = s
            o = E(i, "hook_read", t, (s @ r[:, :, None])[..., 0])
            o = F.group_norm(o.reshape(1, C), H, z[p + "ln_x.weight"], z[p + "ln_x.bias"], 64e-5)
            o = o.view(H, N) + (r * k * z[p + "r_k"]).sum(-1, keepdim=True) * v
            x = x + z[p + "output.weight"] @ (o.reshape(C) * g)
            f = f"blocks.{i}.ffn."
            h2 = ln(x, f"blocks.{i}.ln2")
            d2 = ffn_prev[i] - h2
            ffn_prev[i] = h2
            kf = torch.relu(z[f + "key.weight"] @ (h2 + d2 * vec(f + "x_k"))) ** 2
            x = x + z[f + "value.weight"] @ kf
        logits.append(z["head.weight"] @ ln(x, "ln_out"))
    return torch.stack(logits)


# --------------------------------------------------------------------------- the chunked recurrence
@pytest.mark.parametrize(
    "B,T,H,K,V,chunk,with_S0",
    [
        (2, 37, 3, 16, 8, 16, True),
        (1, 64, 2, 64, 64, 16, False),
        (1, 1, 1, 4, 4, 16, True),
        (2, 5, 2, 8, 12, 16, True),
        (1, 50, 2, 32, 16, 7, True),
        (3, 48, 1, 64, 64, 32, False),
    ],
)
def test_chunk_matches_scan(B, T, H, K, V, chunk, with_S0):
    g = torch.Generator().manual_seed(B * 1000 + T)
    q, k = torch.randn(B, T, H, K, generator=g), 0.5 * torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    w = -math.exp(-0.5) * torch.rand(B, T, H, K, generator=g)
    a = torch.rand(B, T, H, K, generator=g)
    kappa = kappa_normalize(torch.randn(B, T, H, K, generator=g), fused=False)
    S0 = torch.randn(B, H, K, V, generator=g) if with_S0 else None
    tr = Transition(w.exp(), -(a * kappa), kappa)
    o_ref, S_ref, states_ref = scan(tr, q, k, v, S0, keep_states=True)
    W = torch.randn(B, T, H, K, V, generator=g) * (torch.rand(B, T, H, 1, 1, generator=g) < 0.3)
    o_w, S_w, states_w = scan(tr, q, None, None, S0, writes=W, keep_states=True)
    for dense in (False, True):
        o, S, states = chunk_dplr_rule(
            q,
            w,
            k,
            v,
            -(a * kappa),
            kappa,
            S0,
            chunk,
            writes=W if dense else None,
            keep_states=True,
        )
        refs = (o_w, S_w, states_w) if dense else (o_ref, S_ref, states_ref)
        for ours, ref in zip((o, S, states), refs, strict=True):
            assert (ours - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_chunk_strong_decay_falls_back_exactly():
    g = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 40, 2, 16, 16
    q, k, v = (torch.randn(B, T, H, d, generator=g) for d in (K, K, V))
    w = -math.exp(-0.5) * torch.rand(B, T, H, K, generator=g)
    w[0, 10, 1, 3] = -200.0  # an edited decay of e^-200
    w[0, 20, 0, 0] = float("-inf")  # an edited decay of exactly 0
    a, kappa = torch.rand(B, T, H, K, generator=g), F.normalize(torch.randn(B, T, H, K), dim=-1)
    o, S, _ = chunk_dplr_rule(q, w, k, v, -(a * kappa), kappa)
    o_ref, S_ref, _ = scan(Transition(w.exp(), -(a * kappa), kappa), q, k, v)
    assert torch.isfinite(o).all()
    assert torch.allclose(o, o_ref, atol=1e-5) and torch.allclose(S, S_ref, atol=1e-5)


def test_chunked_propagation_matches_step_by_step():
    """TimeMix.dense_propagation (chunked, dense writes) == the engine's stepped `propagate`."""
    from hooked_recurrent.components.rwkv7 import TimeMix
    from hooked_recurrent.recurrence import propagate

    g = torch.Generator().manual_seed(3)
    B, T, H, K, V = 2, 45, 3, 16, 16
    w = -math.exp(-0.5) * torch.rand(B, T, H, K, generator=g)
    a, kappa = torch.rand(B, T, H, K, generator=g), F.normalize(torch.randn(B, T, H, K), dim=-1)
    tr = Transition(w.exp(), -(a * kappa), kappa)
    q = torch.randn(B, T, H, K, generator=g)
    delta = torch.zeros(B, T, H, K, V)
    delta[0, 7, 1] = torch.randn(K, V, generator=g)
    delta[1, 20, 2] = torch.outer(torch.randn(K, generator=g), torch.randn(V, generator=g))
    delta[0, 33, 1] = torch.randn(K, V, generator=g)
    mixer = TimeMix(0, 64, 1, 64, 8, 8, 8, 8, chunk_size=16)
    d_o, E_T = mixer.dense_propagation(tr, q, delta)
    d_o_ref, E_T_ref = propagate(tr, q, delta)
    assert torch.equal(d_o[:, :7], torch.zeros_like(d_o[:, :7]))
    assert (d_o - d_o_ref).abs().max().item() <= 1e-5
    assert (E_T - E_T_ref).abs().max().item() <= 1e-5


def test_kappa_normalisations():
    x = torch.randn(3, 64)
    assert torch.allclose(kappa_normalize(x, False), x / x.norm(dim=-1, keepdim=True))
    assert torch.allclose(
        kappa_normalize(x, True), x / (x.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    )
    assert torch.equal(kappa_normalize(torch.zeros(2, 8), False), torch.zeros(2, 8))


# ------------------------------------------------------------------------- parity with the package
@torch.no_grad()
def package_parity(sd: dict, ref, ours) -> dict:
    """test_parity_with_rwkv_package: "logits", max |ours - package| over all 80 positions, and
    per layer the final "S" (package's [H, V, K] transposed), "shift" and "mlp_shift" differences
    to the state the package returns."""
    tokens = _tokens(sd["emb.weight"].shape[0], 80, seed=3)
    logits_ref, state_ref = ref.forward(tokens[0].tolist(), None, full_output=True)
    logits, state = ours(tokens, return_state=True)
    d = {"logits": (logits[0] - logits_ref).abs().max().item(), "S": [], "shift": []}
    d["mlp_shift"] = []
    for layer, st in enumerate(state.layers):
        S_ref = state_ref[3 * layer + 1].transpose(-1, -2)  # package: [H, V, K]
        d["S"].append((st["S"][0] - S_ref).abs().max().item())
        d["shift"].append((st["shift"][0] - state_ref[3 * layer]).abs().max().item())
        d["mlp_shift"].append((st["mlp_shift"][0] - state_ref[3 * layer + 2]).abs().max().item())
    return d


def test_parity_with_rwkv_package(tiny):
    name, path, sd, ref, ours = tiny
    d = package_parity(sd, ref, ours)
    assert d["logits"] <= 1e-4
    for key in ("S", "shift", "mlp_shift"):
        for layer, diff in enumerate(d[key]):
            assert diff <= 1e-5, (key, layer, diff)


@torch.no_grad()
def test_reference_forward_matches_package(tiny):
    """The test's own reference agrees with the package (so it can judge the edits below)."""
    name, path, sd, ref, ours = tiny
    tokens = _tokens(sd["emb.weight"].shape[0], 24, seed=4)[0].tolist()
    logits_ref, _ = ref.forward(tokens, None, full_output=True)
    assert (reference_forward(sd, tokens).float() - logits_ref).abs().max().item() <= 1e-4


@torch.no_grad()
def test_per_position_states_match_package_steps(tiny):
    name, path, sd, ref, ours = tiny
    T = 12
    tokens = _tokens(sd["emb.weight"].shape[0], T, seed=5)
    L = len(ours.blocks)
    names = [f"blocks.{i}.attn.hook_state" for i in range(L)]
    _, cache = ours.run_with_cache(tokens, names_filter=names)
    state = None
    for t in range(T):
        _, state = ref.forward([int(tokens[0, t])], state)
        for i in range(L):
            S_ref = state[3 * i + 1].transpose(-1, -2)
            assert (cache[names[i]][0, t] - S_ref).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- fla-hub layout
@torch.no_grad()
def load_fla_layout(sd: dict, ref, ours, folder: Path, fuse_norm: bool) -> tuple:
    """test_fla_layout_loads_with_same_logits: the BlinkDL weights converted to the fla-hub layout
    (config.json + model.safetensors) in `folder` and loaded; returns (model, fla state dict,
    max |logits - package| over 40 positions, logits torch.equal to the .pth load's)."""
    from safetensors.torch import save_file

    config, fla = blinkdl_to_fla(sd)
    config["fuse_norm"] = fuse_norm
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in fla.items()}, str(folder / "model.safetensors"))
    model = HookedRecurrentModel.from_pretrained(str(folder))
    tokens = _tokens(sd["emb.weight"].shape[0], 40, seed=6)
    logits_ref, _ = ref.forward(tokens[0].tolist(), None, full_output=True)
    logits = model(tokens)
    diff = (logits[0] - logits_ref).abs().max().item()
    return model, fla, diff, torch.equal(logits, ours(tokens))


@pytest.mark.parametrize("fuse_norm", [False, True])
def test_fla_layout_loads_with_same_logits(tiny, tmp_path, fuse_norm):
    name, path, sd, ref, ours = tiny
    model, fla, diff, same_as_pth = load_fla_layout(sd, ref, ours, tmp_path, fuse_norm)
    assert model.cfg.fuse_norm is fuse_norm
    assert diff <= 1e-4
    if not fuse_norm:
        assert same_as_pth
    back = to_fla_state_dict(model.state_dict(), model.cfg)
    assert back.keys() == fla.keys()
    assert all(torch.equal(back[k], fla[k]) for k in fla)


# --------------------------------------------------------------------------- edit propagation
def _edit_for(hook: str, kind: str, head: int, seed: int):
    """edit(x) for one position and head: x is [H, N] / [H, K, V] (reference) or the same slice."""
    g = torch.Generator().manual_seed(seed)
    if kind == "vec":
        delta = 0.5 * torch.randn(N, generator=g, dtype=torch.float64)
    elif kind == "rank1":
        delta = torch.outer(torch.randn(N, generator=g), torch.randn(N, generator=g)).double()
    else:
        delta = 0.2 * torch.randn(N, N, generator=g, dtype=torch.float64)

    def apply(x_head: torch.Tensor) -> torch.Tensor:
        if hook == "hook_decay":  # keep a decay in (0, 1)
            return x_head * torch.linspace(0.2, 0.9, N, dtype=x_head.dtype)
        if hook == "hook_a":
            return torch.rand(N, generator=torch.Generator().manual_seed(seed)).to(x_head.dtype)
        return x_head + delta.to(x_head.dtype)

    return apply


PROPAGATION_CASES = [
    ("hook_k", "vec", 1),
    ("hook_v", "vec", 1),
    ("hook_v", "vec", 0),  # layer 0: also changes v_first of every later layer
    ("hook_a", "vec", 1),
    ("hook_kappa", "vec", 2),
    ("hook_decay", "vec", 1),
    ("hook_write", "rank1", 1),
    ("hook_write", "dense", 2),
    ("hook_state", "rank1", 1),
    ("hook_state", "dense", 0),
]


@torch.no_grad()
def single_edit_result(sd: dict, model, hook: str, kind: str, layer: int) -> tuple:
    """test_edit_propagates_like_brute_force: one edit at (t=13, head 1) of blocks.{layer}.attn.
    {hook}; returns (max |logits - float64 reference|, logits before t bit-equal to the clean
    run, min over positions after t of max |logits - clean|)."""
    T, t, head = 40, 13, 1
    tokens = _tokens(sd["emb.weight"].shape[0], T, seed=7)
    apply = _edit_for(hook, kind, head, seed=11)

    def ref_edit(i, name, tt, x):
        if i == layer and name == hook and tt == t:
            x = x.clone()
            x[head] = apply(x[head])
        return x

    def our_edit(x, hook):
        x = x.clone()
        x[0, t, head] = apply(x[0, t, head])
        return x

    clean = model(tokens)
    edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.{hook}", our_edit)])
    expected = reference_forward(sd, tokens[0].tolist(), edit=ref_edit).float()
    diff = (edited[0] - expected).abs().max().item()
    earlier = torch.equal(edited[:, :t], clean[:, :t])
    return diff, earlier, (edited[:, t + 1 :] - clean[:, t + 1 :]).abs().amax(-1).min().item()


@pytest.mark.parametrize("hook,kind,layer", PROPAGATION_CASES)
def test_edit_propagates_like_brute_force(c128, hook, kind, layer):
    path, sd, model = c128
    diff, earlier, effect = single_edit_result(sd, model, hook, kind, layer)
    assert diff <= 1e-4
    assert earlier
    # the edit did reach the later tokens (the test is not vacuous)
    assert effect > 1e-4


#: (batch, position, head) triples: both heads and both batch rows, some pairs edited twice
MULTI_EDITS = {
    # span 7 < 16 (_STEP_SPAN): stepped from 13 to 20, then the chunked response from 21 on
    "span7": [(0, 13, 1), (1, 15, 0), (0, 20, 0), (1, 20, 1), (0, 20, 1)],
    # span 15: the longest that is still stepped
    "span15": [(0, 10, 1), (1, 25, 0)],
    # span 16: the shortest that goes to the dense chunked propagation
    "span16": [(0, 10, 1), (1, 26, 0)],
    # span 33: dense chunked propagation over several chunks of 16, pairs starting at different t
    "span33": [(1, 3, 1), (0, 12, 0), (1, 30, 1), (0, 36, 0), (0, 36, 1)],
}


@torch.no_grad()
def multi_edit_result(sd: dict, model, hook: str, case: str) -> tuple:
    """test_multi_position_edits_propagate_like_brute_force: additive edits at the triples of
    MULTI_EDITS[case] of blocks.1.attn.{hook}; returns, per batch row, (max |logits - float64
    reference|, logits before the row's first edit bit-equal to the clean run), and the min over
    positions after the last edited one of max |logits - clean|."""
    T, layer = 40, 1
    triples = MULTI_EDITS[case]
    tokens = _tokens(sd["emb.weight"].shape[0], T, seed=17, batch=2)
    g = torch.Generator().manual_seed(18)
    deltas = []
    for i in range(len(triples)):
        if i % 2:
            deltas.append(0.2 * torch.randn(N, N, generator=g))
        else:
            deltas.append(torch.outer(torch.randn(N, generator=g), torch.randn(N, generator=g)))

    def our_edit(x, hook):
        x = x.clone()
        for (b, t, h), d in zip(triples, deltas, strict=True):
            x[b, t, h] += d
        return x

    clean = model(tokens)
    edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.{hook}", our_edit)])
    diffs, earlier = [], []
    for row in range(2):

        def ref_edit(i, name, tt, x, row=row):
            if i != layer or name != hook:
                return x
            x = x.clone()
            for (b, t, h), d in zip(triples, deltas, strict=True):
                if b == row and t == tt:
                    x[h] += d.double()
            return x

        expected = reference_forward(sd, tokens[row].tolist(), edit=ref_edit).float()
        diffs.append((edited[row] - expected).abs().max().item())
        first = min(t for b, t, _ in triples if b == row)
        earlier.append(torch.equal(edited[row, :first], clean[row, :first]))
    t1 = max(t for _, t, _ in triples)
    effect = (edited[:, t1 + 1 :] - clean[:, t1 + 1 :]).abs().amax(-1).min().item()
    return diffs, earlier, effect


@pytest.mark.parametrize("hook", ["hook_write", "hook_state"])
@pytest.mark.parametrize("case", list(MULTI_EDITS))
def test_multi_position_edits_propagate_like_brute_force(c128, hook, case):
    """Additive edits at several (batch, pos, head) triples: stepped then the chunked response
    (span < 16) or the dense chunked propagation (span >= 16), against the float64 reference."""
    path, sd, model = c128
    diffs, earlier, effect = multi_edit_result(sd, model, hook, case)
    for row in range(2):
        assert diffs[row] <= 1e-4, row
        assert earlier[row], row
    assert effect > 1e-4


@pytest.mark.parametrize("hook", ["hook_write", "hook_state", "hook_k", "hook_decay"])
@torch.no_grad()
def test_in_place_edits_are_seen(c128, hook):
    """TransformerLens-style hooks edit in place and return the same tensor; that must count."""
    path, sd, model = c128
    tokens = _tokens(sd["emb.weight"].shape[0], 30, seed=14)

    def in_place(x, hook):
        x[:, 10, 1] *= 0.5
        return x

    def copied(x, hook):
        x = x.clone()
        x[:, 10, 1] *= 0.5
        return x

    name = f"blocks.1.attn.{hook}"
    a = model.run_with_hooks(tokens, fwd_hooks=[(name, in_place)])
    b = model.run_with_hooks(tokens, fwd_hooks=[(name, copied)])
    assert torch.equal(a, b)
    assert (a - model(tokens)).abs().max().item() > 1e-3


@torch.no_grad()
def test_cache_rebuilds_state_write_and_read(c128):
    """hook_state from the cached k, v, a, kappa, decay; hook_write = k v^T; hook_read = S^T r."""
    path, sd, model = c128
    tokens = _tokens(sd["emb.weight"].shape[0], 20, seed=8, batch=2)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.1.attn."))
    c = {n.split(".")[-1]: cache[n] for n in cache.keys()}
    assert torch.equal(c["hook_write"], c["hook_k"][..., :, None] * c["hook_v"][..., None, :])
    c = {name: x.double() for name, x in c.items()}
    S = torch.zeros_like(c["hook_state"][:, 0])
    for t in range(tokens.shape[1]):
        kap, a = c["hook_kappa"][:, t], c["hook_a"][:, t]
        S = c["hook_decay"][:, t, ..., None] * S - (a * kap)[..., None] * (kap[..., None] * S).sum(
            -2, keepdim=True
        )
        S = S + c["hook_write"][:, t]
        assert (S - c["hook_state"][:, t]).abs().max().item() <= 1e-5
        read = (S * c["hook_q"][:, t, ..., None]).sum(-2)
        assert (read - c["hook_read"][:, t]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_every_hook_fires(c128):
    path, sd, model = c128
    tokens = _tokens(sd["emb.weight"].shape[0], 5, seed=9)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: True)
    assert set(cache.keys()) == set(model.hook_dict)
    for name in ("hook_q", "hook_k", "hook_v", "hook_a", "hook_kappa", "hook_decay", "hook_read"):
        assert cache[f"blocks.2.attn.{name}"].shape == (1, 5, 2, N)
    assert cache["blocks.2.attn.hook_state"].shape == (1, 5, 2, N, N)
    decay = cache["blocks.0.attn.hook_decay"]
    assert bool(((decay > math.exp(-math.exp(-0.5))) & (decay < 1)).all())
    # blocks.0.hook_resid_pre is after ln0
    resid = cache["blocks.0.hook_resid_pre"]
    ln0 = F.layer_norm(
        sd["emb.weight"][tokens], (128,), sd["blocks.0.ln0.weight"], sd["blocks.0.ln0.bias"]
    )
    assert torch.allclose(resid, ln0, atol=1e-6)


# --------------------------------------------------------------------------- state and generation
@torch.no_grad()
def test_split_forward_equals_whole_and_batch_rows(c128):
    path, sd, model = c128
    tokens = _tokens(sd["emb.weight"].shape[0], 45, seed=10, batch=2)
    whole, state = model(tokens, return_state=True)
    first, mid = model(tokens[:, :17], return_state=True)
    second, end = model(tokens[:, 17:], state=mid, return_state=True)
    assert (torch.cat((first, second), 1) - whole).abs().max().item() <= 1e-5
    for a, b in zip(state.layers, end.layers, strict=True):
        assert all((a[k] - b[k]).abs().max().item() <= 1e-5 for k in ("S", "shift", "mlp_shift"))
    for row in range(2):
        assert (model(tokens[row : row + 1])[0] - whole[row]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_greedy_generation_matches_package(tiny):
    name, path, sd, ref, ours = tiny
    prompt = _tokens(sd["emb.weight"].shape[0], 9, seed=12)
    out, state = ref.forward(prompt[0].tolist(), None)
    expected = []
    for _ in range(32):
        tok = int(out.argmax())
        expected.append(tok)
        out, state = ref.forward([tok], state)
    generated = ours.generate(prompt, 32, verbose=False)
    assert generated[0, 9:].tolist() == expected
    assert torch.equal(generated[:, :9], prompt)


@torch.no_grad()
def test_generation_with_hooks_equals_forward_with_hooks(c128):
    path, sd, model = c128
    prompt = _tokens(sd["emb.weight"].shape[0], 6, seed=13)
    u, w = torch.randn(N), torch.randn(N)

    def install(write, hook):  # absolute position 8, during generation too
        write = write.clone()
        hit = hook.positions == 8
        write[:, hit, 1] += 3.0 * torch.outer(u, w)
        return write

    hooks = [("blocks.1.attn.hook_write", install)]
    generated = model.generate(prompt, 8, fwd_hooks=hooks, verbose=False)
    logits = model.run_with_hooks(generated, fwd_hooks=hooks)
    assert torch.equal(logits[0, 5:-1].argmax(-1), generated[0, 6:])


# --------------------------------------------------------------------------- tokenizer
def test_world_tokenizer_with_a_pth_model(tmp_path):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from tests.hooked_recurrent.rwkv_helpers import random_blinkdl_state_dict

    sd = random_blinkdl_state_dict(C=64, L=2, vocab=65536, Dw=8, Da=8, Dv=8, Dg=8, ffn=128)
    path = tmp_path / "RWKV-x070-World-tiny.pth"
    torch.save(sd, path)
    model = HookedRecurrentModel.from_pretrained(str(path))
    assert isinstance(model.tokenizer, WorldTokenizer)
    text = "Hello, RWKV-7 world! Ünïcode ✓"
    import rwkv

    trie = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    assert model.to_tokens(text)[0].tolist() == trie.encode(text)
    assert model.to_string(model.to_tokens(text)[0]) == text
    out = model.generate(text, 3, verbose=False)
    assert isinstance(out, str) and out.startswith(text)
    # an fla-hub folder of a World model gets the same tokenizer (its own is remote code)
    from safetensors.torch import save_file

    config, fla = blinkdl_to_fla(sd)
    folder = tmp_path / "fla"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in fla.items()}, str(folder / "model.safetensors"))
    assert isinstance(HookedRecurrentModel.from_pretrained(str(folder)).tokenizer, WorldTokenizer)
