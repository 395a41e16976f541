"""The sparse MoE MLP against `transformers`' Qwen3.5-MoE and Kimi Linear MoE blocks, and its hooks
against direct recomputation."""

from __future__ import annotations

import pytest
import torch

from hooked_recurrent.components.moe import MoE

D, I_EXP, I_SHARED, E = 24, 16, 20, 6


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(module.parameters()) + list(module.buffers()):
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _qwen_block(top_k: int, seed: int = 0):
    from transformers import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    cfg = Qwen3_5MoeTextConfig(
        hidden_size=D,
        moe_intermediate_size=I_EXP,
        shared_expert_intermediate_size=I_SHARED,
        num_experts=E,
        num_experts_per_tok=top_k,
    )
    hf = Qwen3_5MoeSparseMoeBlock(cfg).eval()
    _randomise(hf, seed)
    ours = MoE(D, I_EXP, E, top_k, d_shared=I_SHARED, shared_gate=True)
    sd = hf.state_dict()
    gate, up = sd["experts.gate_up_proj"].chunk(2, dim=1)
    ours.load_state_dict(
        {
            "W_router.weight": sd["gate.weight"],
            "experts.W_gate": gate,
            "experts.W_in": up,
            "experts.W_out": sd["experts.down_proj"],
            "shared_expert.W_gate.weight": sd["shared_expert.gate_proj.weight"],
            "shared_expert.W_in.weight": sd["shared_expert.up_proj.weight"],
            "shared_expert.W_out.weight": sd["shared_expert.down_proj.weight"],
            "W_shared_gate.weight": sd["shared_expert_gate.weight"],
        }
    )
    return hf, ours


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_moe_matches_qwen3_5_moe_block(top_k):
    hf, ours = _qwen_block(top_k, seed=top_k)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x)
        got = ours(x)
        logits, _, idx = hf.gate(x.view(-1, D))
    assert (got - ref).abs().max() < 1e-5
    # the router hooks see what the reference router computes
    seen = {}
    for name in ("hook_router_logits", "hook_expert_indices"):
        getattr(ours, name).add_hook(lambda t, hook, name=name: seen.__setitem__(name, t))
    with torch.no_grad():
        ours(x)
    ours.hook_router_logits.remove_hooks()
    ours.hook_expert_indices.remove_hooks()
    assert (seen["hook_router_logits"].reshape(-1, E) - logits).abs().max() < 1e-6
    assert torch.equal(
        seen["hook_expert_indices"].reshape(-1, top_k).sort(-1).values, idx.sort(-1).values
    )


def test_moe_hooks_are_the_terms_of_the_sum():
    """Zeroing one weight removes exactly that expert's term; hook_expert_out is each chosen
    expert run alone on the token; the shared hooks are the sigmoid gate and the gated output."""
    hf, ours = _qwen_block(top_k=3, seed=5)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2))
    seen = {}

    def keep(t, hook):
        seen[hook.name] = t.clone()

    for name in (
        "hook_expert_indices",
        "hook_expert_weights",
        "hook_expert_out",
        "hook_shared_gate",
        "hook_shared_out",
    ):
        hp = getattr(ours, name)
        hp.name = name
        hp.add_hook(keep)
    with torch.no_grad():
        y = ours(x)
    idx, w, out = seen["hook_expert_indices"], seen["hook_expert_weights"], seen["hook_expert_out"]
    assert idx.shape == (2, 5, 3) and w.shape == (2, 5, 3) and out.shape == (2, 5, 3, D)
    assert (w.sum(-1) - 1).abs().max() < 1e-6  # Qwen renormalises the chosen weights
    with torch.no_grad():
        for b, t, j in [(0, 0, 0), (1, 4, 2)]:
            direct = ours.experts.expert(int(idx[b, t, j]), x[b, t][None])[0]
            assert (out[b, t, j] - direct).abs().max() < 1e-6
        shared = hf.shared_expert(x)
        gate = torch.sigmoid(hf.shared_expert_gate(x))
    assert (seen["hook_shared_gate"] - gate).abs().max() < 1e-6
    assert (seen["hook_shared_out"] - gate * shared).abs().max() < 1e-6
    for name in list(seen):
        getattr(ours, name).remove_hooks()

    def ablate(t, hook):
        t = t.clone()
        t[1, 4, 2] = 0
        return t

    ours.hook_expert_weights.add_hook(ablate)
    with torch.no_grad():
        y_abl = ours(x)
    ours.hook_expert_weights.remove_hooks()
    expected = y.clone()
    expected[1, 4] -= w[1, 4, 2] * out[1, 4, 2]
    assert (y_abl - expected).abs().max() < 1e-5


@pytest.mark.parametrize("n_group,topk_group,norm", [(1, 1, True), (3, 2, False)])
def test_moe_sigmoid_router_matches_kimi_linear(n_group, topk_group, norm):
    """The sigmoid router with a score correction bias, group limit and scaling (Kimi Linear,
    Bailing, Nemotron-H), against `transformers`' Kimi Linear MoE block (ungated shared expert)."""
    from transformers import KimiLinearConfig
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearMoE

    cfg = KimiLinearConfig(
        hidden_size=D,
        moe_intermediate_size=I_EXP,
        num_local_experts=E,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=2.5,
    )
    hf = KimiLinearMoE(cfg).eval()
    _randomise(hf, 7)
    ours = MoE(
        D,
        I_EXP,
        E,
        2,
        scoring="sigmoid",
        norm_topk=norm,
        routed_scale=2.5,
        score_bias=True,
        n_group=n_group,
        topk_group=topk_group,
        d_shared=I_EXP,
    )
    sd = hf.state_dict()
    gate, up = sd["experts.gate_up_proj"].chunk(2, dim=1)
    ours.load_state_dict(
        {
            "W_router.weight": sd["gate.weight"],
            "score_bias": sd["gate.e_score_correction_bias"],
            "experts.W_gate": gate,
            "experts.W_in": up,
            "experts.W_out": sd["experts.down_proj"],
            "shared_expert.W_gate.weight": sd["shared_experts.gate_proj.weight"],
            "shared_expert.W_in.weight": sd["shared_experts.up_proj.weight"],
            "shared_expert.W_out.weight": sd["shared_experts.down_proj.weight"],
        }
    )
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(x) - hf(x)).abs().max() < 1e-5


def test_moe_bad_arguments():
    with pytest.raises(ValueError, match="scoring"):
        MoE(D, I_EXP, E, 2, scoring="relu")
    with pytest.raises(ValueError, match="top_k"):
        MoE(D, I_EXP, E, E + 1)
    with pytest.raises(ValueError, match="n_group"):
        MoE(D, I_EXP, E, 2, n_group=4)
    moe = MoE(D, I_EXP, E, 2)
    moe.hook_expert_indices.add_hook(lambda t, hook: t + E)
    with pytest.raises(ValueError, match="expert indices"):
        moe(torch.randn(1, 2, D))
