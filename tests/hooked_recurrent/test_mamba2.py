"""Mamba-2: parity with transformers' Mamba2ForCausalLM, loading, edit propagation, generation.

References: Hugging Face `Mamba2ForCausalLM` (logits, hidden states, caches, greedy generate) and
`mamba_helpers.brute_force_logits`, a float64 token-by-token loop over the Mamba-2 equations
written in the test from the HF weights (not the package's scan).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hooked_recurrent import HookedRecurrentModel, Transition, scan
from hooked_recurrent.components.mamba2 import chunk_ssd
from tests.hooked_recurrent.mamba_helpers import MAMBA_CONFIGS, brute_force_logits, mamba_hf

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(2)

CONFIGS = list(MAMBA_CONFIGS)
VOCAB = 101


@pytest.fixture(scope="module", params=CONFIGS)
def pair(request):
    hf = mamba_hf(request.param, seed=CONFIGS.index(request.param))
    return hf, HookedRecurrentModel.from_hf_model(hf)


def tokens(batch: int = 2, T: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- chunked SSD vs reference scan
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 40),
    H=st.integers(1, 3),
    N=st.integers(1, 9),
    P=st.integers(1, 7),
    chunk=st.integers(1, 16),
    with_s0=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunk_ssd_equals_reference_scan(B, T, H, N, P, chunk, with_s0, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, N, generator=g), torch.randn(B, T, H, N, generator=g)
    v = torch.randn(B, T, H, P, generator=g)
    dt = torch.rand(B, T, H, generator=g) * 2
    log_decay = -dt * torch.rand(H, generator=g) * 3
    S0 = torch.randn(B, H, N, P, generator=g) if with_s0 else None
    o, S_T = chunk_ssd(q, k, v, dt, log_decay, S0, chunk)
    o_ref, S_ref, _ = scan(Transition(log_decay.exp()), q, k, dt[..., None] * v, S0)
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S_T, S_ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- parity with Hugging Face
def test_config_conversion(pair):
    hf, model = pair
    c = hf.config
    assert (model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v) == (
        c.num_heads,
        c.state_size,
        c.head_dim,
    )
    assert (
        model.cfg.n_groups == c.n_groups
        and model.cfg.layer_types == ["recurrent"] * c.num_hidden_layers
    )
    assert model.cfg.tie_word_embeddings == c.tie_word_embeddings


def hf_parity(hf, model) -> dict:
    """The differences to HF that test_logits_hidden_states_and_final_state_match_hf asserts on:
    "logits" (max abs over 3 x 50 tokens), and per layer "resid_post" (hook_resid_post vs HF's
    hidden state) and "state" (the final SSM state vs HF's cache, transposed to [N, P])."""
    toks = tokens(3, 50)
    with torch.no_grad():
        out = hf(toks, output_hidden_states=True, use_cache=True)
        logits, cache = model.run_with_cache(
            toks, names_filter=lambda n: n.endswith("resid_post") or n == "hook_embed"
        )
        _, state = model(toks, return_state=True)
    L = hf.config.num_hidden_layers
    # HF's hidden states, L + 1 of them: before transformers 5.25 the output of each block, then
    # norm_f(last); from 5.25 the embeddings, the output of each block but the last, norm_f(last)
    hs = out.hidden_states
    assert len(hs) == L + 1
    first = 1 if torch.equal(hs[0], cache["hook_embed"]) else 0
    resid = [
        (cache[f"blocks.{layer}.hook_resid_post"] - hs[layer + first]).abs().max().item()
        for layer in range(L - first)
    ]
    states = []
    for layer in range(L):
        hf_S = out.cache_params.layers[layer].recurrent_states[0]  # [b, h, headdim, d_state]
        states.append((state.layers[layer]["S"] - hf_S.transpose(-1, -2)).abs().max().item())
    return {
        "logits": (logits - out.logits).abs().max().item(),
        "resid_post": resid,
        "state": states,
    }


def test_logits_hidden_states_and_final_state_match_hf(pair):
    hf, model = pair
    assert hf.config.chunk_size < 50 and 50 % hf.config.chunk_size
    d = hf_parity(hf, model)
    assert d["logits"] <= 1e-4
    for layer, diff in enumerate(d["resid_post"]):
        assert diff <= 1e-4, (layer, diff)
    for layer, diff in enumerate(d["state"]):
        assert diff <= 1e-5, (layer, diff)


def test_brute_force_reference_matches_hf(pair):
    hf, _ = pair
    toks = tokens(2, 30)
    with torch.no_grad():
        assert (brute_force_logits(hf, toks) - hf(toks).logits.double()).abs().max() <= 1e-4


def decode_state_diffs(hf, model) -> list[float]:
    """Per layer, max |hook_state - HF's state after one-token decode steps| over 2 x 16 tokens
    (test_per_position_states_match_hf_decode)."""
    toks = tokens(2, 16, seed=3)
    L = hf.config.num_hidden_layers
    hf_states = [[] for _ in range(L)]
    with torch.no_grad():
        cache = None
        for t in range(toks.shape[1]):
            out = hf(toks[:, t : t + 1], cache_params=cache, use_cache=True)
            cache = out.cache_params
            for layer in range(L):
                hf_states[layer].append(cache.layers[layer].recurrent_states[0].clone())
        _, ours = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_state"))
    diffs = []
    for layer in range(L):
        ref = torch.stack(hf_states[layer], 1).transpose(-1, -2)  # [b, T, h, d_state, headdim]
        diffs.append((ours[f"blocks.{layer}.attn.hook_state"] - ref).abs().max().item())
    return diffs


def test_per_position_states_match_hf_decode(pair):
    for layer, diff in enumerate(decode_state_diffs(*pair)):
        assert diff <= 1e-5, (layer, diff)


def test_hook_shapes_and_meaning(pair):
    hf, model = pair
    c = hf.config
    toks = tokens(2, 12)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=lambda n: ".attn." in n)
    b, T, H, N, P = 2, 12, c.num_heads, c.state_size, c.head_dim
    a = "blocks.0.attn."
    assert cache[a + "hook_q"].shape == cache[a + "hook_k"].shape == (b, T, H, N)
    assert cache[a + "hook_v"].shape == cache[a + "hook_read"].shape == (b, T, H, P)
    assert cache[a + "hook_dt"].shape == cache[a + "hook_decay"].shape == (b, T, H)
    assert cache[a + "hook_write"].shape == cache[a + "hook_state"].shape == (b, T, H, N, P)
    A = -hf.backbone.layers[0].mixer.A_log.exp()
    torch.testing.assert_close(cache[a + "hook_decay"], (cache[a + "hook_dt"] * A).exp())
    k, v, dt = cache[a + "hook_k"], cache[a + "hook_v"], cache[a + "hook_dt"]
    torch.testing.assert_close(
        cache[a + "hook_write"], k[..., :, None] * (dt[..., None] * v)[..., None, :]
    )
    read = torch.einsum("bthnp,bthn->bthp", cache[a + "hook_state"], cache[a + "hook_q"])
    torch.testing.assert_close(cache[a + "hook_read"], read, atol=1e-5, rtol=1e-4)
    # B and C are shared by the n_heads / n_groups consecutive heads of a group
    rep = H // c.n_groups
    assert torch.equal(cache[a + "hook_k"][:, :, 0], cache[a + "hook_k"][:, :, rep - 1])


