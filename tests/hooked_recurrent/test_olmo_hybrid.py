"""OLMo hybrid against transformers' OlmoHybridForCausalLM on tiny random configs: parity, beta in
(0, 2), post-norm attention blocks, exact edit propagation, generation, checkpoints, WriteSAE."""

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
    olmo_hybrid_hf,
    writesae_trains_and_evaluates,
)
from tests.hooked_recurrent.test_qwen3_5_parity import tokens_for

#: value heads = 2 x key heads, GQA attention with RoPE; equal heads, d_k != d_v, NoPE attention
#: first, conv kernel 3
SHAPES = {
    "gqa-rope": (
        dict(
            hidden_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=12,
            linear_value_head_dim=16,
        ),
        True,
    ),
    "nope": (
        dict(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            linear_num_key_heads=4,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=12,
            linear_conv_kernel_dim=3,
            layer_types=["full_attention", "linear_attention", "linear_attention"],
        ),
        False,
    ),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request):
    shape, rope = SHAPES[request.param]
    hf = olmo_hybrid_hf(shape, seed=3, rope=rope)
    return hf, HookedRecurrentModel.from_hf_model(hf)


def test_config_and_blocks(pair):
    hf, model = pair
    assert model.cfg.architecture == "olmo_hybrid"
    assert model.cfg.positional_embedding_type == ("rotary" if hf.model.rotary_emb else "none")
    for block, t in zip(model.blocks, hf.config.layer_types, strict=True):
        assert (block.ln1_post is None) == (t == "linear_attention")
    # TransformerLens weight views of the (ungated) attention layers
    la = hf.model.layers[model.cfg.attention_layers[0]].self_attn
    W_Q = la.q_proj.weight.view(model.cfg.attn_n_heads, model.cfg.d_head, -1).transpose(-1, -2)
    assert torch.equal(model.W_Q[0], W_Q)
    with pytest.raises(NotApplicableError, match="output gate"):
        _ = model.W_gate_attn


def test_logits_residuals_and_states(pair):
    check_parity(*pair)


@torch.no_grad()
def test_beta_reaches_past_one(pair):
    """hook_beta is 2 sigmoid(b): it exceeds 1 somewhere (negative eigenvalues are in play)."""
    hf, model = pair
    layer = model.cfg.recurrent_layers[0]
    name = f"blocks.{layer}.attn.hook_beta"
    _, cache = model.run_with_cache(tokens_for(hf, 20), names_filter=[name])
    beta = cache[name]
    assert 0 < beta.min() and beta.max() < 2 and beta.max() > 1


@pytest.fixture(scope="module")
def edit_models():
    return pair_for("gqa-rope", seed=5)


def pair_for(name: str, seed: int):
    shape, rope = SHAPES[name]
    hf = olmo_hybrid_hf(shape, seed=seed, rope=rope)
    return hf, HookedRecurrentModel.from_hf_model(hf)


#: hook_beta:all, not :head: one head's beta moved to 0.97 barely reaches these logits
@pytest.mark.parametrize("case", [*SINGLE_CASES[:2], "hook_beta:all"])
def test_single_edit_matches_brute_force(edit_models, case):
    check_single_edit(*edit_models, case)


@pytest.mark.parametrize("hook_name,case", MULTI_CASES)
def test_multi_position_edits_match_brute_force(edit_models, hook_name, case):
    check_multi_edit(*edit_models, hook_name, case)


def test_greedy_generation_and_hooks_in_generation(edit_models):
    hooks = [
        ("blocks.1.attn.hook_write", lambda x, hook: -x),
        ("blocks.3.ln1_post.hook_normalized", lambda x, hook: 0.5 * x),
    ]
    check_generation(*edit_models, hooks)


@torch.no_grad()
def test_checkpoint_layouts_and_round_trip(tmp_path, edit_models):
    """save_pretrained writes the published names (attention_layer_norm, q/k/v_conv1d); they load,
    and to_hf_state_dict gives back the in-memory names."""
    from safetensors.torch import load_file

    from hooked_recurrent.pretrained.olmo_hybrid import to_hf_state_dict

    hf, model = edit_models
    hf.save_pretrained(tmp_path)
    assert any("q_conv1d" in k for k in load_file(str(tmp_path / "model.safetensors")))
    loaded = HookedRecurrentModel.from_pretrained(str(tmp_path))
    tokens = tokens_for(hf, 11)
    assert (loaded(tokens) - hf(tokens).logits).abs().max() <= 1e-4
    theirs = hf.state_dict()
    ours = to_hf_state_dict(model.state_dict(), model.cfg)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_writesae_on_hook_write(edit_models):
    _, model = edit_models
    assert_finite_substitution(*writesae_trains_and_evaluates(model, layer=1, head=3))
