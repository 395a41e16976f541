"""Hook behaviour users rely on: names, shapes, lazy matrix hooks, positions."""

import logging

import pytest
import torch
from qwen_helpers import qwen_hf

from hooked_recurrent import HookedRecurrentModel


@pytest.fixture(scope="module")
def model():
    return HookedRecurrentModel.from_hf_model(qwen_hf("gqa", seed=2))


def test_unknown_hook_lists_close_matches(model):
    with pytest.raises(KeyError, match="did you mean 'blocks.1.attn.hook_write'"):
        model.run_with_hooks(
            torch.zeros(1, 3, dtype=torch.long),
            fwd_hooks=[("blocks.1.attn.hook_wrte", lambda x, hook: x)],
        )
    with pytest.raises(KeyError, match="blocks.1.attn.hook_state"):
        model.run_with_cache(
            torch.zeros(1, 3, dtype=torch.long), names_filter=["blocks.1.attn.hook_stat"]
        )


def test_wrong_shape_names_hook_and_shape(model):
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_write.*\(1, 5, 4, 16, 24\)"):
        model.run_with_hooks(
            torch.zeros(1, 5, dtype=torch.long),
            fwd_hooks=[("blocks.0.attn.hook_write", lambda x, hook: x[:, :, 0])],
        )
    with pytest.raises(ValueError, match="dtype"):
        model.run_with_hooks(
            torch.zeros(1, 5, dtype=torch.long),
            fwd_hooks=[("blocks.0.attn.hook_v", lambda x, hook: x.double())],
        )


def test_default_cache_leaves_out_matrix_hooks_and_says_so(model, caplog):
    import hooked_recurrent.model as hm

    hm._told_about_matrix_hooks = False
    tokens = torch.randint(0, 97, (2, 6))
    with caplog.at_level(logging.WARNING):
        _, cache = model.run_with_cache(tokens)
        model.run_with_cache(tokens)
    assert sum("names_filter" in r.message for r in caplog.records) == 1
    assert not any(k.endswith(("hook_write", "hook_state")) for k in cache.keys())
    assert "blocks.0.attn.hook_read" in cache.keys()
    _, cache = model.run_with_cache(
        tokens, names_filter=["blocks.0.attn.hook_write", "blocks.0.attn.hook_ssm_state"]
    )
    assert set(cache.keys()) == {"blocks.0.attn.hook_write", "blocks.0.attn.hook_state"}
    # the cached write is beta k v^T, from the cached factors
    _, fac = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.0.attn."))
    w = fac["blocks.0.attn.hook_beta"][..., None, None] * torch.einsum(
        "bphk,bphv->bphkv", fac["blocks.0.attn.hook_k"], fac["blocks.0.attn.hook_v"]
    )
    assert (cache["blocks.0.attn.hook_write"] - w).abs().max() <= 1e-6


def test_cached_matrix_hooks_do_not_change_outputs(model):
    tokens = torch.randint(0, 97, (2, 30))
    clean = model(tokens)
    logits, _ = model.run_with_cache(
        tokens, names_filter=lambda n: n.endswith(("hook_write", "hook_state"))
    )
    assert torch.equal(clean, logits)


def test_positions_and_native_state(model):
    tokens = torch.randint(0, 97, (1, 12))
    seen = {}

    def hook(x, hook):
        seen["pos"] = hook.positions.clone()
        seen["native"] = hook.native_state(head=2)
        return torch.zeros_like(x)  # delete every write: native_state must not see this

    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_state"])
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_write", hook)])
    assert seen["pos"].tolist() == list(range(12))
    assert (seen["native"] - cache["blocks.0.attn.hook_state"][:, :, 2]).abs().max() <= 1e-5
    # positions continue after a state prefix
    _, state = model(tokens[:, :7], return_state=True)
    model.run_with_hooks(tokens[:, 7:], state=state, fwd_hooks=[("blocks.0.attn.hook_write", hook)])
    assert seen["pos"].tolist() == list(range(7, 12))


@pytest.mark.parametrize("name", ["hook_write", "hook_state", "hook_decay", "hook_beta", "hook_k"])
def test_in_place_edits_act_like_returned_copies(model, name):
    """TransformerLens users often edit the tensor in place and return it: that must count."""
    tokens = torch.randint(0, 97, (2, 20))

    def in_place(x, hook):
        x[:, 5] *= 0.25
        return x

    def copied(x, hook):
        x = x.clone()
        x[:, 5] *= 0.25
        return x

    a = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.0.attn.{name}", in_place)])
    b = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.0.attn.{name}", copied)])
    assert torch.equal(a, b)
    assert (a - model(tokens)).abs().max() > 1e-4
