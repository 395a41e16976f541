"""MiniMax: parity with transformers' MiniMaxForCausalLM, loading, edit propagation, generation.

References: `MiniMaxForCausalLM` (logits, hidden states, the lightning cache, greedy generate)
and `brute_lightning`, a float64 token-by-token lightning attention written here from the
reference layer's weights and swapped into the (float64) reference model.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent import family_checks as fc

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(2)

VOCAB = 97
CONFIGS = {
    # softmax layer in the middle, GQA, top-2 of 4 experts, chunks of 16 (T = 40: a partial one)
    "mid": dict(
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        num_local_experts=4,
        num_experts_per_tok=2,
        block_size=16,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_attn_alpha_factor=0.7,
        linear_attn_beta_factor=1.3,
        full_attn_alpha_factor=1.1,
        full_attn_beta_factor=0.9,
        mlp_alpha_factor=0.8,
        mlp_beta_factor=1.2,
    ),
    # the default alternation (softmax first), top-3 of 6 experts, tied embeddings, chunks of 7
    "tied": dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=6,
        num_experts_per_tok=3,
        block_size=7,
        tie_word_embeddings=True,
    ),
}


def minimax_hf(name: str, seed: int = 0):
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    cfg = MiniMaxConfig(
        vocab_size=VOCAB, intermediate_size=40, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        **CONFIGS[name],
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # the grouped-GEMM experts have no float64 path
    torch.manual_seed(seed)
    hf = MiniMaxForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the reference initialises the norms to ones
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight") or n.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = minimax_hf(request.param, seed=list(CONFIGS).index(request.param))
    return hf, HookedRecurrentModel.from_hf_model(hf)


def state_of(cache, layer: int):
    return cache.linear_cache[layer]  # [b, h, d_k, d_v], key side first as ours


def brute_lightning(la, h, write_edits=None, state_edits=None):
    """MiniMax lightning attention one token at a time, from the reference layer's weights."""
    B, T, _ = h.shape
    H, D = la.num_attention_heads, la.head_dim
    qkv = F.silu(la.qkv_proj(h)).view(B, T, H, 3 * D)
    q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
    decay = torch.exp(-la.slope_rate.reshape(H))
    o, _ = fc.brute_recurrence(
        lambda t, S: decay[:, None, None] * S,
        k[..., :, None] * v[..., None, :],
        q,
        write_edits,
        state_edits,
    )
    o = la.norm(o.reshape(B, T, H * D))
    return la.out_proj(torch.sigmoid(la.output_gate(h)) * o)


def test_logits_hidden_states_and_final_states_match(pair):
    hf, model = pair
    assert 40 % hf.config.block_size
    d = fc.parity(hf, model, fc.tokens(VOCAB, 3, 40), state_of)
    assert d["logits"] <= 1e-4
    assert max(d["resid_post"]) <= 1e-4, d["resid_post"]
    assert max(d["state"]) <= 1e-5, d["state"]


def test_per_position_states_match_decode(pair):
    diffs = fc.decode_state_diffs(*pair, fc.tokens(VOCAB, 2, 12, seed=3), state_of)
    assert max(diffs) <= 1e-5, diffs


def test_decay_hook_shows_the_constant(pair):
    hf, model = pair
    layer = model.cfg.recurrent_layers[0]
    with torch.no_grad():
        _, cache = model.run_with_cache(fc.tokens(VOCAB, 2, 9), names_filter=lambda n: "decay" in n)
    decay = cache[f"blocks.{layer}.attn.hook_decay"]
    ref = torch.exp(-hf.model.layers[layer].self_attn.slope_rate.reshape(-1))
    torch.testing.assert_close(decay, ref.expand_as(decay), rtol=1e-6, atol=0)


#: (batch, position, head): one position, and several (heads and rows differ; span > 16 too)
EDITS = {"one": [(0, 17, 1)], "several": [(1, 3, 0), (0, 17, 1), (0, 17, 0), (1, 36, 1)]}


@pytest.mark.parametrize("pair", ["mid"], indirect=True)  # one config is enough here
@pytest.mark.parametrize("kind", ["write", "state"])
@pytest.mark.parametrize("where", list(EDITS))
def test_edits_propagate_like_brute_force(pair, kind, where):
    hf, model = pair
    layer = model.cfg.recurrent_layers[0 if kind == "write" else -1]
    edits = fc.random_edits(model, EDITS[where], seed=layer)
    diff, earlier, effect = fc.propagation_diffs(
        hf, model, fc.tokens(VOCAB, 2, 40, seed=5), layer, brute_lightning, True, kind, edits
    )
    assert diff <= 1e-4, diff
    assert earlier
    assert effect > 1e-5


def test_brute_force_matches_reference(pair):
    hf, model = pair
    toks = fc.tokens(VOCAB, 2, 20)
    layer = model.cfg.recurrent_layers[-1]
    with torch.no_grad():
        ref = hf.double()
        try:
            native = ref(toks).logits
            with fc.swapped(ref.model.layers[layer], brute_lightning, True):
                brute = ref(toks).logits
        finally:
            hf.float()
    # the reference's chunked path multiplies float32-rounded decay powers
    assert (brute - native).abs().max() <= 1e-6


def test_padded_batch_equals_prompts_alone(pair):
    _, model = pair
    assert fc.padding_diff(model, VOCAB) <= 1e-5


def test_greedy_generation_equals_transformers(pair):
    assert fc.generation_matches(*pair, VOCAB, 32)


@pytest.mark.parametrize("pair", ["mid"], indirect=True)  # one config is enough here
def test_hooks_in_generation_match_run_with_hooks(pair):
    _, model = pair
    assert fc.hooked_generation_matches(model, VOCAB, model.cfg.recurrent_layers[-1])


def test_save_pretrained_loads_and_round_trips(tmp_path):
    from transformers import MiniMaxForCausalLM

    from hooked_recurrent.pretrained.minimax import to_hf_state_dict

    hf = minimax_hf("mid", seed=4)
    hf.save_pretrained(tmp_path)
    model = HookedRecurrentModel.from_pretrained(str(tmp_path))
    toks = fc.tokens(VOCAB, 2, 23)
    with torch.no_grad():
        ref = hf(toks).logits
        assert (model(toks) - ref).abs().max() <= 1e-4
        back = MiniMaxForCausalLM(hf.config).eval()
        missing, unexpected = back.load_state_dict(
            to_hf_state_dict(model.state_dict(), model.cfg), strict=False
        )
        buffers = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
        assert not unexpected and all(k.split(".")[-1] in buffers for k in missing)
        assert (back(toks).logits - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("pair", ["mid"], indirect=True)  # one config is enough here
def test_writesae_trains_and_evaluates(pair):
    _, model = pair
    fve, kls = fc.writesae_runs(model, VOCAB)
    assert fve == fve and kls