# ---------------------------------------------------------------- loading checkpoints
def load_mamba_ssm_layout(folder: Path) -> tuple:
    """Write a tied, vocab-padded Mamba-2 in mamba_ssm's layout (config.json with ssm_cfg,
    pytorch_model.bin with backbone.embedding.*) into `folder` and load it; returns
    (hf, model, padded vocab, max |logits - HF's| over 2 x 40 tokens)."""
    pad = 8
    vocab = 99  # padded to 104
    padded = -(-vocab // pad) * pad
    hf = mamba_hf("g2", seed=5, vocab=padded, tie_word_embeddings=True)
    c = hf.config
    config = {
        "d_model": c.hidden_size,
        "d_intermediate": 0,
        "n_layer": c.num_hidden_layers,
        "vocab_size": vocab,
        "ssm_cfg": {
            "layer": "Mamba2",
            "d_state": c.state_size,
            "d_conv": c.conv_kernel,
            "expand": c.expand,
            "headdim": c.head_dim,
            "ngroups": c.n_groups,
            "chunk_size": c.chunk_size,
        },
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": pad,
        "tie_embeddings": True,
    }
    sd = {
        k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
        for k, v in hf.state_dict().items()
    }
    assert "backbone.embedding.weight" in sd
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(sd, folder / "pytorch_model.bin")
    model = HookedRecurrentModel.from_pretrained(str(folder))
    toks = tokens(2, 40)
    with torch.no_grad():
        diff = (model(toks) - hf(toks).logits).abs().max().item()
    return hf, model, padded, diff


def test_mamba_ssm_layout_loads(tmp_path):
    hf, model, padded, diff = load_mamba_ssm_layout(tmp_path)
    c = hf.config
    assert model.cfg.d_vocab == padded and model.cfg.n_heads == c.num_heads
    assert model.cfg.n_groups == c.n_groups
    assert diff <= 1e-4


def test_mamba_ssm_rejects_mamba1(tmp_path):
    from hooked_recurrent.pretrained.mamba2 import config_from_hf

    with pytest.raises(ValueError, match="Mamba2"):
        config_from_hf({"d_model": 8, "n_layer": 1, "vocab_size": 8, "ssm_cfg": {}})


@pytest.mark.parametrize("name", ["g2", "g4_tied"])
def test_hf_save_pretrained_loads_and_round_trips(tmp_path, name):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from hooked_recurrent.pretrained.mamba2 import to_hf_config, to_hf_state_dict

    hf = mamba_hf(name, seed=7)
    hf.save_pretrained(tmp_path)
    model = HookedRecurrentModel.from_pretrained(str(tmp_path))
    toks = tokens(2, 33)
    with torch.no_grad():
        ref = hf(toks).logits
        assert (model(toks) - ref).abs().max() <= 1e-4
        back = Mamba2ForCausalLM(Mamba2Config(**to_hf_config(model.cfg))).eval()
        back.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=False)
        missing = set(back.state_dict()) - set(to_hf_state_dict(model.state_dict(), model.cfg))
        assert missing <= {"lm_head.weight"}  # tied
        assert (back(toks).logits - ref).abs().max() <= 1e-5


