"""Bamba: parity with transformers' BambaForCausalLM, loading, edit propagation, generation and
WriteSAE (the checks are in `hybrid_helpers`; references: the `transformers` model and its float64
copy with brute-force Mamba-2 mixers)."""

from __future__ import annotations

import logging

import pytest
import torch

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent import hybrid_helpers as hh
from tests.hooked_recurrent.mamba_helpers import randomise

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(2)

VOCAB = 61
CONFIGS = {
    # 2 groups of 2 heads, chunk 5 (sequences of 23 leave a partial chunk), attention at layer 1
    # with GQA, partial RoPE
    "g2": dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_indices=[1],
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_chunk_size=5,
    ),
    # attention first and last, 3 groups of 2 heads, biases, dt clamped, tied embeddings, conv 3
    "bias": dict(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        attn_layer_indices=[0, 3],
        mamba_n_heads=6,
        mamba_d_head=8,
        mamba_n_groups=3,
        mamba_d_state=6,
        mamba_d_conv=3,
        mamba_chunk_size=7,
        mamba_proj_bias=True,
        attention_bias=True,
        mlp_bias=True,
        time_step_limit=(0.01, 2.0),
        tie_word_embeddings=True,
    ),
}


def bamba_hf(name: str, seed: int = 0):
    from transformers import BambaConfig, BambaForCausalLM

    torch.manual_seed(seed)
    cfg = BambaConfig(vocab_size=VOCAB, rms_norm_eps=1e-5, **CONFIGS[name])
    hf = BambaForCausalLM(cfg).eval()
    randomise(hf, seed)
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = bamba_hf(request.param, seed=list(CONFIGS).index(request.param))
    return hf, HookedRecurrentModel.from_hf_model(hf)


def test_logits_hidden_states_and_states_match_hf(pair):
    hf, model = pair
    assert 23 % hf.config.mamba_chunk_size
    d = hh.hf_parity(hf, model, hh.tokens(VOCAB, 3, 23))
    assert d["logits"] <= 1e-4, d
    assert max(d["resid_post"]) <= 1e-4, d
    assert max(d["state"]) <= 1e-5, d
    assert max(hh.decode_state_diffs(hf, model, hh.tokens(VOCAB, 2, 9, seed=3))) <= 1e-5


def test_layout_and_hooks(pair):
    hf, model = pair
    c = hf.config
    assert model.cfg.attention_layers == sorted(c.attn_layer_indices)
    assert model.cfg.n_groups == c.mamba_n_groups and model.cfg.d_k == c.mamba_d_state
    li = model.cfg.attention_layers[0]
    names = set(model.hook_dict)
    assert f"blocks.{li}.attn.hook_pattern" in names and f"blocks.{li}.attn.hook_rot_q" in names
    assert f"blocks.{li}.attn.hook_gate" not in names  # Bamba's attention has no output gate
    r = model.cfg.recurrent_layers[0]
    assert {f"blocks.{r}.attn.hook_write", f"blocks.{r}.hook_resid_mid"} <= names


@pytest.mark.parametrize("hook_name", ["hook_write", "hook_state"])
@pytest.mark.parametrize("where", ["one", "several"])
def test_edits_propagate_like_brute_force(pair, hook_name, where):
    hf, model = pair
    triples = [(0, 9, 1), (1, 9, 1)] if where == "one" else hh.MULTI
    toks = hh.tokens(VOCAB, 2, 23, seed=4)
    assert (hh.brute_logits(hf, toks) - hf(toks).logits.double()).abs().max() <= 1e-4
    for layer in (model.cfg.recurrent_layers[0], model.cfg.recurrent_layers[-1]):
        diff, earlier, effect = hh.edit_result(hf, model, layer, hook_name, triples, toks)
        assert diff <= 1e-4 and earlier and effect > 1e-5, (layer, diff, earlier, effect)


def test_greedy_generation_and_hooks_in_generation(pair):
    hf, model = pair
    assert hh.generation_matches(hf, model, hh.tokens(VOCAB, 2, 7, seed=9), 32)
    got = hh.generation_hooks_match(model, hh.tokens(VOCAB, 2, 8, seed=13))
    assert got["tokens"] and got["effect"] > 1e-2, got
    assert got["state"] <= 1e-5 and got["write"] <= 1e-5, got


def test_save_pretrained_loads_and_converts_back(tmp_path):
    from transformers import BambaConfig, BambaForCausalLM

    from hooked_recurrent.pretrained.bamba import to_hf_config, to_hf_state_dict

    hf = bamba_hf("bias", seed=7)
    hf.save_pretrained(tmp_path)
    model = HookedRecurrentModel.from_pretrained(str(tmp_path))
    toks = hh.tokens(VOCAB, 2, 19)
    with torch.no_grad():
        ref = hf(toks).logits
        assert (model(toks) - ref).abs().max() <= 1e-4
        back = BambaForCausalLM(BambaConfig(**to_hf_config(model.cfg))).eval()
        sd = to_hf_state_dict(model.state_dict(), model.cfg)
        missing, unexpected = back.load_state_dict(sd, strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied
        assert (back(toks).logits - ref).abs().max() <= 1e-5


def test_writesae_trains_and_evaluates(pair):
    _, model = pair
    got = hh.writesae_runs(model, VOCAB)
    assert got["n"] >= 1 and got["finite"] and 0 < len(got["kls"]), got
    assert got["fve"] == got["fve"]  # a number, not NaN
