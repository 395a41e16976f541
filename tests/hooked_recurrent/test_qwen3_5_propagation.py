"""Edits at the recurrent hooks propagate exactly: compared with a brute-force recomputation.

The brute force is written here, independently of the package: a token-by-token Gated DeltaNet
using the Hugging Face layer's own weights, with the edit applied by hand, swapped into the HF
model for the edited layer.
"""

import pytest
import torch

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent.qwen_helpers import qwen_hf
from tests.hooked_recurrent.references import (
    gdn_transition,
    hf_gdn_inputs,
    hf_gdn_output,
    transition_step,
)

LAYER, T, POS, HEAD = 1, 40, 17, 1


def brute_force_gdn(la, h, edit_name, edit):
    """A `transformers` Gated DeltaNet layer (see `references.hf_gdn_projections`), one token at
    a time,
    with `edit` applied to `edit_name`.

    `edit` is a function of the batch-wide slice at POS, or a dict {position: function of the
    slice at that position} for edits at several positions.
    """
    edits = edit if isinstance(edit, dict) else {POS: edit}
    B, L, _ = h.shape
    Hv, dk, dv = la.num_v_heads, la.head_k_dim, la.head_v_dim
    q, k, v, beta, alpha = hf_gdn_inputs(la, h)
    v = v.clone()
    for name, x in (("hook_k", k), ("hook_v", v), ("hook_beta", beta), ("hook_decay", alpha)):
        if edit_name == name:
            for t, f in edits.items():
                x[:, t] = f(x[:, t])
    S = torch.zeros(B, Hv, dk, dv)
    S_nat = S  # the trajectory without state edits: what hook_state is given
    outs = []
    tr = gdn_transition(k, alpha, beta)
    for t in range(L):
        kt = k[:, t]

        def A(S, t=t):
            return transition_step(*tr, S, t)

        W = beta[:, t, :, None, None] * kt[..., :, None] * v[:, t, :, None, :]
        if edit_name == "hook_write" and t in edits:
            W = edits[t](W)
        S, S_nat = A(S) + W, A(S_nat) + W
        if edit_name == "hook_state" and t in edits:
            # assignment: where the edit changes the native state, the state is the edited value
            X = edits[t](S_nat)
            S = torch.where((X != S_nat).flatten(2).any(-1)[..., None, None], X, S)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return hf_gdn_output(la, h, torch.stack(outs, 1))


def _memo(make_delta):
    """An edit x -> x + delta whose random delta is drawn once, on first use, from x's shape."""

    def factory(gen):
        cache = {}

        def edit(x):
            if "d" not in cache:
                cache["d"] = make_delta(x, gen)
            return x + cache["d"]

        return edit

    return factory


def _head_only(delta_of_head):
    def make(x, gen):
        d = torch.zeros_like(x)
        d[:, HEAD] = delta_of_head(x[:, HEAD], gen)
        return d

    return make


def _rank1(x, gen):
    return 0.8 * torch.outer(
        torch.randn(x.shape[-2], generator=gen), torch.randn(x.shape[-1], generator=gen)
    )


EDITS = {
    "hook_write:rank1": _memo(_head_only(_rank1)),
    "hook_write:dense": _memo(
        _head_only(lambda x, g: 0.3 * torch.randn(x.shape[-2:], generator=g))
    ),
    "hook_state:rank1": _memo(_head_only(_rank1)),
    "hook_state:dense": _memo(
        _head_only(lambda x, g: 0.3 * torch.randn(x.shape[-2:], generator=g))
    ),
    "hook_k:head": _memo(_head_only(lambda x, g: 0.5 * torch.randn(x.shape[-1], generator=g))),
    "hook_k:all": _memo(lambda x, g: 0.5 * torch.randn(x.shape, generator=g)),
    "hook_v:head": _memo(_head_only(lambda x, g: torch.randn(x.shape[-1], generator=g))),
    "hook_v:all": _memo(lambda x, g: torch.randn(x.shape, generator=g)),
    "hook_beta:head": _memo(_head_only(lambda x, g: 0.97 - x)),
    "hook_beta:all": _memo(lambda x, g: -0.5 * x),
    "hook_decay:head": _memo(_head_only(lambda x, g: 0.3 - x)),
    "hook_decay:all": _memo(lambda x, g: -0.5 * x),
}


@pytest.fixture(scope="module")
def models():
    hf = qwen_hf("gqa", seed=5)
    return hf, HookedRecurrentModel.from_hf_model(hf)


def _brute_force_logits(hf, tokens, hook_name, edit):
    """The HF model's logits with brute_force_gdn (and `edit`) swapped in for layer LAYER."""
    la = hf.model.layers[LAYER].linear_attn
    original = la.forward
    la.forward = lambda hidden_states, **kw: brute_force_gdn(la, hidden_states, hook_name, edit)
    try:
        return hf(tokens, use_cache=False).logits
    finally:
        la.forward = original


@torch.no_grad()
def single_edit_result(hf, model, case: str) -> tuple[float, bool, float]:
    """test_edit_matches_brute_force: EDITS[case] at POS of blocks.LAYER; returns (max |logits -
    brute force|, logits before POS bit-equal to the clean run, max |logits after POS - clean|)."""
    hook_name = case.split(":")[0]
    tokens = torch.randint(
        0, hf.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1)
    )
    edit = EDITS[case](torch.Generator().manual_seed(2))

    def hook(x, hook):
        x = x.clone()
        x[:, POS] = edit(x[:, POS])
        return x

    clean = model(tokens)
    ours = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.attn.{hook_name}", hook)])
    ref = _brute_force_logits(hf, tokens, hook_name, edit)
    diff = (ours - ref).abs().max().item()
    earlier = torch.equal(ours[:, :POS], clean[:, :POS])
    return diff, earlier, (ours[:, POS + 1 :] - clean[:, POS + 1 :]).abs().max().item()