# ---------------------------------------------------------------- edit propagation
EDIT_T, EDIT_H = 19, 1


def _edit_cases(model):
    """(name, hook name suffix, hook fn, brute-force edit fn) for each editable hook."""
    c = model.cfg
    g = torch.Generator().manual_seed(11)
    u, w = torch.randn(c.d_k, generator=g), torch.randn(c.d_v, generator=g)
    dense = 0.3 * torch.randn(c.d_k, c.d_v, generator=g)
    vec_k, vec_v = torch.randn(c.d_k, generator=g), torch.randn(c.d_v, generator=g)
    t, h = EDIT_T, EDIT_H

    def hook_set(value, add: bool):
        def hook(x, hook):
            x = x.clone()
            x[:, t, h] = x[:, t, h] + value if add else value.to(x.dtype).expand_as(x[:, t, h])
            return x

        def ref(layer, pos, name, x, *, _name):
            if pos != t or name != _name:
                return x
            x = x.clone()
            x[:, h] = x[:, h] + value.double() if add else value.double()
            return x

        return hook, ref

    rank1 = 0.5 * u[:, None] * w[None, :]
    return [
        ("k_add", "hook_k", *hook_set(vec_k, True), "k"),
        ("k_set", "hook_k", *hook_set(vec_k, False), "k"),
        ("v_set", "hook_v", *hook_set(vec_v, False), "v"),
        ("dt_set", "hook_dt", *hook_set(torch.tensor(0.7), False), "dt"),
        ("decay_set", "hook_decay", *hook_set(torch.tensor(0.999), False), "decay"),
        ("write_rank1", "hook_write", *hook_set(rank1, True), "write"),
        ("write_dense", "hook_write", *hook_set(dense, False), "write"),
        ("state_rank1", "hook_state", *hook_set(rank1, True), "state"),
        ("state_dense", "hook_state", *hook_set(dense, False), "state"),
    ]


