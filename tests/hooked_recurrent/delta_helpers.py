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
    tokens = torch.randint(2, model.cfg.d_vocab, (2, 16), generator=g)
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
    metrics = train(sae, [factors], n_steps=4, batch_size=32, log_every=2, progress=False)
    # max_firings=None: an int limit trips the type check of writesae's _collect (limit: float)
    held_out = torch.randint(2, model.cfg.d_vocab, (1, 8), generator=g)
    res = evaluate_substitution(model, sae, held_out, max_firings=None, progress=False)
    return metrics.fve, res


def assert_finite_substitution(fve: list, res) -> None:
    assert fve and all(math.isfinite(x) for x in fve)
    assert res.n > 0
    assert all(math.isfinite(v) for v in res.median_kl.values())
    assert 0.0 <= res.win_rate_vs_delete <= 1.0


# ------------------------------------------------------------------ checks shared by the families
T_PARITY = 70  # chunk size 64: one full chunk plus a partial one
#: single-position edits and multi-position cases run on every family (the full grids run on
#: Qwen3.5 in test_qwen3_5_propagation.py)
SINGLE_CASES = ["hook_write:rank1", "hook_state:dense", "hook_beta:head"]
#: (hook, case): several positions within a chunk, and across a long span
MULTI_CASES = [("hook_write", "short_span"), ("hook_state", "long_span")]


def check_parity(hf, model) -> None:
    """Logits, every block's hook_resid_post, final and per-position states against HF."""
    from tests.hooked_recurrent.test_qwen3_5_parity import (
        parity_diffs,
        per_position_state_diff,
        tokens_for,
    )

    d = parity_diffs(hf, model, tokens_for(hf, T_PARITY))
    assert d["logits"] <= 1e-4 and d["resid_post"] <= 1e-4, d
    assert d["final_state"] <= 1e-5 and d["returned_state"] <= 1e-5, d
    assert per_position_state_diff(hf, model, tokens_for(hf, 12)) <= 1e-5


def check_single_edit(hf, model, case: str) -> None:
    """An edit at one position equals the brute-force recurrence; earlier logits bit-equal."""
    from tests.hooked_recurrent.test_qwen3_5_propagation import single_edit_result

    diff, earlier, effect = single_edit_result(hf, model, case)
    assert diff <= 1e-4 and earlier and effect > 1e-3, (diff, earlier, effect)


def check_multi_edit(hf, model, hook_name: str, case: str) -> None:
    """Edits at several (batch, position, head) triples equal the brute-force recurrence."""
    from tests.hooked_recurrent.test_qwen3_5_propagation import multi_edit_result

    diff, earlier, at_first, after = multi_edit_result(hf, model, hook_name, case, None, False)
    assert diff <= 1e-4 and all(earlier), (diff, earlier)
    assert min(at_first) > 1e-3 and after > 1e-3


@torch.no_grad()
def check_generation(hf, model, hooks: list) -> None:
    """32 greedy tokens equal HF's `generate`; with `hooks`, each generated token is the argmax
    of `run_with_hooks` on the final sequence (hooks live in generation)."""
    from tests.hooked_recurrent.test_qwen3_5_generation import _argmax_rollout_check

    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompt = torch.randint(2, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(3))
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert torch.equal(model.generate(prompt, 32, stop_at_eos=False), theirs)
    out = _argmax_rollout_check(model, prompt, 6, hooks)
    assert not torch.equal(out, theirs[:, : out.shape[1]])  # the hooks acted
