"""Jamba: parity with transformers' JambaForCausalLM (Mamba-1 and NoPE attention layers, SwiGLU
MLPs and a softmax-routed MoE), loading (both expert layouts), edit propagation, generation and
WriteSAE.

References: `JambaForCausalLM` (logits, hidden states, caches, one-token decode, router outputs,
greedy generate) and `brute_jamba_mamba`, a float64 token-by-token Jamba Mamba layer written here
from the reference layer's weights and swapped into the (float64) reference model.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent import family_checks as fc
from tests.hooked_recurrent import hybrid_helpers as hh
from tests.hooked_recurrent.mamba1_helpers import randomise_mamba1

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(2)

VOCAB = 61
CONFIGS = {
    # attention at layer 2 (period 4, offset 2), GQA 4 / 2; MoE top-2 of 4 experts at the odd
    # layers, SwiGLU MLPs at the even ones
    "moe": dict(
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=4,
        attn_layer_offset=2,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=4,
    ),
    # attention first (period 3, offset 0), GQA 2 / 1; MoE top-3 of 6 at layer 2; conv 3 without
    # bias, biases on the Mamba projections, expand 3, dt_rank "auto", tied embeddings
    "attn_first": dict(
        hidden_size=24,
        intermediate_size=20,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        attn_layer_period=3,
        attn_layer_offset=0,
        num_experts=6,
        num_experts_per_tok=3,
        expert_layer_period=3,
        expert_layer_offset=2,
        mamba_d_state=6,
        mamba_d_conv=3,
        mamba_expand=3,
        mamba_conv_bias=False,
        mamba_proj_bias=True,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}


def jamba_hf(name: str, seed: int = 0):
    from transformers import JambaConfig, JambaForCausalLM

    # weights of std 0.1 (not 0.02): activations, states and each sublayer's output of order
    # one, so that the absolute tolerances below are tight
    cfg = JambaConfig(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                      initializer_range=0.1, **CONFIGS[name])  # fmt: skip
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # the grouped-GEMM experts have no float64 path
    torch.manual_seed(seed)
    hf = randomise_mamba1(JambaForCausalLM(cfg).eval(), seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # router weights of std 0.02 would route almost uniformly
        for n, p in hf.named_parameters():
            if n.endswith("router.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = jamba_hf(request.param, seed=list(CONFIGS).index(request.param))
    return hf, HookedRecurrentModel.from_hf_model(hf)


def state_of(cache, layer: int):
    """The reference's Mamba state `[b, d_inner, d_state]` in our layout `[b, 1, d_state,
    d_inner]`."""
    return cache.get_recurrent_state(layer).transpose(-1, -2)[:, None]


def _rms(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def brute_jamba_mamba(m, h, write_edits=None, state_edits=None):
    """Jamba's Mamba layer one token at a time (in the dtype of `h`), from the reference
    `JambaMambaMixer` `m`'s weights: S_t = exp(dt_t A) * S_{t-1} + B_t (dt_t x_t)^T,
    y_t = (S_t^T C_t + D x_t) silu(z_t)."""
    B, T, _ = h.shape
    N, R, Di = m.ssm_state_size, m.time_step_rank, m.intermediate_size
    x, z = m.in_proj(h).split([Di, Di], -1)
    K = m.conv1d.weight.shape[-1]
    xp = F.pad(x, (0, 0, K - 1, 0))
    x = sum(xp[:, j : j + T] * m.conv1d.weight[:, 0, j] for j in range(K))
    x = F.silu(x if m.conv1d.bias is None else x + m.conv1d.bias)
    dtr, Bt, Ct = m.x_proj(x).split([R, N, N], -1)
    eps = m.dt_layernorm.variance_epsilon  # the reference's norms compute in float32: redone
    dtr = _rms(dtr, m.dt_layernorm.weight, eps)
    Bt, Ct = _rms(Bt, m.b_layernorm.weight, eps), _rms(Ct, m.c_layernorm.weight, eps)
    dt = F.softplus(m.dt_proj(dtr))  # [b, T, d_inner]
    decay = torch.exp(dt[..., None, :] * -m.A_log.exp().T)  # [b, T, d_state, d_inner]
    writes = Bt[..., :, None] * (dt * x)[..., None, :]
    o, _ = fc.brute_recurrence(
        lambda t, S: decay[:, t, None] * S, writes[:, :, None], Ct[:, :, None],
        write_edits, state_edits,
    )  # fmt: skip
    return m.out_proj((o[:, :, 0] + m.D * x) * F.silu(z))


# ---------------------------------------------------------------- parity with transformers
def test_layout_matches_the_reference(pair):
    hf, model = pair
    c = hf.config
    kinds = {"mamba": "recurrent", "attention": "attention"}
    assert model.cfg.layer_types == [kinds[t] for t in c.layers_block_type]
    assert model.cfg.moe_layers == [i for i, n in enumerate(c.layers_num_experts) if n > 1]
    assert model.cfg.dt_rank == c.mamba_dt_rank and model.cfg.bcdt_norm == "weighted"
    names = set(model.hook_dict)
    for li in range(model.cfg.n_layers):
        assert (f"blocks.{li}.mlp.hook_router_logits" in names) == (li in model.cfg.moe_layers)
    li = model.cfg.attention_layers[0]
    assert f"blocks.{li}.attn.hook_pattern" in names
    assert f"blocks.{li}.attn.hook_rot_q" not in names  # no RoPE


def test_one_expert_means_no_moe_layers():
    from transformers import JambaConfig

    from hooked_recurrent.pretrained.jamba import config_from_hf

    hf = JambaConfig(num_experts=1, num_hidden_layers=6, hidden_size=32, num_attention_heads=4)
    cfg = config_from_hf(hf.to_dict())
    assert hf.layers_num_experts == [1] * 6 and cfg.moe_layers == []
    assert cfg.attention_layers == [4] and cfg.dt_rank == 2  # "auto": ceil(32 / 16)


def test_logits_hidden_states_and_final_states_match(pair):
    hf, model = pair
    d = fc.parity(hf, model, fc.tokens(VOCAB, 3, 37), state_of)
    assert d["logits"] <= 1e-4, d
    assert max(d["resid_post"]) <= 1e-4, d["resid_post"]
    assert max(d["state"]) <= 1e-5, d["state"]


def test_per_position_states_match_decode(pair):
    diffs = fc.decode_state_diffs(*pair, fc.tokens(VOCAB, 2, 12, seed=3), state_of)
    assert max(diffs) <= 1e-5, diffs


def test_moe_router_hooks_match_hf():
    hf = jamba_hf("moe")
    model = HookedRecurrentModel.from_hf_model(hf)
    li = model.cfg.moe_layers[0]
    toks = fc.tokens(VOCAB, 2, 13, seed=5)
    seen = {}
    hf.model.layers[li].feed_forward.router.register_forward_hook(
        lambda m, i, o: seen.update(zip(("logits", "w", "idx"), o, strict=True))
    )
    p = f"blocks.{li}.mlp."
    with torch.no_grad():
        hf(toks)
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n.startswith(p))
    logits = cache[p + "hook_router_logits"].reshape(-1, 4)
    assert (logits - seen["logits"]).abs().max() <= 1e-5
    ours = cache[p + "hook_expert_indices"].reshape(-1, 2).sort(-1)
    theirs = seen["idx"].sort(-1)
    assert torch.equal(ours.values, theirs.values)
    # the weights (softmax over all experts, not renormalised over the chosen), matched by expert
    w = cache[p + "hook_expert_weights"].reshape(-1, 2).gather(-1, ours.indices)
    assert (w - seen["w"].gather(-1, theirs.indices)).abs().max() <= 1e-6
    assert (w.sum(-1) < 0.99).any()  # not renormalised
    assert len(set(ours.values.flatten().tolist())) == 4  # every expert in use


# ---------------------------------------------------------------- edits
def test_brute_force_matches_reference(pair):
    hf, model = pair
    toks = fc.tokens(VOCAB, 2, 20)
    layer = model.cfg.recurrent_layers[-1]
    with torch.no_grad():
        ref = hf.double()
        try:
            native = ref(toks).logits
            with fc.swapped(ref.model.layers[layer], brute_jamba_mamba, False, "mamba"):
                brute = ref(toks).logits
        finally:
            hf.float()
    assert (brute - native).abs().max() <= 1e-5
    assert brute.dtype == torch.float64


#: (batch, position, head): one position in both rows, and several (rows differ, span > 20)
EDITS = {"one": [(0, 17, 0), (1, 17, 0)], "several": [(1, 3, 0), (0, 17, 0), (1, 36, 0)]}


@pytest.mark.parametrize("kind", ["write", "state"])
@pytest.mark.parametrize("where", list(EDITS))
def test_edits_propagate_like_brute_force(pair, kind, where):
    hf, model = pair
    toks = fc.tokens(VOCAB, 2, 40, seed=5)
    for layer in (model.cfg.recurrent_layers[0], model.cfg.recurrent_layers[-1]):
        edits = fc.random_edits(model, EDITS[where], seed=layer)
        diff, earlier, effect = fc.propagation_diffs(
            hf, model, toks, layer, brute_jamba_mamba, False, kind, edits, "mamba"
        )
        assert diff <= 1e-4 and earlier and effect > 1e-5, (layer, diff, earlier, effect)


def test_padded_batch_equals_prompts_alone(pair):
    _, model = pair
    assert fc.padding_diff(model, VOCAB) <= 1e-5


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("pair", ["moe"], indirect=True)  # one generate comparison per family
def test_greedy_generation_equals_transformers(pair):
    assert fc.generation_matches(*pair, VOCAB, 32)


def test_hooks_in_generation_match_run_with_hooks(pair):
    got = hh.generation_hooks_match(pair[1], fc.tokens(VOCAB, 2, 8, seed=13))
    assert got["tokens"] and got["effect"] > 1e-2, got
    assert got["state"] <= 1e-5 and got["write"] <= 1e-5, got


# ---------------------------------------------------------------- loading
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_loads_and_converts_back(tmp_path, name):
    """`save_pretrained` writes the experts one by one (gate_proj / up_proj / down_proj), which
    `from_pretrained` reads; `to_hf_state_dict` gives transformers' fused layout back."""
    from safetensors.torch import load_file

    from hooked_recurrent.pretrained.jamba import to_hf_state_dict

    hf = jamba_hf(name, seed=7)
    hf.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any(".feed_forward.experts.0.gate_proj.weight" in k for k in saved)
    hh.check_save_and_convert_back(hf, tmp_path, to_hf_state_dict, VOCAB)


# ---------------------------------------------------------------- WriteSAE
@pytest.mark.parametrize("pair", ["moe"], indirect=True)  # one config is enough here
def test_writesae_trains_and_evaluates(pair):
    fve, kls = fc.writesae_runs(pair[1], VOCAB)
    assert fve == fve and kls