def single_edit_results(hf, model, layer: int) -> list[tuple[str, str, float, bool, float]]:
    """test_edits_propagate_like_brute_force: for each of `_edit_cases`, an edit at (EDIT_T,
    EDIT_H) of blocks.{layer}; returns (case, hook name, max |logits - brute force|, logits before
    EDIT_T bit-equal to the clean run, max |logits after EDIT_T - clean|)."""
    toks = tokens(2, 45, seed=4)
    L = model.cfg.n_layers
    results = []
    with torch.no_grad():
        clean = model(toks)
        for case, hook_name, hook, ref, ref_name in _edit_cases(model):

            def edit(li, pos, name, x, ref=ref, ref_name=ref_name):
                return ref(li, pos, name, x, _name=ref_name) if li == layer % L else x

            edited = model.run_with_hooks(
                toks, fwd_hooks=[(f"blocks.{layer % L}.attn.{hook_name}", hook)]
            )
            expected = brute_force_logits(hf, toks, edit)
            diff = (edited.double() - expected).abs().max().item()
            earlier = torch.equal(edited[:, :EDIT_T], clean[:, :EDIT_T])
            effect = (edited[:, EDIT_T + 1 :] - clean[:, EDIT_T + 1 :]).abs().max().item()
            results.append((case, hook_name, diff, earlier, effect))
    return results


@pytest.mark.parametrize("layer", [0, -1])
def test_edits_propagate_like_brute_force(pair, layer):
    for case, _, diff, earlier, effect in single_edit_results(*pair, layer):
        assert diff <= 1e-4, (case, diff)
        assert earlier, case
        # the edit reaches the tokens after t (in the last layer only through the recurrence)
        assert effect > 1e-5, case


def test_in_place_edits_are_seen(pair):
    """TransformerLens hooks often edit in place and return the same tensor."""
    hf, model = pair
    toks = tokens(2, 30, seed=6)
    with torch.no_grad():
        for case, hook_name, hook, ref, ref_name in _edit_cases(model):

            def in_place(x, hook, _h=hook):
                x.copy_(_h(x, hook))
                return x

            def edit(li, pos, name, x, ref=ref, ref_name=ref_name):
                return ref(li, pos, name, x, _name=ref_name) if li == 0 else x

            got = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.0.attn.{hook_name}", in_place)])
            diff = (got.double() - brute_force_logits(hf, toks, edit)).abs().max()
            assert diff <= 1e-4, (case, diff)


#: (batch, position, head) triples (head taken mod n_heads): different heads and batch rows
MULTI_EDITS = {
    # span 7 < 16: stepped from 19 to 26, then the chunked response (chunks of 16, 7, 6)
    "short_span": [(0, 19, 1), (1, 21, 3), (0, 26, 0), (1, 26, 1), (0, 26, 1)],
    # span 36: stepped from 4 to 40 (Mamba-2 has no dense propagation), then the response
    "long_span": [(1, 4, 2), (0, 11, 0), (1, 30, 2), (0, 40, 1)],
}


def multi_edit_result(hf, model, layer: int, case: str, hook_name: str) -> tuple:
    """test_multi_position_edits_propagate_like_brute_force: additive edits at the triples of
    MULTI_EDITS[case] of blocks.{layer}.attn.{hook_name}; returns (max |logits - brute force|,
    per batch row: logits before its first edit bit-equal to the clean run, max |logits after the
    last edited position - clean|)."""
    c = model.cfg
    L, T = c.n_layers, 45
    li = layer % L
    toks = tokens(2, T, seed=15)
    g = torch.Generator().manual_seed(16)
    triples = [(b, t, h % c.n_heads) for b, t, h in MULTI_EDITS[case]]
    deltas = []
    for i in range(len(triples)):
        if i % 2:
            d = 0.3 * torch.randn(c.d_k, c.d_v, generator=g)
        else:
            d = torch.outer(torch.randn(c.d_k, generator=g), torch.randn(c.d_v, generator=g))
        deltas.append(d)

    def hook(x, hook):
        x = x.clone()
        for (b, t, h), d in zip(triples, deltas, strict=True):
            x[b, t, h] += d
        return x

    ref_name = hook_name.removeprefix("hook_")

    def edit(lj, pos, name, x):
        if lj != li or name != ref_name:
            return x
        x = x.clone()
        for (b, t, h), d in zip(triples, deltas, strict=True):
            if t == pos:
                x[b, h] += d.double()
        return x

    with torch.no_grad():
        clean = model(toks)
        edited = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{li}.attn.{hook_name}", hook)])
        expected = brute_force_logits(hf, toks, edit)
    diff = (edited.double() - expected).abs().max().item()
    earlier = []
    for b in range(2):  # each row is bit-for-bit clean before its own first edit
        first = min(t for bb, t, _ in triples if bb == b)
        earlier.append(torch.equal(edited[b, :first], clean[b, :first]))
    t1 = max(t for _, t, _ in triples)
    return diff, earlier, (edited[:, t1 + 1 :] - clean[:, t1 + 1 :]).abs().max().item()


