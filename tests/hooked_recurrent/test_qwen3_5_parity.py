"""Qwen3.5 against transformers' Qwen3_5ForCausalLM on tiny random configs."""

import pytest
import torch
from qwen_helpers import QWEN_CONFIGS, qwen_hf

from hooked_recurrent import HookedRecurrentModel

T = 70  # chunk size 64: one full chunk plus a partial one


@pytest.fixture(scope="module", params=list(QWEN_CONFIGS))
def pair(request):
    hf = qwen_hf(request.param, seed=3)
    return request.param, hf, HookedRecurrentModel.from_hf_model(hf)


def test_config_fields(pair):
    name, hf, model = pair
    c = hf.config
    assert model.cfg.architecture == "qwen3_5"
    assert model.cfg.n_heads == c.linear_num_value_heads
    assert (model.cfg.d_k, model.cfg.d_v) == (c.linear_key_head_dim, c.linear_value_head_dim)
    assert model.cfg.layer_types == [
        "recurrent" if t == "linear_attention" else "attention" for t in c.layer_types
    ]


@torch.no_grad()
def test_logits_residuals_and_final_state(pair):
    name, hf, model = pair
    tokens = torch.randint(0, hf.config.vocab_size, (2, T))
    captured = {}
    handles = [
        layer.register_forward_hook(
            lambda mod, inp, out, i=i: captured.__setitem__(
                i, out[0] if isinstance(out, tuple) else out
            )
        )
        for i, layer in enumerate(hf.model.layers)
    ]
    ref = hf(tokens, use_cache=True)
    for h in handles:
        h.remove()
    state_names = [f"blocks.{l}.attn.hook_state" for l in model.cfg.recurrent_layers]
    logits, cache = model.run_with_cache(
        tokens, names_filter=lambda n: n.endswith("hook_resid_post") or n in state_names
    )
    assert (logits - ref.logits).abs().max() <= 1e-4
    for l in range(model.cfg.n_layers):
        assert (cache[f"blocks.{l}.hook_resid_post"] - captured[l]).abs().max() <= 1e-4, l
    for l in model.cfg.recurrent_layers:
        theirs = ref.past_key_values.layers[l].recurrent_states[0]
        assert (cache[f"blocks.{l}.attn.hook_state"][:, -1] - theirs).abs().max() <= 1e-5, l
    # the state returned for continuation is the same final state
    _, state = model(tokens, return_state=True)
    for l in model.cfg.recurrent_layers:
        theirs = ref.past_key_values.layers[l].recurrent_states[0]
        assert (state.layers[l]["S"] - theirs).abs().max() <= 1e-5


@torch.no_grad()
def test_per_position_state_against_one_token_decode(pair):
    name, hf, model = pair
    T_dec = 12
    tokens = torch.randint(0, hf.config.vocab_size, (2, T_dec))
    names = [f"blocks.{l}.attn.hook_state" for l in model.cfg.recurrent_layers]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    past = None
    for t in range(T_dec):
        out = hf(tokens[:, t : t + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        for l in model.cfg.recurrent_layers:
            theirs = past.layers[l].recurrent_states[0]
            ours = cache[f"blocks.{l}.attn.hook_state"][:, t]
            assert (ours - theirs).abs().max() <= 1e-5, (l, t)


@torch.no_grad()
def test_every_hook_fires(pair):
    name, hf, model = pair
    tokens = torch.randint(0, hf.config.vocab_size, (1, 9))
    fired = set()
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hook: fired.add(hook.name))])
    assert fired == set(model.hook_dict)
