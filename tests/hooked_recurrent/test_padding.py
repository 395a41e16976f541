"""Padding and attention masks: a padded batch equals each of its prompts run alone.

For every family (Qwen3.5 with Gated DeltaNet and full-attention layers, Mamba-2, RWKV-7; tiny
random models with decays well below 1), a batch of prompts of lengths 3, 9, 17 and 30, padded on
the left or on the right with random tokens under a mask: the logits at the real tokens, every
per-row tensor of the final `RecurrentState`, greedy continuations, the loss and the per-token loss
equal those of each prompt alone. Then the shipped text models, with lists of texts.
"""

from __future__ import annotations

import pytest
import torch

from hooked_recurrent import HookedRecurrentModel, list_pretrained
from tests.hooked_recurrent.mamba_helpers import mamba_hf
from tests.hooked_recurrent.qwen_helpers import qwen_hf
from tests.hooked_recurrent.rwkv_helpers import write_blinkdl

LENGTHS = (3, 9, 17, 30)
WIDTH = max(LENGTHS)
TOL = 1e-4


def _qwen() -> HookedRecurrentModel:
    hf = qwen_hf("gqa", seed=3)  # layers: 3 Gated DeltaNet + 1 full attention
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # decays alpha = exp(-exp(A_log) softplus(.)) spread over (0, 1)
        for name, p in hf.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(-1.0, 1.0, generator=g))
    return HookedRecurrentModel.from_hf_model(hf).eval()


@pytest.fixture(scope="module", params=["qwen3.5", "mamba2", "rwkv7"])
def family(request, tmp_path_factory):
    """(name, model, vocabulary size)."""
    if request.param == "qwen3.5":
        model = _qwen()
        assert set(model.cfg.layer_types) == {"recurrent", "attention"}
    elif request.param == "mamba2":
        model = HookedRecurrentModel.from_hf_model(mamba_hf("g2", seed=4)).eval()
    else:
        path, _ = write_blinkdl(tmp_path_factory.mktemp("rwkv7_pad"), "c128", seed=5)
        model = HookedRecurrentModel.from_pretrained(str(path)).eval()
    return request.param, model, model.cfg.d_vocab


def _prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(2, vocab, (n,), generator=g) for n in LENGTHS]


def _padded(prompts: list[torch.Tensor], vocab: int, side: str):
    """Tokens [batch, WIDTH] with random tokens at the padding, the mask, each row's columns."""
    g = torch.Generator().manual_seed(12)
    tokens = torch.randint(0, vocab, (len(prompts), WIDTH), generator=g)
    mask = torch.zeros(len(prompts), WIDTH, dtype=torch.long)
    cols = []
    for b, p in enumerate(prompts):
        c = torch.arange(len(p)) if side == "right" else torch.arange(WIDTH - len(p), WIDTH)
        tokens[b, c] = p
        mask[b, c] = 1
        cols.append(c)
    return tokens, mask, cols


