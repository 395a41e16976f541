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
    hh.check_parity(hf, model, VOCAB)


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
    hh.check_edits(*pair, VOCAB, hook_name, where)


def test_greedy_generation_and_hooks_in_generation(pair):
    hh.check_generation(*pair, VOCAB)


def test_save_pretrained_loads_and_converts_back(tmp_path):
    from hooked_recurrent.pretrained.bamba import to_hf_state_dict

    hh.check_save_and_convert_back(bamba_hf("bias", seed=7), tmp_path, to_hf_state_dict, VOCAB)


def test_writesae_trains_and_evaluates(pair):
    hh.check_writesae(pair[1], VOCAB)
