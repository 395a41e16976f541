"""Hook behaviour users rely on: names, shapes, lazy matrix hooks, positions."""

import logging

import pytest
import torch

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent.qwen_helpers import qwen_hf


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


def test_cache_equals_transformer_lens_caching_hooks(model):
    """`run_with_cache` collects activations without registering hooks; TransformerLens's own
    caching hooks (used for its extra options, e.g. `device`) must give the same cache, also
    with an editing hook attached (the cache holds what the point passes on, after the edit)."""
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))

    def halve(x, hook):
        return x * 0.5

    for hooks in ([], [("blocks.0.attn.hook_v", halve), ("blocks.1.attn.hook_write", halve)]):
        with model.hooks(fwd_hooks=hooks):
            names = lambda n: not n.endswith("hook_state")  # noqa: E731
            logits, fast = model.run_with_cache(tokens, names_filter=names)
            logits_tl, slow = model.run_with_cache(tokens, names_filter=names, device="cpu")
        assert torch.equal(logits, logits_tl)
        assert list(fast.keys()) == list(slow.keys())
        assert "blocks.1.attn.hook_write" in fast.keys()
        for name in fast.keys():
            assert torch.equal(fast[name], slow[name]), name
        if hooks:
            assert torch.equal(fast["blocks.0.attn.hook_v"], slow["blocks.0.attn.hook_v"])
            plain = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_v"])[1]
            assert torch.equal(fast["blocks.0.attn.hook_v"], plain["blocks.0.attn.hook_v"] * 0.5)
    assert not any(hp._cache is not None for hp in model.hook_dict.values())


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


@pytest.mark.parametrize("name", ["hook_write", "hook_state"])
@pytest.mark.parametrize("returned", ["view", "reshape", "flat_view_back", "slice"])
@torch.no_grad()
def test_in_place_edit_returning_a_view_acts_like_a_copy(model, name, returned):
    """A hook may edit in place and return a view of the same storage, not the tensor itself."""
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(21))
    d = torch.outer(torch.linspace(-1, 1, model.cfg.d_k), torch.linspace(0.5, -0.5, model.cfg.d_v))

    def edit(x):
        x[0, 5, 1] += d
        x[1, 9, 3] *= 0.25
        x[1, 12, 0] -= d

    def as_view(x):
        return {
            "view": lambda: x.view(x.shape),
            "reshape": lambda: x.reshape(x.shape),
            "flat_view_back": lambda: x.flatten(0, 2).view(x.shape),
            "slice": lambda: x[:],
        }[returned]()

    def viewed(x, hook):
        edit(x)
        out = as_view(x)
        assert out is not x and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        return out

    def copied(x, hook):
        x = x.clone()
        edit(x)
        return x

    hook = f"blocks.0.attn.{name}"
    a = model.run_with_hooks(tokens, fwd_hooks=[(hook, viewed)])
    b = model.run_with_hooks(tokens, fwd_hooks=[(hook, copied)])
    clean = model(tokens)
    assert torch.equal(a, b)
    assert (a - clean).abs().max() > 1e-3
    assert torch.equal(a[:, :5], clean[:, :5])
    # a view returned without an edit changes nothing
    same = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda x, hook: as_view(x))])
    assert torch.equal(same, clean)


def _native_writes(model, tokens):
    """Every layer's hook_write (beta k v^T) rebuilt from the cached factors, in fresh memory."""
    _, fac = model.run_with_cache(
        tokens, names_filter=lambda n: n.endswith(("hook_beta", "hook_k", "hook_v"))
    )
    out = {}
    for name in fac:
        if name.endswith("hook_beta"):
            p = name.rsplit(".", 1)[0]
            write_k = fac[name][..., None] * fac[f"{p}.hook_k"]
            out[f"{p}.hook_write"] = write_k[..., :, None] * fac[f"{p}.hook_v"][..., None, :]
    return out


def _write_hooks(model, fn):
    return [(n, fn) for n in model.hook_dict if n.endswith("attn.hook_write")]


@torch.no_grad()
def test_cached_writes_survive_later_runs(model):
    """The reused write buffer is never written while a cache still holds the writes."""
    gen = torch.Generator().manual_seed(22)
    t1, t2, t3 = (torch.randint(0, 97, (2, 20), generator=gen) for _ in range(3))
    t4 = torch.randint(0, 97, (1, 11), generator=gen)  # smaller: would fit in a held block
    _, cache = model.run_with_cache(t1, names_filter=lambda n: n.endswith("hook_write"))
    kept = {n: cache[n] for n in cache.keys()}
    assert len(kept) >= 2
    copies = {n: x.clone() for n, x in kept.items()}
    native = _native_writes(model, t1)
    assert kept.keys() == native.keys()
    for n in kept:
        assert torch.equal(kept[n], native[n]), n

    def read_only(x, hook):
        x.sum()

    def in_place(x, hook):
        x[:, 3, 1] *= 2.0
        return x

    def copied(x, hook):
        x = x.clone()
        x[:, 3, 1] *= 2.0
        return x

    for tokens, fn in ((t2, read_only), (t3, in_place), (t2, copied), (t4, read_only)):
        model.run_with_hooks(tokens, fwd_hooks=_write_hooks(model, fn))
        model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_write"))
    for n in kept:
        assert torch.equal(kept[n], copies[n]), n


@torch.no_grad()
def test_hook_keeping_the_write_itself_keeps_its_values(model):
    """A read-only hook that stores `x` itself (no copy) keeps the values it was given."""
    gen = torch.Generator().manual_seed(23)
    runs = [torch.randint(0, 97, (2, 20), generator=gen) for _ in range(3)]
    runs.append(torch.randint(0, 97, (1, 9), generator=gen))
    held = []

    def keep(x, hook):
        held.append((hook.name, x))

    for tokens in runs:
        model.run_with_hooks(tokens, fwd_hooks=_write_hooks(model, keep))
    n_layers = len(_write_hooks(model, keep))
    assert len(held) == n_layers * len(runs)
    for i, tokens in enumerate(runs):
        native = _native_writes(model, tokens)
        for name, x in held[i * n_layers : (i + 1) * n_layers]:
            assert torch.equal(x, native[name]), (i, name)
