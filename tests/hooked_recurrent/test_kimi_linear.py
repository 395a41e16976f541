"""Kimi Linear: parity with transformers' KimiLinearForCausalLM, loading, edit propagation,
generation.

References: `KimiLinearForCausalLM` (logits, hidden states, the KDA cache, greedy generate) and
`brute_kda`, a float64 token-by-token Kimi Delta Attention written here from the reference
layer's weights and swapped into the (float64) reference model.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent import family_checks as fc
from tests.hooked_recurrent.family_checks import randomise_kda_constants

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(2)

VOCAB = 97
CONFIGS = {
    # MLA in the middle, a dense first block, top-2 of 4 experts in 2 groups (the best group only)
    "mid": dict(
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
        linear_attn_config={"head_dim": 8, "num_heads": 4, "short_conv_kernel_size": 4},
        layer_types=["linear_attention", "full_attention", "linear_attention"],
    ),
    # MLA last with a low-rank query, top-3 of 6 experts, 2 shared experts, conv 3
    "lowrank": dict(
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
        n_shared_experts=2,
        linear_attn_config={"head_dim": 16, "num_heads": 2, "short_conv_kernel_size": 3},
        layer_types=["linear_attention", "linear_attention", "full_attention"],
    ),
}


def kimi_hf(name: str, seed: int = 0):
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    over = CONFIGS[name]
    cfg = KimiLinearConfig(
        vocab_size=VOCAB, intermediate_size=40, moe_intermediate_size=24, pad_token_id=0,
        eos_token_id=1, bos_token_id=1, num_key_value_heads=over["num_attention_heads"], **over,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # the grouped-GEMM experts have no float64 path
    torch.manual_seed(seed)
    hf = KimiLinearForCausalLM(cfg).eval()
    return randomise_kda_constants(hf, seed)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = kimi_hf(request.param, seed=list(CONFIGS).index(request.param))
    return hf, HookedRecurrentModel.from_hf_model(hf)


def state_of(cache, layer: int):
    return cache.get_recurrent_state(layer)  # [b, h, d_k, d_v], key side first as ours


def kda_inputs(la, h, log_decay):
    """q, k, v, beta, decay of a reference KDA layer, from its weights (float64 when h is)."""
    B, T, _ = h.shape
    H, D = la.num_heads, la.head_dim
    qkv = torch.cat((la.q_proj(h), la.k_proj(h), la.v_proj(h)), -1).transpose(1, 2)
    K = la.conv1d.weight.shape[-1]
    conv = F.conv1d(F.pad(qkv, (K - 1, 0)), la.conv1d.weight, groups=qkv.shape[1])
    q, k, v = (x.reshape(B, T, H, D) for x in F.silu(conv).transpose(1, 2).split(H * D, -1))

    def unit(x):
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)

    beta = torch.sigmoid(la.b_proj(h))
    return unit(q) / math.sqrt(D), unit(k), v, beta, log_decay(la, h).reshape(B, T, H, D).exp()


def brute_kda_layer(la, h, log_decay, gate, write_edits=None, state_edits=None):
    """KDA one token at a time: S_t = (I - beta k k^T) diag(d) S_{t-1} + beta k v^T."""
    B, T, _ = h.shape
    q, k, v, beta, d = kda_inputs(la, h, log_decay)

    def step(t, S):
        Sd = d[:, t, :, :, None] * S
        removed = torch.einsum("bhk,bhkv->bhv", k[:, t], Sd)
        return Sd - beta[:, t, :, None, None] * k[:, t, :, :, None] * removed[..., None, :]

    writes = (beta[..., None] * k)[..., :, None] * v[..., None, :]
    o, _ = fc.brute_recurrence(step, writes, q, write_edits, state_edits)
    out = la.o_norm(o, gate(la, h).reshape(o.shape)).reshape(B, T, -1)
    return la.o_proj(out)


def kimi_log_decay(la, h):
    fg = la.forget_gate
    f = fg.f_b_proj(fg.f_a_proj(h)) + fg.dt_bias
    return -fg.A_log.reshape(-1).exp().repeat_interleave(la.head_dim) * F.softplus(f)


def brute_kda(la, h, write_edits=None, state_edits=None):
    def gate(la, h):
        return la.g_b_proj(la.g_a_proj(h))

    return brute_kda_layer(la, h, kimi_log_decay, gate, write_edits, state_edits)


def test_logits_hidden_states_and_final_states_match(pair):
    hf, model = pair
    d = fc.parity(hf, model, fc.tokens(VOCAB, 3, 37), state_of)  # chunks of 16: a partial one
    assert d["logits"] <= 1e-4
    assert max(d["resid_post"]) <= 1e-4, d["resid_post"]
    assert max(d["state"]) <= 1e-5, d["state"]


def test_per_position_states_match_decode(pair):
    diffs = fc.decode_state_diffs(*pair, fc.tokens(VOCAB, 2, 12, seed=3), state_of)
    assert max(diffs) <= 1e-5, diffs


def test_transition_from_cache_rebuilds_the_states(pair):
    """hook_decay, hook_beta and hook_k give the transition: S_t = A_t(S_{t-1}) + W_t."""
    _, model = pair
    layer = model.cfg.recurrent_layers[0]
    p = f"blocks.{layer}.attn."
    with torch.no_grad():
        _, cache = model.run_with_cache(fc.tokens(VOCAB, 2, 10), names_filter=lambda n: p in n)
    tr = model.blocks[layer].attn.transition_from_cache(dict(cache.items()), 1)
    tr = tr.map(lambda x: x[:, :, None])  # one head: a head axis of 1 for `step`
    S, W = cache[p + "hook_state"][:, :, 1].double(), cache[p + "hook_write"][:, :, 1].double()
    for t in range(1, 10):
        torch.testing.assert_close(tr.step(S[:, t - 1, None], t)[:, 0] + W[:, t], S[:, t])


#: (batch, position, head): one position, and several (span > 16: the dense chunked response)
EDITS = {"one": [(0, 17, 1)], "several": [(1, 3, 0), (0, 17, 1), (0, 17, 0), (1, 36, 1)]}


@pytest.mark.parametrize("pair", ["mid"], indirect=True)  # one config is enough here
@pytest.mark.parametrize("kind", ["write", "state"])
@pytest.mark.parametrize("where", list(EDITS))
def test_edits_propagate_like_brute_force(pair, kind, where):
    hf, model = pair
    layer = model.cfg.recurrent_layers[0 if kind == "write" else -1]
    edits = fc.random_edits(model, EDITS[where], seed=layer)
    diff, earlier, effect = fc.propagation_diffs(
        hf, model, fc.tokens(VOCAB, 2, 40, seed=5), layer, brute_kda, False, kind, edits
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
            with fc.swapped(ref.model.layers[layer], brute_kda, False):
                brute = ref(toks).logits
        finally:
            hf.float()
    # the reference's chunked KDA runs in float32 even in a float64 model
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
    from transformers import KimiLinearForCausalLM

    from hooked_recurrent.pretrained.kimi_linear import to_hf_state_dict

    hf = kimi_hf("mid", seed=4)
    hf.save_pretrained(tmp_path)  # the published layout: block_sparse_moe, q/k/v_conv1d, w1/w2/w3
    model = HookedRecurrentModel.from_pretrained(str(tmp_path))
    toks = fc.tokens(VOCAB, 2, 23)
    with torch.no_grad():
        ref = hf(toks).logits
        assert (model(toks) - ref).abs().max() <= 1e-4
        back = KimiLinearForCausalLM(hf.config).eval()
        back.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=True)
        assert (back(toks).logits - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("pair", ["mid"], indirect=True)  # one config is enough here
def test_writesae_trains_and_evaluates(pair):
    _, model = pair
    fve, kls = fc.writesae_runs(model, VOCAB)
    assert fve == fve and kls
