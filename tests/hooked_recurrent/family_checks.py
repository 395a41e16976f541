"""Checks every newer family (MiniMax, Kimi Linear, Bailing hybrid, xLSTM) runs against its
`transformers` reference: parity, per-position states, exact edit propagation, generation, and a
WriteSAE on the write.

A family's test file supplies what differs: how to read a layer's recurrent state from the
reference cache (`state_of`), and a float64 brute-force of one recurrent layer written from the
reference layer's weights (`brute`), which `swapped` puts in place of that layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

#: additive edits {position: [(batch row, head, delta [d_k, d_v]), ...]}
EditSet = dict[int, list[tuple[int, int, Tensor]]]


def tokens(vocab: int, batch: int = 2, T: int = 40, seed: int = 0) -> Tensor:
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


def cache_of(out):
    """The cache of a `transformers` output (`cache` from 5.2x, `past_key_values` before)."""
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


@torch.no_grad()
def parity(hf, model, toks: Tensor, state_of: Callable) -> dict:
    """Max differences to the reference: "logits"; per block "resid_post" (vs the reference's
    hidden states); per recurrent layer "state" (our final state vs the reference cache's)."""
    out = hf(toks, output_hidden_states=True, use_cache=True)
    logits, cache = model.run_with_cache(
        toks, names_filter=lambda n: n.endswith("resid_post") or n == "hook_embed"
    )
    _, state = model(toks, return_state=True)
    L = model.cfg.n_layers
    hs = out.hidden_states
    # the reference's L + 1 hidden states: the embeddings first (then the last is the final norm's
    # output), or the block outputs first (transformers < 5.25)
    first = 1 if torch.equal(hs[0], cache["hook_embed"]) else 0
    resid = [
        (cache[f"blocks.{i}.hook_resid_post"] - hs[i + first]).abs().max().item()
        for i in range(L - first)
    ]
    ref = cache_of(out)
    states = [
        (state.layers[i]["S"] - state_of(ref, i)).abs().max().item()
        for i in model.cfg.recurrent_layers
    ]
    return {
        "logits": (logits - out.logits).abs().max().item(),
        "resid_post": resid,
        "state": states,
    }


@torch.no_grad()
def decode_state_diffs(hf, model, toks: Tensor, state_of: Callable) -> list[float]:
    """Per recurrent layer, max |hook_state - the reference's state after one-token decodes|."""
    layers = model.cfg.recurrent_layers
    ref: dict[int, list[Tensor]] = {i: [] for i in layers}
    cache = None
    for t in range(toks.shape[1]):
        out = hf(toks[:, t : t + 1], cache=cache, use_cache=True)
        cache = cache_of(out)
        for i in layers:
            ref[i].append(state_of(cache, i).clone())
    _, ours = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_state"))
    return [
        (ours[f"blocks.{i}.attn.hook_state"] - torch.stack(ref[i], 1)).abs().max().item()
        for i in layers
    ]


def brute_recurrence(
    step: Callable[[int, Tensor], Tensor],
    writes: Tensor,
    q: Tensor,
    write_edits: EditSet | None = None,
    state_edits: EditSet | None = None,
) -> tuple[Tensor, Tensor]:
    """S_t = step(t, S_{t-1}) + W_t, o_t = S_t^T q_t, one token at a time (float64).

    `write_edits` add to W_t; `state_edits` assign: the state given to a `hook_state` hook is the
    trajectory without state edits, and where the edited value differs from it the state is the
    edited value. Returns (reads [b, T, h, d_v], the states [b, T, h, d_k, d_v]).
    """
    B, T, H, K, V = writes.shape
    S = S_nat = writes.new_zeros(B, H, K, V)
    outs, states = [], []
    for t in range(T):
        W = writes[:, t].clone()
        for b, h, d in (write_edits or {}).get(t, []):
            W[b, h] += d.to(W)
        S, S_nat = step(t, S) + W, step(t, S_nat) + W
        if state_edits and t in state_edits:
            X = S_nat.clone()
            for b, h, d in state_edits[t]:
                X[b, h] += d.to(X)
            S = torch.where((X != S_nat).flatten(2).any(-1)[..., None, None], X, S)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
        states.append(S)
    return torch.stack(outs, 1), torch.stack(states, 1)


class _Swapped(nn.Module):
    def __init__(self, fn: Callable, orig: nn.Module, as_tuple: bool) -> None:
        super().__init__()
        self.fn, self.as_tuple = fn, as_tuple
        self.__dict__["orig"] = orig  # not a submodule

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        out = self.fn(self.orig, hidden_states)
        return (out, None) if self.as_tuple else out


@contextlib.contextmanager
def swapped(
    layer: nn.Module, fn: Callable, as_tuple: bool, attr: str = "self_attn"
) -> Iterator[None]:
    """`layer.{attr}` (`self_attn` unless told) replaced by `fn(the original module,
    hidden_states)` for the duration."""
    orig = getattr(layer, attr)
    setattr(layer, attr, _Swapped(fn, orig, as_tuple))
    try:
        yield
    finally:
        setattr(layer, attr, orig)


def random_edits(model, positions: list[tuple[int, int, int]], seed: int = 0) -> EditSet:
    """Additive edits at (batch, position, head): rank-1 and dense alternately."""
    c = model.cfg
    g = torch.Generator().manual_seed(seed)
    edits: EditSet = {}
    for i, (b, t, h) in enumerate(positions):
        if i % 2:
            d = 0.3 * torch.randn(c.d_k, c.d_v, generator=g)
        else:
            d = torch.outer(torch.randn(c.d_k, generator=g), torch.randn(c.d_v, generator=g))
        edits.setdefault(t, []).append((b, h % c.n_heads, d))
    return edits


def edit_hook(edits: EditSet):
    """A hook adding `edits` to hook_write / hook_state."""

    def hook(x, hook):
        x = x.clone()
        for t, items in edits.items():
            for b, h, d in items:
                x[b, t, h] += d.to(x)
        return x

    return hook


@torch.no_grad()
def propagation_diffs(
    hf, model, toks, layer, brute, as_tuple, kind, edits, attr="self_attn", layers=None
) -> tuple:
    """An edit of `blocks.{layer}.attn.hook_{kind}` vs the reference model (float64) with the
    brute-force layer swapped in (at `layers(ref)[layer].{attr}`; `ref.model.layers` and
    `self_attn` unless told); returns (max |logits - brute force|, logits before the first
    edited position bit-equal to the clean run, max |logits after the last edit - clean|)."""
    ref = hf.double()
    try:

        def fn(la, h):
            return brute(la, h, **{f"{kind}_edits": edits})

        blocks = ref.model.layers if layers is None else layers(ref)
        with swapped(blocks[layer], fn, as_tuple, attr):
            expected = ref(toks).logits
    finally:
        hf.float()
    clean = model(toks)
    got = model.run_with_hooks(
        toks, fwd_hooks=[(f"blocks.{layer}.attn.hook_{kind}", edit_hook(edits))]
    )
    t0, t1 = min(edits), max(edits)
    return (
        (got.double() - expected).abs().max().item(),
        torch.equal(got[:, :t0], clean[:, :t0]),
        (got[:, t1 + 1 :] - clean[:, t1 + 1 :]).abs().max().item(),
    )


@torch.no_grad()
def padding_diff(model, vocab: int) -> float:
    """Max |logits of a left-padded row - the same prompt run alone| over its real tokens."""
    toks = tokens(vocab, 2, 11, seed=8)
    mask = torch.ones_like(toks)
    mask[1, :4] = 0
    batch = model(toks, attention_mask=mask)
    alone = model(toks[1:, 4:])
    return (batch[1, 4:] - alone[0]).abs().max().item()


@torch.no_grad()
def generation_matches(hf, model, vocab: int, n_new: int = 32) -> bool:
    """Greedy decoding of `n_new` tokens equals `transformers`' `generate`."""
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompt = torch.randint(2, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    theirs = hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    ours = model.generate(prompt, n_new, stop_at_eos=False)
    return torch.equal(ours, theirs)


@torch.no_grad()
def hooked_generation_matches(model, vocab: int, layer: int) -> bool:
    """Generation with a write edit on one head equals run_with_hooks on the generated sequence:
    every new token is the argmax there."""
    prompt = torch.randint(2, vocab, (2, 6), generator=torch.Generator().manual_seed(4))

    def halve(w, hook):
        w = w.clone()
        w[:, :, 0] *= 0.5
        return w

    hooks = [(f"blocks.{layer}.attn.hook_write", halve)]
    out = model.generate(prompt, 12, stop_at_eos=False, fwd_hooks=hooks)
    logits = model.run_with_hooks(out, fwd_hooks=hooks)
    return torch.equal(logits[:, 5:-1].argmax(-1), out[:, 6:])


def writesae_runs(model, vocab: int) -> tuple[float, list[float]]:
    """A few WriteSAE steps on `hook_write` of the last recurrent layer, then the substitution
    test; returns (the last training FVE, the substitution KLs)."""
    from writesae import ModelSource, WriteSAE, WriteSAEConfig, train
    from writesae.evaluate import evaluate_substitution

    layer, c = model.cfg.recurrent_layers[-1], model.cfg
    toks = torch.randint(0, vocab, (16, 24), generator=torch.Generator().manual_seed(1))
    sae = WriteSAE(
        WriteSAEConfig(
            d_k=c.d_k,
            d_v=c.d_v,
            n_atoms=16,
            k=2,
            hook_name=f"blocks.{layer}.attn.hook_write",
            head=0,
            input_kind="write",
        ),
        seed=0,
    )
    source = ModelSource(model, list(toks), layer, 0, kind="write", batch_size=32,
                         buffer_size=128, context_len=24, model_batch_size=8)  # fmt: skip
    metrics = train(sae, source, n_steps=6, log_every=1, progress=False)
    res = evaluate_substitution(model, sae, toks[:4], max_firings=4, progress=False)
    kls = [x for v in res.kl.values() for x in v]
    assert all(math.isfinite(x) for x in kls)
    return metrics.fve[-1], kls


def randomise_kda_constants(hf: nn.Module, seed: int) -> nn.Module:
    """Kimi Linear / Bailing reference models with the constants of initialisation randomised
    (norm weights, A_log, dt_bias, the router's score-correction bias); returns `hf`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # constants at initialisation: norms, gate biases, decay rates
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight") or n.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif n.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(-1.0, 1.0, generator=g))
            elif n.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g))
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return hf
