"""Qwen3.5-MoE against transformers' Qwen3_5MoeForCausalLM on tiny random configs: parity, exact
edit propagation, generation, the multimodal checkpoint layout, WriteSAE."""

import json

import pytest
import torch

from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.config import NotApplicableError
from tests.hooked_recurrent.delta_helpers import (
    MULTI_CASES,
    SINGLE_CASES,
    assert_finite_substitution,
    check_generation,
    check_multi_edit,
    check_parity,
    check_single_edit,
    qwen3_5_moe_hf,
    qwen3_5_moe_text_config,
    randomise_moe,
    writesae_trains_and_evaluates,
)
from tests.hooked_recurrent.test_qwen3_5_parity import tokens_for

#: (Qwen3.5 shape, MoE shape): value heads = 2 x key heads with top-k 2 of 6; 4 x value heads,
#: tied embeddings, top-k 3 of 5
CONFIGS = {"gqa-k2": ("gqa", "k2"), "tied-k3": ("tied", "k3")}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = qwen3_5_moe_hf(*CONFIGS[request.param], seed=3)
    return hf, HookedRecurrentModel.from_hf_model(hf)


def test_config_and_moe_blocks(pair):
    hf, model = pair
    c = hf.config
    assert model.cfg.architecture == "qwen3_5_moe"
    assert model.cfg.moe_layers == list(range(c.num_hidden_layers))
    moe = model.blocks[0].mlp
    assert (moe.n_experts, moe.top_k) == (c.num_experts, c.num_experts_per_tok)
    # TransformerLens weight views: attention weights stack; MLP weights point to the experts
    n_attn = len(model.cfg.attention_layers)
    assert model.W_Q.shape == (n_attn, c.num_attention_heads, c.hidden_size, c.head_dim)
    with pytest.raises(NotApplicableError, match="experts"):
        _ = model.W_in


def test_logits_residuals_and_states(pair):
    check_parity(*pair)


@torch.no_grad()
def test_router_hooks_match_transformers(pair):
    """hook_router_logits is the HF router's logits; the chosen experts are the HF router's."""
    hf, model = pair
    tokens = tokens_for(hf, 9)
    seen = {}
    router = hf.model.layers[0].mlp.gate
    handle = router.register_forward_hook(lambda m, i, out: seen.__setitem__("hf", out))
    hf(tokens, use_cache=False)
    handle.remove()
    names = ["blocks.0.mlp.hook_router_logits", "blocks.0.mlp.hook_expert_indices"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    logits, _, idx = seen["hf"]
    assert (cache[names[0]].reshape(logits.shape) - logits).abs().max() <= 1e-5
    ours = cache[names[1]].reshape(idx.shape).sort(-1).values
    assert torch.equal(ours, idx.sort(-1).values)


@pytest.fixture(scope="module")
def edit_models():
    hf = qwen3_5_moe_hf("gqa", "k2", seed=5)
    return hf, HookedRecurrentModel.from_hf_model(hf)


@pytest.mark.parametrize("case", SINGLE_CASES)
def test_single_edit_matches_brute_force(edit_models, case):
    check_single_edit(*edit_models, case)


@pytest.mark.parametrize("hook_name,case", MULTI_CASES)
def test_multi_position_edits_match_brute_force(edit_models, hook_name, case):
    check_multi_edit(*edit_models, hook_name, case)


def test_greedy_generation_and_hooks_in_generation(edit_models):
    def drop_expert(x, hook):  # zero the first chosen expert's weight at generated positions
        on = (hook.positions >= 9).view(1, -1, 1).to(x.dtype)
        return x * (1 - on * torch.tensor([1.0, 0.0], dtype=x.dtype))

    hooks = [
        ("blocks.1.attn.hook_write", lambda x, hook: 1.5 * x),
        ("blocks.2.mlp.hook_expert_weights", drop_expert),
    ]
    check_generation(*edit_models, hooks)


@torch.no_grad()
def test_multimodal_checkpoint(tmp_path):
    """The published layout: Qwen3_5MoeForConditionalGeneration (`model.language_model.*`, a
    vision tower), experts saved one by one; it loads and gives the text model's logits."""
    from transformers import (
        Qwen3_5MoeConfig,
        Qwen3_5MoeForCausalLM,
        Qwen3_5MoeForConditionalGeneration,
    )

    text = qwen3_5_moe_text_config("equal", "k3").to_dict()
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=text["hidden_size"],
    )
    torch.manual_seed(4)
    vlm = Qwen3_5MoeForConditionalGeneration(
        Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    ).eval()
    randomise_moe(vlm, seed=4)
    vlm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3_5_moe"
    model = HookedRecurrentModel.from_pretrained(str(tmp_path))
    assert model.cfg.architecture == "qwen3_5_moe"
    ref = Qwen3_5MoeForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = torch.randint(0, text["vocab_size"], (2, 13))
    assert (model(tokens) - ref(tokens).logits).abs().max() <= 1e-4
    assert (model(tokens) - vlm(input_ids=tokens).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_save_pretrained_and_to_hf_state_dict_round_trip(tmp_path, edit_models):
    from hooked_recurrent.pretrained.qwen3_5 import to_hf_state_dict

    hf, model = edit_models
    hf.save_pretrained(tmp_path)
    loaded = HookedRecurrentModel.from_pretrained(str(tmp_path))
    tokens = tokens_for(hf, 11)
    assert (loaded(tokens) - hf(tokens).logits).abs().max() <= 1e-4
    theirs = hf.state_dict()
    ours = to_hf_state_dict(model.state_dict(), model.cfg)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_writesae_on_hook_write(edit_models):
    _, model = edit_models
    assert_finite_substitution(*writesae_trains_and_evaluates(model, layer=1, head=1))