def _decays(model: HookedRecurrentModel, tokens: torch.Tensor) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_decay"))
    return torch.cat([v.flatten() for v in cache.values()])


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_logits_and_final_state_equal_each_prompt_alone(family, side):
    _, model, vocab = family
    prompts = _prompts(vocab)
    # the identity step at padded positions must matter: these models forget fast
    assert float(_decays(model, prompts[-1][None]).median()) < 0.9
    tokens, mask, cols = _padded(prompts, vocab, side)
    logits, state = model(tokens, attention_mask=mask, return_state=True)
    compared = set()
    for b, p in enumerate(prompts):
        alone, s_alone = model(p[None], return_state=True)
        assert (logits[b, cols[b]] - alone[0]).abs().max() <= TOL
        for layer, (ours, ref) in enumerate(zip(state.layers, s_alone.layers, strict=True)):
            assert ours.keys() == ref.keys()
            for key, t in ours.items():
                if key in ("k", "v"):  # the KV cache [batch, kv_head, pos, d_head]: real columns
                    got, want = t[b][:, cols[b]], ref[key][0]
                else:  # S, conv, shift, mlp_shift
                    got, want = t[b], ref[key][0]
                assert got.shape == want.shape, (layer, key)
                err = float((got.float() - want.float()).abs().max())
                assert err <= TOL, (layer, key, err)
                compared.add(key)
    assert compared >= {"S"} and compared & {"conv", "shift"}, compared
    if "k" in compared:
        assert state.mask is not None and torch.equal(state.mask, mask.bool())


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_greedy_continuations_equal_each_prompt_alone(family, side):
    _, model, vocab = family
    prompts = _prompts(vocab)
    tokens, mask, _ = _padded(prompts, vocab, side)
    out = model.generate(tokens, 16, attention_mask=mask, stop_at_eos=False, verbose=False)
    assert out.shape == (len(prompts), WIDTH + 16)
    assert torch.equal(out[:, :WIDTH], tokens)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], 16, stop_at_eos=False, verbose=False)
        assert torch.equal(out[b, WIDTH:], alone[0, len(p) :]), b


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_loss_and_loss_per_token_equal_each_prompt_alone(family, side):
    _, model, vocab = family
    prompts = _prompts(vocab)
    tokens, mask, _ = _padded(prompts, vocab, side)
    loss = model(tokens, attention_mask=mask, return_type="loss")
    per_token = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
    assert per_token.shape == (len(prompts), WIDTH - 1)
    counted = (mask[:, :-1] * mask[:, 1:]).bool()
    total, n = 0.0, 0
    for b, p in enumerate(prompts):
        alone = model(p[None], return_type="loss", loss_per_token=True)[0]
        assert (per_token[b, counted[b]] - alone).abs().max() <= TOL
        assert float(model(p[None], return_type="loss")) == pytest.approx(float(alone.mean()))
        total, n = total + float(alone.sum()), n + len(alone)
    assert bool((per_token[~counted] == 0).all())
    assert abs(float(loss) - total / n) <= TOL
    _, both = model(tokens, attention_mask=mask, return_type="both")
    assert float(both) == float(loss)


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padding_after_a_state_equals_each_row_alone(family, side):
    """A padded call that continues a state: the carried buffers, the KV cache and the RoPE
    positions go on from each row's last real token, across two padded calls."""
    _, model, vocab = family
    prompts = _prompts(vocab)
    g = torch.Generator().manual_seed(13)
    first = torch.randint(2, vocab, (len(prompts), 4), generator=g)
    _, state = model(first, return_state=True)
    tokens, mask, cols = _padded(prompts, vocab, side)
    _, state = model(tokens, state=state, attention_mask=mask, return_state=True)
    nxt = torch.randint(2, vocab, (len(prompts), 5), generator=g)
    # the Hugging Face form of the mask (over the state's tokens too) is accepted
    ones = torch.ones(len(prompts), 1, dtype=torch.long)
    full = torch.cat((ones.expand(-1, 4), mask, ones.expand(-1, 5)), 1)
    logits = model(nxt, state=state, attention_mask=full)
    for b, p in enumerate(prompts):
        alone = model(torch.cat((first[b], p, nxt[b]))[None])
        assert (logits[b] - alone[0, -5:]).abs().max() <= TOL


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_hooks_at_padded_positions(family, side):
    """Hooks fire on padded positions and see zero k, v and write and an identity transition;
    the state is carried unchanged there. An edit of a real token's write in the batch equals the
    same edit alone."""
    _, model, vocab = family
    prompts = _prompts(vocab)
    tokens, mask, cols = _padded(prompts, vocab, side)
    pad = ~mask.bool()
    layer = model.cfg.recurrent_layers[0]
    p = f"blocks.{layer}.attn"
    names = [f"{p}.hook_{n}" for n in ("k", "v", "decay", "write", "state")]
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
    assert cache[f"{p}.hook_write"].shape[:2] == tokens.shape
    for n in ("k", "v", "write"):
        assert bool((cache[f"{p}.hook_{n}"][pad] == 0).all()), n
    assert bool((cache[f"{p}.hook_decay"][pad] == 1).all())
    S = cache[f"{p}.hook_state"]
    for b in range(len(prompts)):
        for t in pad[b].nonzero()[:, 0].tolist():
            want = torch.zeros_like(S[b, t]) if t == 0 else S[b, t - 1]
            assert (S[b, t] - want).abs().max() <= 1e-5, (b, t)  # chunked: not bit-exact

    def edit_at(col_of_row):
        def hook(w, hook):
            w = w.clone()
            for b, c in enumerate(col_of_row):
                w[b, c, 0] = 3.0 * w[b, c, 0] + 0.5
            return w

        return [(f"{p}.hook_write", hook)]

    at = 2  # the third real token of every row
    logits = model.run_with_hooks(
        tokens, attention_mask=mask, fwd_hooks=edit_at([int(c[at]) for c in cols])
    )
    for b, prompt in enumerate(prompts):
        alone = model.run_with_hooks(prompt[None], fwd_hooks=edit_at([at]))
        assert (logits[b, cols[b]] - alone[0]).abs().max() <= TOL


