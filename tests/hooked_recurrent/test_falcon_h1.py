"""Falcon-H1: parity with transformers' FalconH1ForCausalLM (parallel Mamba-2 + attention, muP
multipliers, mamba_d_ssm, optional gated norm), loading, edit propagation, generation and WriteSAE
(the checks are in `hybrid_helpers`)."""

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
    embedding_multiplier=1.7,
    lm_head_multiplier=0.6,
    ssm_in_multiplier=1.2,
    ssm_out_multiplier=0.8,
    attention_in_multiplier=1.1,
    attention_out_multiplier=0.9,
    key_multiplier=0.7,
    ssm_multipliers=[0.9, 1.2, 0.8, 1.1, 1.3],
    mlp_multipliers=[1.3, 0.7],
)
CONFIGS = {
    # gated norm before the gate, 2 groups of 2 heads, d_ssm 48 != expand * hidden, chunk 5,
    # every muP multiplier != 1
    "norm_first": dict(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_d_ssm=48,
        mamba_n_heads=4,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_chunk_size=5,
        mamba_rms_norm=True,
        mamba_norm_before_gate=True,
        **MULTIPLIERS,
    ),
    # no gated norm (y * silu(z)), 3 groups of 2 heads, every bias, dt clamped, tied embeddings,
    # conv 3, chunk 7
    "gate_only": dict(
        hidden_size=24,
        intermediate_size=36,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        mamba_d_ssm=36,
        mamba_n_heads=6,
        mamba_n_groups=3,
        mamba_d_state=6,
        mamba_d_conv=3,
        mamba_chunk_size=7,
        mamba_rms_norm=False,
        mamba_proj_bias=True,
        projectors_bias=True,
        attention_bias=True,
        mlp_bias=True,
        time_step_limit=(0.01, 2.0),
        tie_word_embeddings=True,
        **{
            k: v
            for k, v in MULTIPLIERS.items()
            if k not in ("embedding_multiplier", "lm_head_multiplier")
        },
    ),
}


def falcon_hf(name: str, seed: int = 0):
    from transformers import FalconH1Config, FalconH1ForCausalLM

    torch.manual_seed(seed)
    hf = FalconH1ForCausalLM(FalconH1Config(vocab_size=VOCAB, **CONFIGS[name])).eval()
    randomise(hf, seed)
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = falcon_hf(request.param, seed=list(CONFIGS).index(request.param))
    return hf, HookedRecurrentModel.from_hf_model(hf)


def test_logits_hidden_states_and_states_match_hf(pair):
    hf, model = pair
    assert 23 % hf.config.mamba_chunk_size
    hh.check_parity(hf, model, VOCAB)


def test_parallel_block_hooks(pair):
    """Both paths are separate streams: resid_mid = resid_pre + attn_out + attn2_out, where
    attn_out is the Mamba-2 mixer's hook_out and attn2_out the attention's o_proj of hook_z."""
    hf, model = pair
    c = hf.config
    _, cache = model.run_with_cache(hh.tokens(VOCAB, 2, 11))
    b = "blocks.1."
    total = cache[b + "hook_resid_pre"] + cache[b + "hook_attn_out"] + cache[b + "hook_attn2_out"]
    torch.testing.assert_close(cache[b + "hook_resid_mid"], total)
    torch.testing.assert_close(cache[b + "hook_attn_out"], cache[b + "attn.hook_out"])
    assert cache[b + "attn2.hook_pattern"].shape == (2, c.num_attention_heads, 11, 11)
    assert cache[b + "attn.hook_q"].shape == (2, 11, c.mamba_n_heads, c.mamba_d_state)
    assert (
        model.cfg.d_inner == c.mamba_d_ssm
        and model.cfg.recurrent_layers == [0, 1, 2][: c.num_hidden_layers]
    )


@pytest.mark.parametrize("hook_name", ["hook_write", "hook_state"])
@pytest.mark.parametrize("where", ["one", "several"])
def test_edits_propagate_like_brute_force(pair, hook_name, where):
    hh.check_edits(*pair, VOCAB, hook_name, where)


def test_greedy_generation_and_hooks_in_generation(pair):
    hh.check_generation(*pair, VOCAB)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_loads_and_converts_back(tmp_path, name):
    from hooked_recurrent.pretrained.falcon_h1 import to_hf_state_dict

    hh.check_save_and_convert_back(falcon_hf(name, seed=7), tmp_path, to_hf_state_dict, VOCAB)


def test_writesae_trains_and_evaluates(pair):
    hh.check_writesae(pair[1], VOCAB)