@pytest.mark.parametrize("hook_name", ["hook_write", "hook_state"])
@pytest.mark.parametrize("case", list(MULTI_EDITS))
@pytest.mark.parametrize("layer", [0, -1])
def test_multi_position_edits_propagate_like_brute_force(pair, layer, case, hook_name):
    """Edits at several (batch, pos, head) triples: added to hook_write; at hook_state the state
    is assigned the received state plus the change (the brute force keeps both trajectories)."""
    diff, earlier, effect = multi_edit_result(*pair, layer, case, hook_name)
    assert diff <= 1e-4, diff
    for b, equal in enumerate(earlier):
        assert equal, b
    assert effect > 1e-5


# ---------------------------------------------------------------- state and generation
def test_split_forward_equals_whole(pair):
    _, model = pair
    toks = tokens(2, 41, seed=8)
    with torch.no_grad():
        whole = model(toks)
        for k in (1, 13, 40):
            first, state = model(toks[:, :k], return_state=True)
            for layer in state.layers:
                assert set(layer) == {"S", "conv"}
            second = model(toks[:, k:], state=state)
            assert (torch.cat((first, second), 1) - whole).abs().max() <= 1e-5, k


def test_greedy_generation_matches_hf(pair):
    hf, model = pair
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompt = tokens(2, 7, seed=9)
    with torch.no_grad():
        ref = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False
        )
        ours = model.generate(prompt, 32)
    assert ours.shape == ref.shape == (2, 39)
    assert torch.equal(ours, ref)


def test_generation_with_write_hook_equals_forward_with_it(pair):
    """A hook keyed on absolute positions acts the same in generate and in a full forward pass."""
    _, model = pair
    c = model.cfg
    g = torch.Generator().manual_seed(12)
    atom = 2.0 * torch.randn(c.d_k, generator=g)[:, None] * torch.randn(c.d_v, generator=g)
    targets = {5, 9, 14}  # one in the prompt, two during generation

    def install(x, hook):
        hit = [i for i, p in enumerate(hook.positions.tolist()) if p in targets]
        if not hit:
            return x
        x = x.clone()
        x[:, hit, 0] += atom
        return x

    hooks = [
        ("blocks.0.attn.hook_write", install),
        ("blocks.1.attn.hook_ssm_state", lambda x, hook: x),
    ]
    prompt = tokens(2, 8, seed=13)
    with torch.no_grad():
        out = model.generate(prompt, 12, fwd_hooks=hooks)
        plain = model.generate(prompt, 12)
        logits = model.run_with_hooks(out, fwd_hooks=hooks)
    assert torch.equal(logits[:, 7:-1].argmax(-1), out[:, 8:])
    assert not torch.equal(out, plain)  # the installed atom changed the continuation


@pytest.mark.parametrize("in_place", [True, False])
def test_write_edit_detection_block_by_block(in_place):
    """The engine finds exactly the edited (batch, pos, head) triples, across many blocks."""
    from hooked_recurrent.hook_points import RecurrentHookPoint
    from hooked_recurrent.mixer import _hooked_write

    g = torch.Generator().manual_seed(14)
    k, v = torch.randn(3, 20, 4, 5, generator=g), torch.randn(3, 20, 4, 6, generator=g)
    hit = [(0, 0, 1), (1, 7, 3), (2, 19, 0), (2, 19, 2)]

    def hook(x, hook):
        y = x if in_place else x.clone()
        for b, t, h in hit:
            y[b, t, h, 1, 2] += 1e-3
        return y

    hp = RecurrentHookPoint()
    hp.add_hook(hook)
    edited, edits, _ = _hooked_write(hp, k, v, block_elems=2 * 4 * 5 * 6)
    found = sorted(zip(edits.b.tolist(), edits.t.tolist(), edits.h.tolist(), strict=True))
    assert found == sorted(hit)
    native = k[..., :, None] * v[..., None, :]
    for i, (b, t, h) in enumerate(zip(edits.b, edits.t, edits.h, strict=True)):
        assert torch.equal(edits.delta[i], edited[b, t, h] - native[b, t, h])
        assert edits.delta[i].ne(0).sum() == 1
        assert torch.isclose(edits.delta[i, 1, 2], torch.tensor(1e-3), atol=1e-6)
