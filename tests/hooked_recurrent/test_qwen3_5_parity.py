"""Qwen3.5 against transformers' Qwen3_5ForCausalLM on tiny random configs."""

import pytest
import torch

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent.qwen_helpers import QWEN_CONFIGS, qwen_hf

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


def tokens_for(hf, length: int) -> torch.Tensor:
    """The seeded token batch of these tests (2 sequences)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, hf.config.vocab_size, (2, length), generator=g)


@torch.no_grad()
def parity_diffs(hf, model, tokens) -> dict[str, float]:
    """Largest |ours - transformers| of the logits, of every layer's output (hook_resid_post
    against a forward hook on the HF layer), of the final recurrent states (hook_state at the last
    position, and the state returned for continuation, against HF's cache)."""
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
    _, state = model(tokens, return_state=True)
    rec = model.cfg.recurrent_layers
    theirs = {l: ref.past_key_values.layers[l].recurrent_states[0] for l in rec}
    return dict(
        logits=(logits - ref.logits).abs().max().item(),
        resid_post=max(
            (cache[f"blocks.{l}.hook_resid_post"] - captured[l]).abs().max().item()
            for l in range(model.cfg.n_layers)
        ),
        final_state=max(
            (cache[f"blocks.{l}.attn.hook_state"][:, -1] - theirs[l]).abs().max().item()
            for l in model.cfg.recurrent_layers
        ),
        returned_state=max(
            (state.layers[l]["S"] - theirs[l]).abs().max().item()
            for l in model.cfg.recurrent_layers
        ),
    )


@torch.no_grad()
def per_position_state_diff(hf, model, tokens) -> float:
    """Largest |hook_state at position t - HF's state after decoding tokens[:, :t+1] one token at
    a time|, over positions and recurrent layers."""
    names = [f"blocks.{l}.attn.hook_state" for l in model.cfg.recurrent_layers]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    past, worst = None, 0.0
    for t in range(tokens.shape[1]):
        past = hf(tokens[:, t : t + 1], past_key_values=past, use_cache=True).past_key_values
        for l in model.cfg.recurrent_layers:
            d = cache[f"blocks.{l}.attn.hook_state"][:, t] - past.layers[l].recurrent_states[0]
            worst = max(worst, d.abs().max().item())
    return worst


def test_logits_residuals_and_final_state(pair):
    name, hf, model = pair
    d = parity_diffs(hf, model, tokens_for(hf, T))
    assert d["logits"] <= 1e-4 and d["resid_post"] <= 1e-4, d
    assert d["final_state"] <= 1e-5 and d["returned_state"] <= 1e-5, d


def test_per_position_state_against_one_token_decode(pair):
    name, hf, model = pair
    assert per_position_state_diff(hf, model, tokens_for(hf, 12)) <= 1e-5


@torch.no_grad()
def test_every_hook_fires(pair):
    name, hf, model = pair
    tokens = torch.randint(0, hf.config.vocab_size, (1, 9))
    fired = set()
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hook: fired.add(hook.name))])
    assert fired == set(model.hook_dict)
