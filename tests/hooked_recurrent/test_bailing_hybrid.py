"""Bailing hybrid: parity with transformers' BailingHybridForCausalLM, loading, edit propagation,
generation.

References: `BailingHybridForCausalLM` and `brute_bailing`, the float64 token-by-token KDA of
`test_kimi_linear` with Bailing's bounded ("safe") decay and full-rank gates, written from the
reference layer's weights and swapped into the (float64) reference model.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent import family_checks as fc
from tests.hooked_recurrent.family_checks import randomise_kda_constants
from tests.hooked_recurrent.test_kimi_linear import EDITS, brute_kda_layer, state_of

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(2)

VOCAB = 97
CONFIGS = {
    # groups of 3 (KDA, KDA, MLA), one dense block, top-2 of 4 experts in 2 groups, safe gate
    "safe": dict(
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=12,
        num_local_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        head_dim=8,
        layer_group_size=3,
        first_k_dense_replace=1,
        kda_lower_bound=-3.0,
    ),
    # MLA first, a low-rank query, top-3 of 6 experts, the softplus decay, two dense blocks, conv 3
    "softplus": dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        kv_lora_rank=12,
        q_lora_rank=10,
        qk_rope_head_dim=4,
        qk_nope_head_dim=12,
        v_head_dim=8,
        num_local_experts=6,
        num_experts_per_tok=3,
        n_group=1,
        topk_group=1,
        head_dim=16,
        short_conv_kernel_size=3,
        first_k_dense_replace=2,
        kda_safe_gate=False,
        layer_types=["full_attention", "linear_attention", "linear_attention"],
    ),
}


def bailing_hf(name: str, seed: int = 0):
    from transformers import BailingHybridConfig, BailingHybridForCausalLM

    over = CONFIGS[name]
    cfg = BailingHybridConfig(
        vocab_size=VOCAB, intermediate_size=40, moe_intermediate_size=24, pad_token_id=0,
        eos_token_id=1, bos_token_id=1, num_key_value_heads=over["num_attention_heads"],
        num_mtp_layers=0, rope_theta=1000.0, **over,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # the grouped-GEMM experts have no float64 path
    torch.manual_seed(seed)
    hf = BailingHybridForCausalLM(cfg).eval()
    return randomise_kda_constants(hf, seed)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = bailing_hf(request.param, seed=list(CONFIGS).index(request.param))
    return hf, HookedRecurrentModel.from_hf_model(hf)


def bailing_log_decay(la, h):
    """g, from the reference layer's forget-gate weights."""
    fg = la.forget_gate
    H, D = fg.num_heads, fg.head_dim
    f = fg.f_proj(h).view(*h.shape[:2], H, D) + fg.dt_bias.view(H, D)
    rate = fg.A_log.exp()[:, None]
    if fg.safe_gate:
        return fg.lower_bound * torch.sigmoid(rate * f)
    return -rate * F.softplus(f)


def brute_bailing(la, h, write_edits=None, state_edits=None):
    def gate(la, h):
        return la.g_proj(h)

    return brute_kda_layer(la, h, bailing_log_decay, gate, write_edits, state_edits)


def test_logits_hidden_states_and_final_states_match(pair):
    hf, model = pair
    d = fc.parity(hf, model, fc.tokens(VOCAB, 3, 37), state_of)  # chunks of 16: a partial one
    assert d["logits"] <= 1e-4
    assert max(d["resid_post"]) <= 1e-4, d["resid_post"]
    assert max(d["state"]) <= 1e-5, d["state"]


def test_per_position_states_match_decode(pair):
    diffs = fc.decode_state_diffs(*pair, fc.tokens(VOCAB, 2, 12, seed=3), state_of)
    assert max(diffs) <= 1e-5, diffs


@pytest.mark.parametrize("pair", ["safe"], indirect=True)  # one config is enough here
@pytest.mark.parametrize("kind", ["write", "state"])
@pytest.mark.parametrize("where", list(EDITS))
def test_edits_propagate_like_brute_force(pair, kind, where):
    hf, model = pair
    layer = model.cfg.recurrent_layers[0 if kind == "write" else -1]
    edits = fc.random_edits(model, EDITS[where], seed=layer)
    diff, earlier, effect = fc.propagation_diffs(
        hf, model, fc.tokens(VOCAB, 2, 40, seed=5), layer, brute_bailing, False, kind, edits
    )
    assert diff <= 1e-4, diff
    assert earlier
    assert effect > 1e-5


def test_padded_batch_equals_prompts_alone(pair):
    _, model = pair
    assert fc.padding_diff(model, VOCAB) <= 1e-5


def test_greedy_generation_equals_transformers(pair):
    assert fc.generation_matches(*pair, VOCAB, 32)


@pytest.mark.parametrize("pair", ["safe"], indirect=True)  # one config is enough here
def test_hooks_in_generation_match_run_with_hooks(pair):
    _, model = pair
    assert fc.hooked_generation_matches(model, VOCAB, model.cfg.recurrent_layers[-1])


def test_save_pretrained_loads_and_round_trips(tmp_path):
    from transformers import BailingHybridForCausalLM

    from hooked_recurrent.pretrained.bailing_hybrid import to_bailing_state_dict

    hf = bailing_hf("safe", seed=4)
    hf.save_pretrained(tmp_path)  # the published layout: attention.*, dense, word_embeddings
    model = HookedRecurrentModel.from_pretrained(str(tmp_path))
    toks = fc.tokens(VOCAB, 2, 23)
    with torch.no_grad():
        ref = hf(toks).logits
        assert (model(toks) - ref).abs().max() <= 1e-4
        back = BailingHybridForCausalLM(hf.config).eval()
        back.load_state_dict(to_bailing_state_dict(model.state_dict(), model.cfg), strict=True)
        assert (back(toks).logits - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("pair", ["safe"], indirect=True)  # one config is enough here
def test_writesae_trains_and_evaluates(pair):
    _, model = pair
    fve, kls = fc.writesae_runs(model, VOCAB)
    assert fve == fve and kls
