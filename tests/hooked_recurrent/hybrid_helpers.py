"""Checks shared by the Mamba-2 hybrid families' tests (Bamba, Nemotron-H, ...), each against an
independent reference: the `transformers` model (logits, hidden states, caches, one-token decode,
greedy generate) and a float64 copy of it whose Mamba-2 mixers are replaced by the plain loop
`mamba_helpers.brute_mamba2_mixer` (edit propagation). Each returns the measured numbers; the
family's test file asserts on them.
"""

from __future__ import annotations

import copy
import math

import torch

from tests.hooked_recurrent.mamba_helpers import brute_mamba2_mixer


def tokens(vocab: int, batch: int = 2, T: int = 23, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


def hf_mixers(hf) -> dict[int, torch.nn.Module]:
    """The Hugging Face model's Mamba-2 mixers by layer index."""
    return {m.layer_idx: m for m in hf.modules() if hasattr(m, "A_log") and hasattr(m, "in_proj")}


def brute_logits(hf, toks: torch.Tensor, edit=None) -> torch.Tensor:
    """Logits of a float64 copy of `hf` whose Mamba-2 mixers run `brute_mamba2_mixer` (with
    `edit`); attention, MLPs, norms and the block structure stay the `transformers` code."""
    ref = copy.deepcopy(hf).double()
    ref.set_experts_implementation("eager")  # the grouped-GEMM experts take no float64
    for layer, m in hf_mixers(ref).items():

        def forward(hidden_states, *args, _m=m, _layer=layer, **kwargs):
            return brute_mamba2_mixer(_m, hidden_states, _layer, edit)

        m.forward = forward
    with torch.no_grad():
        return ref(toks, use_cache=False).logits


def _cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def hf_parity(hf, model, toks: torch.Tensor) -> dict:
    """max |difference| to HF: "logits"; per block "resid_post" (hook_resid_post vs HF's hidden
    states); per recurrent layer "state" (final state vs HF's cache, transposed)."""
    with torch.no_grad():
        out = hf(toks, output_hidden_states=True, use_cache=True)
        logits, cache = model.run_with_cache(
            toks, names_filter=lambda n: n.endswith("resid_post") or n == "blocks.0.hook_resid_pre"
        )
        _, state = model(toks, return_state=True)
    L = model.cfg.n_layers
    hs = out.hidden_states
    # the (scaled) embeddings first, then every block's output but the last (its norm comes
    # last), or every block's output
    first = 1 if torch.equal(hs[0], cache["blocks.0.hook_resid_pre"]) else 0
    resid = [
        (cache[f"blocks.{layer}.hook_resid_post"] - hs[layer + first]).abs().max().item()
        for layer in range(L - first)
    ]
    states = [
        (state.layers[layer]["S"] - _cache(out).get_recurrent_state(layer).transpose(-1, -2))
        .abs()
        .max()
        .item()
        for layer in model.cfg.recurrent_layers
    ]
    return {
        "logits": (logits - out.logits).abs().max().item(),
        "resid_post": resid,
        "state": states,
    }


def decode_state_diffs(hf, model, toks: torch.Tensor) -> list[float]:
    """Per recurrent layer, max |hook_state - HF's state after one-token decode steps|."""
    layers = model.cfg.recurrent_layers
    ref = {layer: [] for layer in layers}
    with torch.no_grad():
        cache = None
        for t in range(toks.shape[1]):
            out = hf(toks[:, t : t + 1], cache=cache, use_cache=True)
            cache = _cache(out)
            for layer in layers:
                ref[layer].append(cache.get_recurrent_state(layer).clone())
        _, ours = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_state"))
    return [
        (ours[f"blocks.{layer}.attn.hook_state"] - torch.stack(ref[layer], 1).transpose(-1, -2))
        .abs()
        .max()
        .item()
        for layer in layers
    ]


#: (batch, position, head) triples of the several-position edits (head taken mod n_heads)
MULTI = [(1, 4, 2), (0, 11, 0), (1, 11, 1), (0, 17, 1)]


def _deltas(cfg, n: int, seed: int) -> list[torch.Tensor]:
    """Alternately rank-1 and dense changes of one head's `[d_k, d_v]` matrix."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append(0.3 * torch.randn(cfg.d_k, cfg.d_v, generator=g))
        else:
            out.append(
                torch.outer(torch.randn(cfg.d_k, generator=g), torch.randn(cfg.d_v, generator=g))
            )
    return out


def edit_result(hf, model, layer: int, hook_name: str, triples, toks: torch.Tensor) -> tuple:
    """Additive edits at the (batch, pos, head) `triples` of blocks.{layer}.attn.{hook_name}
    against the brute force; returns (max |logits - brute force|, every row's logits before its
    first edit bit-equal to the clean run, max |logits after the last edit - clean|)."""
    triples = [(b, t, h % model.cfg.n_heads) for b, t, h in triples]
    deltas = _deltas(model.cfg, len(triples), seed=layer + 16)

    def hook(x, hook):
        x = x.clone()
        for (b, t, h), d in zip(triples, deltas, strict=True):
            x[b, t, h] += d
        return x

    ref_name = hook_name.removeprefix("hook_")

    def edit(lj, pos, name, x):
        if lj != layer or name != ref_name:
            return x
        x = x.clone()
        for (b, t, h), d in zip(triples, deltas, strict=True):
            if t == pos:
                x[b, h] += d.double()
        return x

    with torch.no_grad():
        clean = model(toks)
        edited = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{layer}.attn.{hook_name}", hook)])
    expected = brute_logits(hf, toks, edit)
    diff = (edited.double() - expected).abs().max().item()
    earlier = all(
        torch.equal(edited[b, :first], clean[b, :first])
        for b in {b for b, _, _ in triples}
        for first in [min(t for bb, t, _ in triples if bb == b)]
    )
    last = max(t for _, t, _ in triples)
    return diff, earlier, (edited[:, last + 1 :] - clean[:, last + 1 :]).abs().max().item()


def generation_matches(hf, model, prompt: torch.Tensor, n: int = 32) -> bool:
    """Greedy `model.generate` equals `hf.generate`, token for token."""
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        ref = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False
        )
        ours = model.generate(prompt, n)
    return ours.shape == ref.shape == (prompt.shape[0], prompt.shape[1] + n) and torch.equal(
        ours, ref
    )


def generation_hooks_match(model, prompt: torch.Tensor, n: int = 10) -> dict:
    """Hooks in generation against `run_with_hooks` on the final sequence: a write edit keyed on
    absolute positions, and what hook_state / hook_write / hook_z see at every step.

    Returns "tokens" (the greedy tokens of the full forward pass equal the generated ones),
    "effect" (max |state seen in generation - the state without the edit|: the edit is live) and
    "state"/"write" (max |hook value seen in generation - in the full pass| over the generated
    positions, relative to max |value|)."""
    layer = model.cfg.recurrent_layers[-1]
    g = torch.Generator().manual_seed(12)
    c = model.cfg
    atom = 10.0 * torch.randn(c.d_k, generator=g)[:, None] * torch.randn(c.d_v, generator=g)
    T0 = prompt.shape[1]
    targets = {T0 - 2, T0 + 1, T0 + 4}

    def install(x, hook):
        hit = [i for i, p in enumerate(hook.positions.tolist()) if p in targets]
        if not hit:
            return x
        x = x.clone()
        x[:, hit] += atom  # every head
        return x

    seen: dict[str, list] = {"state": [], "write": []}

    def record(name):
        def hook(x, hook):
            seen[name].append(x.detach().clone())
            return x

        return hook

    a = f"blocks.{layer}.attn."
    hooks = [(a + "hook_write", install)]
    watch = [(a + "hook_state", record("state")), (a + "hook_write", record("write"))]
    with torch.no_grad():
        out = model.generate(prompt, n, fwd_hooks=hooks + watch)
        _, plain = model.run_with_cache(out, names_filter=[a + "hook_state"])
        with model.hooks(fwd_hooks=hooks):
            logits, cache = model.run_with_cache(
                out, names_filter=[a + "hook_state", a + "hook_write"], reset_hooks_end=False
            )
    full = {k: cache[a + "hook_" + k][:, : out.shape[1] - 1] for k in seen}
    diffs = {
        k: ((torch.cat(v, 1) - full[k]).abs().max() / full[k].abs().max()).item()
        for k, v in seen.items()
    }
    unhooked = plain[a + "hook_state"][:, : out.shape[1] - 1]
    return {
        "tokens": torch.equal(logits[:, T0 - 1 : -1].argmax(-1), out[:, T0:]),
        "effect": (torch.cat(seen["state"], 1) - unhooked).abs().max().item(),
        **diffs,
    }


def writesae_runs(model, vocab: int) -> dict:
    """A few WriteSAE training steps on hook_write of the last recurrent layer (head 1), then
    `evaluate_substitution`; returns the final FVE and the substitution KLs."""
    from writesae import ModelSource, WriteSAE, WriteSAEConfig, train
    from writesae.evaluate import evaluate_substitution

    layer = model.cfg.recurrent_layers[-1]
    c = model.cfg
    sae = WriteSAE(
        WriteSAEConfig(
            d_k=c.d_k,
            d_v=c.d_v,
            n_atoms=16,
            k=2,
            hook_name=f"blocks.{layer}.attn.hook_write",
            head=1,
            input_kind="write",
        ),
        seed=0,
    )
    texts = [tokens(vocab, 1, 48, seed=s)[0].tolist() for s in range(4)]
    source = ModelSource(
        model, texts, layer, 1, kind="write", batch_size=32, buffer_size=64, context_len=24
    )
    metrics = train(sae, source, n_steps=6, warmup_steps=1, log_every=3, progress=False)
    res = evaluate_substitution(
        model, sae, tokens(vocab, 2, 16, seed=9), max_firings=4, progress=False
    )
    kls = [x for v in res.kl.values() for x in v]
    return {"fve": metrics.fve[-1], "n": res.n, "kls": kls, "finite": all(map(math.isfinite, kls))}


# ---------------------------------------------------------------- the checks each family runs
def check_parity(hf, model, vocab: int) -> None:
    """Acceptance 1: logits and every hook_resid_post <= 1e-4, final states <= 1e-5 against HF
    (3 x 23 tokens), per-position hook_state vs HF's one-token decode <= 1e-5 (2 x 9 tokens)."""
    d = hf_parity(hf, model, tokens(vocab, 3, 23))
    assert d["logits"] <= 1e-4, d
    assert max(d["resid_post"]) <= 1e-4, d
    assert max(d["state"]) <= 1e-5, d
    assert max(decode_state_diffs(hf, model, tokens(vocab, 2, 9, seed=3))) <= 1e-5


def check_edits(hf, model, vocab: int, hook_name: str, where: str) -> None:
    """Acceptance 2: edits at one or several positions of the first and last recurrent layer
    equal the float64 brute force <= 1e-4, earlier positions bit-for-bit unchanged."""
    triples = [(0, 9, 1), (1, 9, 1)] if where == "one" else MULTI
    toks = tokens(vocab, 2, 23, seed=4)
    with torch.no_grad():
        assert (brute_logits(hf, toks) - hf(toks).logits.double()).abs().max() <= 1e-4
    for layer in (model.cfg.recurrent_layers[0], model.cfg.recurrent_layers[-1]):
        diff, earlier, effect = edit_result(hf, model, layer, hook_name, triples, toks)
        assert diff <= 1e-4 and earlier and effect > 1e-5, (layer, diff, earlier, effect)


def check_generation(hf, model, vocab: int) -> None:
    """Acceptance 3: 32 greedy tokens equal HF's generate; hooks in generation equal
    run_with_hooks on the final sequence (and the edit is live)."""
    assert generation_matches(hf, model, tokens(vocab, 2, 7, seed=9), 32)
    got = generation_hooks_match(model, tokens(vocab, 2, 8, seed=13))
    assert got["tokens"] and got["effect"] > 1e-2, got
    assert got["state"] <= 1e-5 and got["write"] <= 1e-5, got


def check_writesae(model, vocab: int) -> None:
    """WriteSAE on hook_write trains and `evaluate_substitution` gives finite numbers."""
    got = writesae_runs(model, vocab)
    assert got["n"] >= 1 and got["finite"] and 0 < len(got["kls"]), got
    assert got["fve"] == got["fve"]  # a number, not NaN


def check_save_and_convert_back(hf, folder, to_hf_state_dict, vocab: int) -> None:
    """`save_pretrained` -> `from_pretrained` gives HF's logits <= 1e-4; `to_hf_state_dict` loads
    back into a fresh HF model of the same config, whose logits are HF's <= 1e-5."""
    from hooked_recurrent import HookedRecurrentModel

    hf.save_pretrained(folder)
    model = HookedRecurrentModel.from_pretrained(str(folder))
    toks = tokens(vocab, 2, 19)
    with torch.no_grad():
        ref = hf(toks).logits
        assert (model(toks) - ref).abs().max() <= 1e-4
        back = type(hf)(hf.config).eval()
        sd = to_hf_state_dict(model.state_dict(), model.cfg)
        missing, unexpected = back.load_state_dict(sd, strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied: no lm_head
        if missing:
            assert back.lm_head.weight.data_ptr() == back.get_input_embeddings().weight.data_ptr()
        assert (back(toks).logits - ref).abs().max() <= 1e-5
