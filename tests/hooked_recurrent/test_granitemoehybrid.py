"""Granite 4.0 hybrids: parity with transformers' GraniteMoeHybridForCausalLM (MoE + shared MLP,
multipliers, NoPE or RoPE), loading, edit propagation, generation and WriteSAE (the checks are in
`hybrid_helpers`)."""

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
MULTIPLIERS = dict(
    embedding_multiplier=1.6,
    logits_scaling=2.5,
    residual_multiplier=0.7,
    attention_multiplier=0.3,
)
CONFIGS = {
    # MoE top-2 of 4 plus the shared MLP, NoPE attention at layer 1, 2 groups of 2 heads,
    # chunk 5, tied embeddings
    "moe_nope": dict(
        hidden_size=32,
        intermediate_size=12,
        shared_intermediate_size=20,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["mamba", "attention", "mamba"],
        mamba_n_heads=4,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_chunk_size=5,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
        **MULTIPLIERS,
    ),
    # dense (the shared MLP alone), RoPE attention first, 3 groups of 2 heads, chunk 7, conv 3,
    # biases on attention and Mamba projections, dt clamped, untied
    "dense_rope": dict(
        hidden_size=24,
        intermediate_size=16,
        shared_intermediate_size=36,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        layer_types=["attention", "mamba", "mamba"],
        position_embedding_type="rope",
        mamba_n_heads=6,
        mamba_n_groups=3,
        mamba_d_state=6,
        mamba_d_conv=3,
        mamba_chunk_size=7,
        mamba_proj_bias=True,
        attention_bias=True,
        time_step_limit=(0.01, 2.0),
        num_local_experts=0,
        **MULTIPLIERS,
    ),
}


def granite_hf(name: str, seed: int = 0):
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    torch.manual_seed(seed)
    hf = GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(vocab_size=VOCAB, **CONFIGS[name]))
    randomise(hf.eval(), seed)
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = granite_hf(request.param, seed=list(CONFIGS).index(request.param))
    return hf, HookedRecurrentModel.from_hf_model(hf)


def test_logits_hidden_states_and_states_match_hf(pair):
    hf, model = pair
    assert 23 % hf.config.mamba_chunk_size
    hh.check_parity(hf, model, VOCAB)


def test_layout_and_hooks(pair):
    hf, model = pair
    names = set(model.hook_dict)
    li = model.cfg.attention_layers[0]
    rope = hf.config.position_embedding_type == "rope"
    assert (f"blocks.{li}.attn.hook_rot_q" in names) == rope
    moe = f"blocks.{li}.mlp.hook_router_logits" in names
    assert moe == bool(hf.config.num_local_experts)
    # the embedding multiplier acts after hook_embed
    _, cache = model.run_with_cache(hh.tokens(VOCAB, 1, 5))
    torch.testing.assert_close(
        cache["blocks.0.hook_resid_pre"], cache["hook_embed"] * hf.config.embedding_multiplier
    )


@pytest.mark.parametrize("hook_name", ["hook_write", "hook_state"])
@pytest.mark.parametrize("where", ["one", "several"])
def test_edits_propagate_like_brute_force(pair, hook_name, where):
    hh.check_edits(*pair, VOCAB, hook_name, where)


def test_greedy_generation_and_hooks_in_generation(pair):
    hh.check_generation(*pair, VOCAB)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_loads_and_converts_back(tmp_path, name):
    from hooked_recurrent.pretrained.granitemoehybrid import to_hf_state_dict

    hh.check_save_and_convert_back(granite_hf(name, seed=7), tmp_path, to_hf_state_dict, VOCAB)


def test_writesae_trains_and_evaluates(pair):
    hh.check_writesae(pair[1], VOCAB)
