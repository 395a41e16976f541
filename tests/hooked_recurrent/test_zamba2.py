"""Zamba2: parity with transformers' Zamba2ForCausalLM (Mamba-2 in every layer, shared transformer
blocks with per-layer adapters at the hybrid layers), loading, edit propagation, generation and
WriteSAE (the checks are in `hybrid_helpers`; references: the `transformers` model and its
float64 copy with brute-force Mamba-2 mixers)."""

from __future__ import annotations

import functools
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent import family_checks as fc
from tests.hooked_recurrent import hybrid_helpers as hh
from tests.hooked_recurrent.mamba_helpers import randomise

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(2)

VOCAB = 61
CONFIGS = {
    # 2 shared blocks used in turn by hybrid layers 0, 2, 3 (layer 3 reuses layer 0's block with
    # its own adapters), adapters on q/k/v and the MLP, RoPE, 2 groups of 2 heads, chunk 5
    # (T = 23 leaves a partial chunk), untied embeddings (transformers then ties nothing: every
    # hybrid layer has a copy of its own)
    "mem2": dict(
        hidden_size=32,
        num_hidden_layers=4,
        layers_block_type=["hybrid", "mamba", "hybrid", "hybrid"],
        num_attention_heads=4,
        intermediate_size=40,
        n_mamba_heads=4,
        mamba_d_state=8,
        mamba_ngroups=2,
        chunk_size=5,
        num_mem_blocks=2,
        adapter_rank=4,
        use_shared_attention_adapter=True,
        use_mem_rope=True,
        tie_word_embeddings=False,
    ),
    # one shared block for hybrid layers 1 and 2, MLP adapters only, GQA attention without RoPE,
    # 3 groups of 2 heads, conv 3, chunk 7, biases on the linear maps, SiLU, tied embeddings
    "gqa_bias": dict(
        hidden_size=24,
        num_hidden_layers=3,
        layers_block_type=["mamba", "hybrid", "hybrid"],
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=36,
        n_mamba_heads=6,
        mamba_d_state=6,
        mamba_ngroups=3,
        mamba_d_conv=3,
        chunk_size=7,
        num_mem_blocks=1,
        adapter_rank=3,
        add_bias_linear=True,
        hidden_act="silu",
    ),
}


