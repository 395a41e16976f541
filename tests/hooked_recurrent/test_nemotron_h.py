"""Nemotron-H: parity with transformers' NemotronHForCausalLM (Mamba-2, attention, relu^2 MLP and
sigmoid-routed MoE blocks), loading (both checkpoint layouts), edit propagation, generation and
WriteSAE (the checks are in `hybrid_helpers`)."""

from __future__ import annotations

import logging

import pytest
import torch

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent import hybrid_helpers as hh
from tests.hooked_recurrent.mamba_helpers import randomise

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(2)

VOCAB = 61
CONFIGS = {
    # every block kind; 2 groups of 2 heads, chunk 5 (T = 23 leaves a partial chunk), MoE top-2
    # of 4 with a shared expert
    "all_kinds": dict(
        hidden_size=32,
        layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=40,
        ssm_state_size=8,
        mamba_num_heads=4,
        mamba_head_dim=16,
        n_groups=2,
        chunk_size=5,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        moe_shared_expert_intermediate_size=20,
    ),
    # the non-MoE pattern: 3 groups of 2 heads, chunk 7, conv 3, biases on the Mamba projections
    # and the MLP
    "no_moe": dict(
        hidden_size=24,
        layers_block_type=["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=12,
        intermediate_size=36,
        ssm_state_size=6,
        mamba_num_heads=6,
        mamba_head_dim=8,
        n_groups=3,
        conv_kernel=3,
        chunk_size=7,
        use_bias=True,
        mlp_bias=True,
    ),
}


def nemotron_hf(name: str, seed: int = 0, **over):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    kw = {**CONFIGS[name], **over}
    hf = NemotronHForCausalLM(NemotronHConfig(vocab_size=VOCAB, **kw)).eval()
    randomise(hf, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # the router's choice bias and weights are zeros at init
        for name_, p in hf.named_parameters():
            if ".gate.weight" in name_:
                p.copy_(torch.randn(p.shape, generator=g))
        for name_, b in hf.named_buffers():
            if name_.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = nemotron_hf(request.param, seed=list(CONFIGS).index(request.param))
    return hf, HookedRecurrentModel.from_hf_model(hf)


def test_logits_hidden_states_and_states_match_hf(pair):
    hf, model = pair
    assert 23 % hf.config.chunk_size
    hh.check_parity(hf, model, VOCAB)


def test_dt_clamped_to_time_step_limit():
    """dt is clamped to the config's time_step_limit at every position (the lower end binds at 0.5
    here); time_step_min (an initialisation range) clamps nothing. transformers' one-token decode
    step does not clamp (nor does mamba_ssm's `step`), so only the full forward pass is compared
    with it; ours clamps in generation too, so generation equals the forward pass."""
    hf = nemotron_hf("all_kinds", seed=3, time_step_limit=(0.5, float("inf")), time_step_min=0.9)
    model = HookedRecurrentModel.from_hf_model(hf)
    d = hh.hf_parity(hf, model, hh.tokens(VOCAB, 2, 23))
    assert d["logits"] <= 1e-4 and max(d["resid_post"]) <= 1e-4 and max(d["state"]) <= 1e-5, d
    r = model.cfg.recurrent_layers[0]
    _, cache = model.run_with_cache(
        hh.tokens(VOCAB, 2, 11), names_filter=f"blocks.{r}.attn.hook_dt"
    )
    dt = cache[f"blocks.{r}.attn.hook_dt"]
    assert dt.min() == 0.5 and (dt > 0.5).any() and (dt < 0.9).any()


def test_layout_and_hooks(pair):
    hf, model = pair
    c = hf.config
    kinds = {"linear_attention": "recurrent", "full_attention": "attention"}
    assert model.cfg.layer_types == [kinds.get(t, t) for t in c.layers_block_type]
    names = set(model.hook_dict)
    for li, kind in enumerate(model.cfg.layer_types):
        has_attn = f"blocks.{li}.hook_attn_out" in names
        has_mlp = f"blocks.{li}.hook_mlp_out" in names
        assert (has_attn, has_mlp) == (kind in ("recurrent", "attention"), kind in ("mlp", "moe"))
        assert f"blocks.{li}.hook_resid_mid" not in names
        if kind == "moe":
            assert f"blocks.{li}.mlp.hook_router_logits" in names
        if kind == "attention":  # no RoPE, no gate
            assert f"blocks.{li}.attn.hook_rot_q" not in names
    r = model.cfg.recurrent_layers[0]
    _, cache = model.run_with_cache(
        hh.tokens(VOCAB, 2, 11), names_filter=f"blocks.{r}.attn.hook_dt"
    )
    assert cache[f"blocks.{r}.attn.hook_dt"].min() >= c.time_step_limit[0]


def test_moe_router_hooks_match_hf():
    hf, model = nemotron_hf("all_kinds"), None
    model = HookedRecurrentModel.from_hf_model(hf)
    li = model.cfg.layer_types.index("moe")
    toks = hh.tokens(VOCAB, 2, 13, seed=5)
    seen = {}
    router = hf.model.layers[li].mixer.gate
    router.register_forward_hook(
        lambda m, i, o: seen.update(zip(("logits", "w", "idx"), o, strict=True))
    )
    with torch.no_grad():
        hf(toks)
        _, cache = model.run_with_cache(toks, names_filter=lambda n: f"blocks.{li}.mlp." in n)
    p = f"blocks.{li}.mlp."
    assert (cache[p + "hook_router_logits"].reshape(-1, 4) - seen["logits"]).abs().max() <= 1e-5
    ours = cache[p + "hook_expert_indices"].reshape(-1, 2).sort(-1)
    theirs = seen["idx"].sort(-1)
    assert torch.equal(ours.indices * 0 + ours.values, theirs.values)
    # the weights, matched by expert index
    w = cache[p + "hook_expert_weights"].reshape(-1, 2).gather(-1, ours.indices)
    assert (w - seen["w"].gather(-1, theirs.indices)).abs().max() <= 1e-5
    assert len({int(i) for i in ours.values.flatten()}) >= 2  # more than one expert in use


@pytest.mark.parametrize("hook_name", ["hook_write", "hook_state"])
@pytest.mark.parametrize("where", ["one", "several"])
def test_edits_propagate_like_brute_force(pair, hook_name, where):
    hh.check_edits(*pair, VOCAB, hook_name, where)


def test_greedy_generation_and_hooks_in_generation(pair):
    hh.check_generation(*pair, VOCAB)


def test_both_checkpoint_layouts_load_and_convert_back(tmp_path):
    """transformers' save_pretrained folder, and the published layout (backbone.*, one tensor per
    expert), load to the same logits; to_hf_state_dict loads back into transformers."""
    from safetensors.torch import save_file
    from transformers import NemotronHForCausalLM

    from hooked_recurrent.pretrained.nemotron_h import to_hf_state_dict

    hf = nemotron_hf("all_kinds", seed=7)
    hf.save_pretrained(tmp_path / "hf")
    toks = hh.tokens(VOCAB, 2, 19)
    with torch.no_grad():
        ref = hf(toks).logits
        model = HookedRecurrentModel.from_pretrained(str(tmp_path / "hf"))
        assert (model(toks) - ref).abs().max() <= 1e-4
        published = {}
        for k, v in hf.state_dict().items():
            k = k.replace("model.", "backbone.", 1)
            if ".experts.up_proj" in k or ".experts.down_proj" in k:
                proj = k.rsplit(".", 1)[1]
                for e in range(v.shape[0]):
                    published[k.replace(f"experts.{proj}", f"experts.{e}.{proj}.weight")] = v[e]
            else:
                published[k] = v.contiguous()
        (tmp_path / "pub").mkdir()
        save_file(published, tmp_path / "pub" / "model.safetensors")
        (tmp_path / "pub" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
        model2 = HookedRecurrentModel.from_pretrained(str(tmp_path / "pub"))
        assert torch.equal(model2(toks), model(toks))
        back = NemotronHForCausalLM(hf.config).eval()
        missing, unexpected = back.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg))
        assert not missing and not unexpected
        assert (back(toks).logits - ref).abs().max() <= 1e-5


def test_writesae_trains_and_evaluates(pair):
    hh.check_writesae(pair[1], VOCAB)
