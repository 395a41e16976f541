"""Tiny random Gated DeltaNet family models (Qwen3.5-MoE, Qwen3-Next, OLMo hybrid) built in the
tests, and the checks every family runs (no downloads)."""

from __future__ import annotations

import math

import torch

from tests.hooked_recurrent.qwen_helpers import QWEN_CONFIGS, randomise

#: MoE shapes: top-k 2 of 6 experts, and top-k 3 of 5 with renormalisation off (Qwen3-Next)
MOE = {
    "k2": dict(
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
    ),
    "k3": dict(
        num_experts=5,
        num_experts_per_tok=3,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
    ),
}


def _common(vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )


def _rope(cfg, partial: float, theta: float = 10000.0):
    cfg.rope_parameters = {
        "rope_type": "default",
        "rope_theta": theta,
        "partial_rotary_factor": partial,
    }
    cfg._attn_implementation = "eager"
    return cfg


def randomise_moe(model: torch.nn.Module, seed: int) -> None:
    """Random norms, decays (as for Qwen3.5) and routers: HF starts routers at zero, where every
    token would tie between experts."""
    randomise(model, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.copy_(torch.randn(p.shape, generator=g))


def qwen3_5_moe_text_config(shape: str = "gqa", moe: str = "k2", vocab: int = 97, **over):
    from transformers import Qwen3_5MoeTextConfig

    kw = {**_common(vocab), **QWEN_CONFIGS[shape], **MOE[moe], **over}
    partial = kw.pop("partial_rotary_factor")
    return _rope(Qwen3_5MoeTextConfig(**kw), partial)


def qwen3_5_moe_hf(shape: str = "gqa", moe: str = "k2", seed: int = 0, **over):
    from transformers import Qwen3_5MoeForCausalLM

    torch.manual_seed(seed)
    m = Qwen3_5MoeForCausalLM(qwen3_5_moe_text_config(shape, moe, **over)).eval()
    randomise_moe(m, seed)
    return m


def qwen3_next_hf(shape: str = "gqa", moe: str = "k2", seed: int = 0, vocab: int = 97, **over):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    kw = {**_common(vocab), **QWEN_CONFIGS[shape], **MOE[moe], "intermediate_size": 56, **over}
    partial = kw.pop("partial_rotary_factor")
    torch.manual_seed(seed)
    m = Qwen3NextForCausalLM(_rope(Qwen3NextConfig(**kw), partial)).eval()
    randomise_moe(m, seed)
    return m


def olmo_hybrid_hf(shape: dict, seed: int = 0, vocab: int = 97, rope: bool = True):
    """An OLMo hybrid model of `shape` (HF config fields); `rope=False`: the released NoPE
    attention."""
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    kw = {**_common(vocab), "intermediate_size": 56, **shape}
    torch.manual_seed(seed)
    cfg = OlmoHybridConfig(**kw)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0} if rope else None
    cfg._attn_implementation = "eager"
    m = OlmoHybridForCausalLM(cfg).eval()
    randomise(m, seed)
    return m


def writesae_trains_and_evaluates(model, layer: int, head: int) -> tuple[list, object]:
    """A few steps of `writesae.train` on write factors of `blocks.{layer}.attn` head `head`,
    then `evaluate_substitution` on held-out prompts; returns (FVE history, result)."""
    from writesae import WriteSAE, WriteSAEConfig, extract_cell, train
    from writesae.evaluate import evaluate_substitution

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, model.cfg.d_vocab, (4, 24), generator=g)
    factors = extract_cell(model, tokens, layer, head, kind="write")
    cfg = WriteSAEConfig(
        d_k=model.cfg.d_k,
        d_v=model.cfg.d_v,
        n_atoms=16,
        k=2,
        hook_name=f"blocks.{layer}.attn.hook_write",
        input_kind="write",
        head=head,
        n_heads=model.cfg.n_heads,
    )
    sae = WriteSAE(cfg, seed=0)
    metrics = train(sae, [factors], n_steps=8, batch_size=32, log_every=4, progress=False)
    held_out = torch.randint(2, model.cfg.d_vocab, (2, 16), generator=g)
    res = evaluate_substitution(model, sae, held_out, max_firings=12, progress=False)
    return metrics.fve, res


def assert_finite_substitution(fve: list, res) -> None:
    assert fve and all(math.isfinite(x) for x in fve)
    assert res.n > 0
    assert all(math.isfinite(v) for v in res.median_kl.values())
    assert 0.0 <= res.win_rate_vs_delete <= 1.0
