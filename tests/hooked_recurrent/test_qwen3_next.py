"""Qwen3-Next against transformers' Qwen3NextForCausalLM on tiny random configs: parity, exact
edit propagation, generation, the fused projections split at load time, WriteSAE."""

import pytest
import torch

from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.components.gated_deltanet import GatedDeltaNet
from hooked_recurrent.components.mlp import GatedMLP
from hooked_recurrent.components.moe import MoE
from tests.hooked_recurrent.delta_helpers import (
    MULTI_CASES,
    SINGLE_CASES,
    assert_finite_substitution,
    check_generation,
    check_multi_edit,
    check_parity,
    check_single_edit,
    qwen3_next_hf,
    writesae_trains_and_evaluates,
)
from tests.hooked_recurrent.test_qwen3_5_parity import tokens_for

#: value heads = 2 x key heads, top-k 2 of 6, a dense MLP in block 2; 4 x value heads per key
#: head, tied embeddings, top-k 3 of 5 without renormalisation, MoE in every second block
CONFIGS = {
    "gqa-k2": dict(shape="gqa", moe="k2", mlp_only_layers=[2]),
    "tied-k3": dict(shape="tied", moe="k3", norm_topk_prob=False, decoder_sparse_step=2),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = qwen3_next_hf(seed=3, **CONFIGS[request.param])
    return hf, HookedRecurrentModel.from_hf_model(hf)


def test_config_and_blocks(pair):
    hf, model = pair
    assert model.cfg.architecture == "qwen3_next"
    for layer, hf_layer in zip(model.blocks, hf.model.layers, strict=True):
        sparse = type(hf_layer.mlp).__name__ == "Qwen3NextSparseMoeBlock"
        assert isinstance(layer.mlp, MoE if sparse else GatedMLP)
        assert isinstance(layer.attn, GatedDeltaNet) == hasattr(hf_layer, "linear_attn")
        if sparse:
            assert layer.mlp.norm_topk == hf.config.norm_topk_prob


def test_logits_residuals_and_states(pair):
    check_parity(*pair)


@torch.no_grad()
def test_split_projections_are_the_reference_ones(pair):
    """hook_beta and hook_gate of our split layer equal sigmoid(b) and z as HF's own
    `fix_query_key_value_ordering` takes them out of the fused projections."""
    hf, model = pair
    layer = model.cfg.recurrent_layers[-1]
    la = hf.model.layers[layer].linear_attn
    names = [f"blocks.{layer}.{n}" for n in ("ln1.hook_normalized", "attn.hook_beta")]
    names.append(f"blocks.{layer}.attn.hook_gate")
    _, cache = model.run_with_cache(tokens_for(hf, 6), names_filter=names)
    h = cache[names[0]]
    _, _, _, z, b, _ = la.fix_query_key_value_ordering(la.in_proj_qkvz(h), la.in_proj_ba(h))
    assert (cache[names[1]] - torch.sigmoid(b)).abs().max() <= 1e-6
    assert (cache[names[2]] - z).abs().max() <= 1e-6


@torch.no_grad()
def test_to_hf_state_dict_fuses_back(pair):
    from hooked_recurrent.pretrained.qwen3_next import to_hf_state_dict_next

    hf, model = pair
    theirs = hf.state_dict()
    ours = to_hf_state_dict_next(model.state_dict(), model.cfg)
    tied = {"lm_head.weight"} if model.cfg.tie_word_embeddings else set()
    assert set(ours) == set(theirs) - tied
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.fixture(scope="module")
def edit_models():
    hf = qwen3_next_hf(shape="gqa", moe="k2", seed=5)
    return hf, HookedRecurrentModel.from_hf_model(hf)


@pytest.mark.parametrize("case", SINGLE_CASES)
def test_single_edit_matches_brute_force(edit_models, case):
    check_single_edit(*edit_models, case)


@pytest.mark.parametrize("hook_name,case", MULTI_CASES)
def test_multi_position_edits_match_brute_force(edit_models, hook_name, case):
    check_multi_edit(*edit_models, hook_name, case)


def test_greedy_generation_and_hooks_in_generation(edit_models):
    hooks = [
        ("blocks.0.attn.hook_state", lambda x, hook: 0.5 * x),
        ("blocks.3.mlp.hook_expert_out", lambda x, hook: -x),
    ]
    check_generation(*edit_models, hooks)


@torch.no_grad()
def test_save_pretrained_loads(tmp_path, edit_models):
    hf, _ = edit_models
    hf.save_pretrained(tmp_path)
    loaded = HookedRecurrentModel.from_pretrained(str(tmp_path))
    tokens = tokens_for(hf, 11)
    assert (loaded(tokens) - hf(tokens).logits).abs().max() <= 1e-4


def test_writesae_on_hook_write(edit_models):
    _, model = edit_models
    assert_finite_substitution(*writesae_trains_and_evaluates(model, layer=1, head=2))