@torch.no_grad()
def test_masks_are_checked_and_all_ones_is_no_mask(family):
    _, model, vocab = family
    tokens = _prompts(vocab)[1][None]
    plain = model(tokens)
    assert torch.equal(model(tokens, attention_mask=torch.ones_like(tokens)), plain)
    with pytest.raises(ValueError, match="attention_mask"):
        model(tokens, attention_mask=torch.ones(1, 3, dtype=torch.long))
    _, state = model(tokens, return_state=True)
    bad = torch.ones(1, tokens.shape[1] + 2, dtype=torch.long)
    bad[0, 0] = 0  # the state's first token was real
    with pytest.raises(ValueError, match="state"):
        model(tokens[:, :2], state=state, attention_mask=bad)


# ------------------------------------------------------------------ the shipped text models

SHIPPED = [
    n
    for n in ("tiny-qwen3.5-shakespeare", "tiny-mamba2-shakespeare", "tiny-rwkv7-shakespeare")
    if n in list_pretrained()
]


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    return HookedRecurrentModel.from_pretrained(request.param).eval()


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_shipped_batch_loss_is_the_token_weighted_loss_alone(shipped, side):
    texts = ["To be", "To be, or not to be, that is the question"]
    loss = float(shipped(texts, return_type="loss", padding_side=side))
    alone = [shipped.to_tokens(t) for t in texts]
    weights = [t.shape[1] - 1 for t in alone]
    losses = [float(shipped(t, return_type="loss")) for t in alone]
    want = sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights)
    assert abs(loss - want) <= TOL, (loss, want)


@torch.no_grad()
def test_shipped_generate_on_prompts_of_different_lengths(shipped):
    prompts = ["ROMEO: O", "JULIET: Romeo, Romeo, wherefore art thou"]
    together = shipped.generate(prompts, 5, verbose=False)
    assert together == [shipped.generate(p, 5, verbose=False) for p in prompts]
    assert all("<|pad|>" not in t for t in together)
    tokens = shipped.generate(prompts, 5, verbose=False, return_type="tokens")
    _, mask = shipped.to_tokens(prompts, padding_side="left", return_mask=True)
    assert torch.equal(tokens[:, : mask.shape[1]], shipped.to_tokens(prompts, padding_side="left"))
    assert int(mask[0].sum()) < mask.shape[1]  # the short prompt was padded on the left
    assert int(mask[0, 0]) == 0


def test_to_tokens_padding_side_and_mask(shipped):
    texts = ["To be", "To be, or not to be"]
    right, rmask = shipped.to_tokens(texts, return_mask=True)
    left, lmask = shipped.to_tokens(texts, padding_side="left", return_mask=True)
    n = len(shipped.to_tokens(texts[0])[0])
    assert rmask[0].tolist() == [1] * n + [0] * (right.shape[1] - n)
    assert lmask[0].tolist() == [0] * (left.shape[1] - n) + [1] * n
    assert torch.equal(right[0, :n], left[0, -n:])
    assert torch.equal(shipped.to_tokens(texts), right)
    bos = shipped.to_tokens(texts, prepend_bos=True)
    assert int(bos[0, 0]) == shipped.tokenizer.bos_token_id and bos.shape[1] == right.shape[1] + 1


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_attention_pattern_under_a_mask(side):
    """With `hook_pattern` hooked (the explicit attention path), a masked batch gives the same
    logits as the fused path, and no real query attends to a padded key."""
    model = _qwen()
    prompts = _prompts(model.cfg.d_vocab)
    tokens, mask, _ = _padded(prompts, model.cfg.d_vocab, side)
    fused = model(tokens, attention_mask=mask)
    name = f"blocks.{model.cfg.layer_types.index('attention')}.attn.hook_pattern"
    explicit, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=[name])
    assert (explicit - fused).abs().max() <= TOL
    pattern = cache[name]  # [batch, head, query, key]
    real = mask.bool()
    for b in range(len(prompts)):
        assert bool((pattern[b][:, real[b]][:, :, ~real[b]] == 0).all())