@pytest.mark.parametrize("case", list(EDITS))
def test_edit_matches_brute_force(models, case):
    diff, earlier, effect = single_edit_result(*models, case)
    assert diff <= 1e-4
    assert earlier
    # the edit does reach later tokens (else the test would not test propagation)
    assert effect > 1e-3


# ------------------------------------------------------------- edits at several (b, t, h) triples
#: (batch, position, head) triples: different heads and batch rows, some pairs edited twice
MULTI_EDITS = {
    # span 5 < _STEP_SPAN: stepped from 17 to 22, then the chunked response from 23 on
    "short_span": [(0, 17, 1), (1, 19, 3), (0, 22, 0), (1, 22, 1), (0, 22, 1)],
    # span 32: stepped from 3 to 35 (Qwen3.5 has no dense propagation), then the response
    "long_span": [(1, 3, 2), (0, 8, 0), (1, 20, 2), (0, 35, 1)],
    # the last position only: nothing after it to propagate to
    "last": [(1, T - 1, 2), (0, T - 1, 0)],
    # stepped to the very end (no response call)
    "to_last": [(0, 30, 3), (1, T - 1, 1)],
}


def _multi_edit(triples, d_k, d_v, seed):
    """{t: f(x [batch, head, d_k, d_v]) -> x + the deltas of the triples at t}, rank-1 and dense
    deltas alternating."""
    g = torch.Generator().manual_seed(seed)
    at = {}
    for i, (b, t, h) in enumerate(triples):
        if i % 2:
            d = 0.3 * torch.randn(d_k, d_v, generator=g)
        else:
            d = 0.8 * torch.outer(torch.randn(d_k, generator=g), torch.randn(d_v, generator=g))
        at.setdefault(t, []).append((b, h, d))

    def make(adds):
        def f(x):
            x = x.clone()
            for b, h, d in adds:
                x[b, h] += d.to(x.dtype)
            return x

        return f

    return {t: make(adds) for t, adds in at.items()}


#: the (case, chunk size) pairs of test_multi_position_edits_match_brute_force (None: native)
MULTI_CASES = [(c, None) for c in MULTI_EDITS] + [("short_span", 8), ("long_span", 8)]


@torch.no_grad()
def multi_edit_result(hf, model, hook_name: str, case: str, chunk, in_place: bool) -> tuple:
    """test_multi_position_edits_match_brute_force: the edits at the triples of MULTI_EDITS[case]
    of blocks.LAYER.attn.{hook_name} (the mixer's chunk size set to `chunk`); returns (max |logits
    - brute force|, per batch row: logits before its first edit bit-equal to the clean run and
    max |logits - clean| at that edit, max |logits after the last edited position - clean| or
    None when that is the last position)."""
    triples = MULTI_EDITS[case]
    tokens = torch.randint(
        0, hf.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(3)
    )
    edits = _multi_edit(triples, model.cfg.d_k, model.cfg.d_v, seed=4)

    def hook(x, hook):
        y = x if in_place else x.clone()
        for t, f in edits.items():
            y[:, t] = f(y[:, t])
        return y

    mixer = model.blocks[LAYER].attn
    native_chunk = mixer.chunk_size
    mixer.chunk_size = chunk or native_chunk
    try:
        clean = model(tokens)
        ours = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.attn.{hook_name}", hook)])
    finally:
        mixer.chunk_size = native_chunk
    ref = _brute_force_logits(hf, tokens, hook_name, edits)
    diff = (ours - ref).abs().max().item()
    earlier, at_first = [], []
    for b in range(tokens.shape[0]):
        first = min(t for bb, t, _ in triples if bb == b)
        earlier.append(torch.equal(ours[b, :first], clean[b, :first]))
        at_first.append((ours[b, first] - clean[b, first]).abs().max().item())
    t1 = max(t for _, t, _ in triples)
    after = (ours[:, t1 + 1 :] - clean[:, t1 + 1 :]).abs().max().item() if t1 < T - 1 else None
    return diff, earlier, at_first, after


@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in_place"])
@pytest.mark.parametrize(
    "case,chunk",
    MULTI_CASES,
    ids=[*MULTI_EDITS, "short_span-chunk8", "long_span-chunk8"],
)
@pytest.mark.parametrize("hook_name", ["hook_write", "hook_state"])
def test_multi_position_edits_match_brute_force(models, hook_name, case, chunk, in_place):
    """Edits at several (batch, pos, head) triples: stepped over the edited span, then the chunked
    response (with chunk 8, across several chunks), against the token-by-token reference."""
    diff, earlier, at_first, after = multi_edit_result(*models, hook_name, case, chunk, in_place)
    assert diff <= 1e-4
    # each batch row is bit-for-bit the clean run before its own first edit
    for b, (equal, effect) in enumerate(zip(earlier, at_first, strict=True)):
        assert equal, b
        assert effect > 1e-3, b
    if after is not None:  # the edits reach the tokens after the last edited one
        assert after > 1e-3