def zamba2_hf(name: str, seed: int = 0, **over):
    """A tiny random Zamba2ForCausalLM. Besides `randomise` (norms, dt, A, D, biases), every
    matrix but the embeddings is drawn with std 1/sqrt(fan_in): at transformers' std 0.02 the
    shared blocks and adapters move the logits by less than the tolerances."""
    from transformers import Zamba2Config, Zamba2ForCausalLM

    torch.manual_seed(seed)
    kw = {**CONFIGS[name], **over}
    hf = Zamba2ForCausalLM(Zamba2Config(vocab_size=VOCAB, rms_norm_eps=1e-5, **kw)).eval()
    randomise(hf, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if p.dim() == 2 and not n.endswith(("embed_tokens.weight", "lm_head.weight")):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return hf


@functools.cache
def _pair(name: str):
    hf = zamba2_hf(name, seed=list(CONFIGS).index(name))
    return hf, HookedRecurrentModel.from_hf_model(hf)


@pytest.fixture(params=list(CONFIGS))
def pair(request):
    return _pair(request.param)


def test_logits_hidden_states_and_states_match_hf(pair):
    hf, model = pair
    assert 23 % hf.config.chunk_size
    hh.check_parity(hf, model, VOCAB)


def test_shared_attention_pattern_matches_hf(pair):
    """Each hybrid layer's `shared.attn.hook_pattern` equals transformers' attention weights."""
    hf, model = pair
    toks = hh.tokens(VOCAB, 2, 13, seed=2)
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = hf(toks, output_attentions=True).attentions
    finally:
        hf.set_attn_implementation("sdpa")
    names = [f"blocks.{li}.shared.attn.hook_pattern" for li in model.cfg.hybrid_layers]
    _, cache = model.run_with_cache(toks, names_filter=names)
    assert len(ref) == len(names)
    for name, r in zip(names, ref, strict=True):
        assert (cache[name] - r).abs().max() <= 1e-5, name


def test_tl_weights_include_the_adapters(pair):
    """`shared.attn.W_Q` / `W_K` / `W_V` (TransformerLens layout) include the layer's adapter:
    the normed input times them gives `hook_q` / `hook_k` / `hook_v`."""
    _, model = pair
    li = model.cfg.hybrid_layers[-1]
    a = f"blocks.{li}.shared."
    names = [a + "ln1.hook_normalized"] + [a + f"attn.hook_{n}" for n in "qkv"]
    _, cache = model.run_with_cache(hh.tokens(VOCAB, 2, 7), names_filter=names)
    attn, x = model.blocks[li].shared.attn, cache[a + "ln1.hook_normalized"]
    rep = attn.n_heads // attn.n_kv_heads
    for n, W in (("q", attn.W_Q), ("k", attn.W_K[::rep]), ("v", attn.W_V[::rep])):
        torch.testing.assert_close(torch.einsum("bpd,hde->bphe", x, W), cache[a + f"attn.hook_{n}"])


def test_dt_clamped_below_at_time_step_min():
    """dt >= time_step_min at every position (it binds at 0.3 here). transformers' one-token
    decode step does not clamp, so only its full forward pass is compared with ours."""
    hf = zamba2_hf("gqa_bias", seed=3, time_step_min=0.3)
    model = HookedRecurrentModel.from_hf_model(hf)
    d = hh.hf_parity(hf, model, hh.tokens(VOCAB, 2, 23))
    assert d["logits"] <= 1e-4 and max(d["resid_post"]) <= 1e-4 and max(d["state"]) <= 1e-5, d
    _, cache = model.run_with_cache(hh.tokens(VOCAB, 2, 11), names_filter="blocks.1.attn.hook_dt")
    dt = cache["blocks.1.attn.hook_dt"]
    assert torch.isclose(dt.min(), torch.tensor(0.3)) and (dt > 0.3).any()


def test_layers_have_their_own_copies_and_hooks(pair):
    """Users of one shared block hold equal but separate copies of its weights and their own
    adapters; a hook on one layer's shared block acts on that layer alone; the block adds only
    the mixer's output to the residual."""
    hf, model = pair
    c = model.cfg
    first, last = c.hybrid_layers[0], c.hybrid_layers[-1]
    assert c.owner(last) == first  # both configs reuse the first block at the last hybrid layer
    a, b = model.blocks[first].shared, model.blocks[last].shared
    tied = c.tie_word_embeddings  # transformers ties the users of a block only then
    assert torch.equal(a.attn.q_proj.weight, b.attn.q_proj.weight) == tied
    assert a.attn.q_proj.weight.data_ptr() != b.attn.q_proj.weight.data_ptr()
    assert not torch.equal(a.mlp.adapter.A.weight, b.mlp.adapter.A.weight)
    names = set(model.hook_dict)
    for li in range(c.n_layers):
        hybrid = li in c.hybrid_layers
        assert (f"blocks.{li}.hook_shared_out" in names) == hybrid
        assert (f"blocks.{li}.shared.attn.hook_pattern" in names) == hybrid
        assert f"blocks.{li}.attn.hook_write" in names
    assert (f"blocks.{first}.shared.attn.hook_rot_q" in names) == bool(c.rotary_dim)

    toks = hh.tokens(VOCAB, 2, 11)
    keep = [f"blocks.{li}.{n}" for li in (first, last) for n in ("hook_shared_out",)]
    keep += [f"blocks.{last}.{n}" for n in ("hook_resid_pre", "hook_attn_out", "hook_resid_post")]
    keep += [f"blocks.{last}.shared.hook_mlp_out"]
    _, clean = model.run_with_cache(toks, names_filter=keep)
    b_last = f"blocks.{last}."
    total = clean[b_last + "hook_resid_pre"] + clean[b_last + "hook_attn_out"]
    torch.testing.assert_close(clean[b_last + "hook_resid_post"], total)
    torch.testing.assert_close(
        clean[b_last + "hook_shared_out"],
        model.blocks[last].linear(clean[b_last + "shared.hook_mlp_out"]),
    )
    with model.hooks(fwd_hooks=[(b_last + "shared.hook_attn_out", lambda x, hook: 0 * x)]):
        _, edited = model.run_with_cache(toks, names_filter=keep)
    assert torch.equal(
        edited[f"blocks.{first}.hook_shared_out"], clean[f"blocks.{first}.hook_shared_out"]
    )
    assert (
        edited[b_last + "hook_shared_out"] - clean[b_last + "hook_shared_out"]
    ).abs().max() > 1e-2


@pytest.mark.parametrize("hook_name", ["hook_write", "hook_state"])
@pytest.mark.parametrize("where", ["one", "several"])
def test_edits_propagate_like_brute_force(pair, hook_name, where):
    hh.check_edits(*pair, VOCAB, hook_name, where)


def test_greedy_generation_and_hooks_in_generation():
    """On the config with the most sharing (one `generate` comparison for the family)."""
    hh.check_generation(*_pair("mem2"), VOCAB)


def test_hooks_in_generation_without_rope():
    got = hh.generation_hooks_match(_pair("gqa_bias")[1], hh.tokens(VOCAB, 2, 8, seed=13))
    assert got["tokens"] and got["effect"] > 1e-2, got
    assert got["state"] <= 1e-5 and got["write"] <= 1e-5, got


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_loads_and_converts_back(tmp_path, tied):
    """A tied folder stores each shared block once (under its first user), which the conversion
    copies into every user; an untied one has every layer's own copy (transformers ties the
    shared blocks only with tied embeddings)."""
    from hooked_recurrent.pretrained.zamba2 import to_hf_state_dict

    hf = zamba2_hf("mem2", seed=7, tie_word_embeddings=tied)
    hh.check_save_and_convert_back(hf, tmp_path, to_hf_state_dict, VOCAB)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert json.loads((tmp_path / "config.json").read_text())["hybrid_layer_ids"] == [0, 2, 3]
    assert "model.layers.0.shared_transformer.self_attn.q_proj.weight" in saved
    own = any(k.startswith("model.layers.3.shared_transformer.") for k in saved)
    assert own != tied


def test_writesae_trains_and_evaluates():
    hh.check_writesae(_pair("gqa_bias")[1], VOCAB)


def test_left_padding_and_continuing_a_state():
    """A left-padded row equals the prompt alone (padding skipped by the mixers and the shared
    attention); two calls chained by the returned state equal one call."""
    hf, model = _pair("mem2")
    assert fc.padding_diff(model, VOCAB) <= 1e-5
    toks = hh.tokens(VOCAB, 2, 13, seed=6)
    with torch.no_grad():
        first, state = model(toks[:, :6], return_state=True)
        rest = model(toks[:, 6:], state=state)
        assert (torch.cat((first, rest), 1) - hf(toks).logits).abs().max() <= 1e-4


def test_refusals():
    from hooked_recurrent.pretrained.zamba2 import config_from_hf

    hf = zamba2_hf("gqa_bias")
    bad = {**hf.config.to_dict(), "use_shared_attention_adapter": True}
    with pytest.raises(ValueError, match="num_key_value_heads"):
        config_from_hf(bad)
    model = HookedRecurrentModel.from_hf_model(hf)
    resid = torch.zeros(1, 3, model.cfg.d_model)
    with pytest.raises(ValueError, match="start_at_layer must be 0 on Zamba2"):
        model(resid, start_at_layer=1)
