"""Generation and stateful forward on Qwen3.5, with hooks live at every step."""

import pytest
import torch

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent.qwen_helpers import qwen_hf


@pytest.fixture(scope="module")
def pair():
    hf = qwen_hf("gqa", seed=7)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf, HookedRecurrentModel.from_hf_model(hf)


@torch.no_grad()
def test_greedy_generation_equals_transformers(pair):
    hf, model = pair
    prompt = torch.randint(2, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    ours = model.generate(prompt, 32, stop_at_eos=False)
    assert ours.shape == (2, 41)
    assert torch.equal(ours, theirs)


@torch.no_grad()
def test_split_forward_equals_whole(pair):
    _, model = pair
    tokens = torch.randint(0, 97, (2, 50))
    whole, state = model(tokens, return_state=True)
    a, s1 = model(tokens[:, :23], return_state=True)
    b, s2 = model(tokens[:, 23:31], state=s1, return_state=True)
    c, s3 = model(tokens[:, 31:], state=s2, return_state=True)
    assert (torch.cat((a, b, c), 1) - whole).abs().max() <= 1e-5
    assert s3.offset == 50
    for l in range(model.cfg.n_layers):
        for key, t in state.layers[l].items():
            assert (s3.layers[l][key] - t).abs().max() <= 1e-5, (l, key)


@torch.no_grad()
def test_state_index_tile_clone_continue_like_separate_runs(pair):
    """RecurrentState.index_batch / tile / clone / to: continuing from the derived state equals
    running the corresponding rows from the start."""
    _, model = pair
    tokens = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(5))
    whole = model(tokens)
    _, state = model(tokens[:, :12], return_state=True)
    rows = torch.tensor([2, 0])
    part = model(tokens[rows, 12:], state=state.index_batch(rows))
    assert (part - whole[rows, 12:]).abs().max() <= 1e-5
    tiled = model(tokens[:, 12:].repeat(2, 1), state=state.tile(2))
    assert (tiled - whole[:, 12:].repeat(2, 1, 1)).abs().max() <= 1e-5
    copy = state.clone().to("cpu")
    for layer in state.layers:
        for t in layer.values():
            t.zero_()  # the clone does not share memory with the original
    again = model(tokens[:, 12:], state=copy)
    assert (again - whole[:, 12:]).abs().max() <= 1e-5


def _argmax_rollout_check(model, prompt, n_new, hooks):
    """Generate with hooks; each new token must be the argmax of run_with_hooks on the result."""
    out = model.generate(prompt, n_new, stop_at_eos=False, fwd_hooks=hooks)
    logits = model.run_with_hooks(out, fwd_hooks=hooks)
    P = prompt.shape[1]
    assert torch.equal(logits[:, P - 1 : -1].argmax(-1), out[:, P:])
    return out


@torch.no_grad()
def test_hooks_in_generation_match_run_with_hooks(pair):
    _, model = pair
    prompt = torch.randint(2, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    P, layer = 10, 0

    def ablate_prompt_position(x, hook):
        hit = hook.positions == 4
        return x * (~hit).view(1, -1, 1, 1, 1).to(x.dtype)

    def edit_generated(x, hook):
        on = (hook.positions >= P).view(1, -1, 1, 1, 1).to(x.dtype)
        return x + 2.0 * on * torch.ones_like(x) / x.shape[-1]

    calls = []

    def count(x, hook):
        calls.append(x.shape[1])

    clean = model.generate(prompt, 12, stop_at_eos=False)
    a = _argmax_rollout_check(
        model, prompt, 12, [(f"blocks.{layer}.attn.hook_write", ablate_prompt_position)]
    )
    b = _argmax_rollout_check(
        model, prompt, 12, [(f"blocks.{layer}.attn.hook_write", edit_generated)]
    )
    model.generate(prompt, 12, stop_at_eos=False, fwd_hooks=[("blocks.1.attn.hook_state", count)])
    assert calls == [P] + [1] * 11  # the prompt, then one step per new token but the last
    assert not torch.equal(b, clean)  # the edit acted
    del a


@torch.no_grad()
def test_ablating_all_writes_changes_generation(pair):
    _, model = pair
    prompt = torch.randint(2, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    clean = model.generate(prompt, 16, stop_at_eos=False)
    hooks = [
        (f"blocks.{l}.attn.hook_write", lambda x, hook: torch.zeros_like(x))
        for l in model.cfg.recurrent_layers
    ]
    ablated = _argmax_rollout_check(model, prompt, 16, hooks)
    assert not torch.equal(clean, ablated)
    # and it is what running the hooked model on the clean text predicts differently
    assert (model.run_with_hooks(clean, fwd_hooks=hooks) - model(clean)).abs().max() > 1e-2
