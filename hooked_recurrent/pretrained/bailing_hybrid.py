"""Bailing hybrid (Ling 3): KDA with a bounded decay, MLA with interleaved RoPE + head gate, MoE.

The blocks, the config and the weight conversion are Kimi Linear's (`kimi_linear.py`) with other
constructor parameters: KDA's decay is the "safe" gate lower_bound * sigmoid(exp(A_log) f) with
full-rank gate projections, and the MLA layers rotate their RoPE channels in interleaved pairs and
scale each head's output by a sigmoid gate. Reads the published layout (`model.word_embeddings`,
`attention.*`, `attention.dense`, per-expert `gate_proj/up_proj/down_proj`, `gate.expert_bias`;
what `save_pretrained` writes) and a model's in-memory layout. Multi-token-prediction layers
after the last block are read and dropped.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from torch import Tensor

from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.pretrained import Family, register_family
from hooked_recurrent.pretrained.kimi_linear import (
    _KDA,
    _MLA,
    KdaHybridConfig,
    WeightNames,
    build_block,
    convert_layer,
    hybrid_config,
    to_hf_state_dict,
)

__all__ = ["config_from_hf", "convert_state_dict", "to_bailing_state_dict", "BAILING_NAMES"]

logger = logging.getLogger(__name__)

_KDA_BAILING = {k: v for k, v in _KDA.items() if not k.startswith(("W_f.", "W_g."))} | {
    "W_f.weight": "self_attn.forget_gate.f_proj.weight",
    "W_g.weight": "self_attn.g_proj.weight",
}
_MLA_BAILING = _MLA | {"W_g.weight": "self_attn.g_proj.weight"}


def _published(name: str) -> str:
    """The name in Ant Group's checkpoints."""
    name = name.replace("self_attn.forget_gate.", "self_attn.")
    name = name.replace("self_attn.o_proj.", "self_attn.dense.").replace("self_attn.", "attention.")
    return name.replace("gate.e_score_correction_bias", "gate.expert_bias")


BAILING_NAMES = WeightNames(_KDA_BAILING, _MLA_BAILING, _published, lambda h: (h,))


def config_from_hf(config: dict[str, Any]) -> KdaHybridConfig:
    """Our config from a Hugging Face Bailing hybrid config dict (read through `transformers`'
    `BailingHybridConfig`, which derives the layer types)."""
    from transformers import BailingHybridConfig

    c = BailingHybridConfig.from_dict(config)
    rope = c.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"Bailing hybrid: only default RoPE is supported, not {rope['rope_type']}")
    if c.num_key_value_heads != c.num_attention_heads:
        raise ValueError("Bailing hybrid: MLA expects num_key_value_heads == num_attention_heads")
    return hybrid_config(
        c,
        "bailing_hybrid",
        config,
        decay="safe" if c.kda_safe_gate else "softplus",
        lower_bound=float(c.kda_lower_bound),
        rope_theta=float(rope.get("rope_theta", c.rope_theta)),
        head_gate=True,
    )


def convert_state_dict(sd: dict[str, Tensor], cfg: KdaHybridConfig) -> dict[str, Tensor]:
    """A Hugging Face Bailing hybrid state dict in our names."""
    embed = "model.embed_tokens.weight"
    embed = embed if embed in sd else "model.word_embeddings.weight"
    out = {"embed.weight": sd[embed], "ln_final.w": sd["model.norm.weight"]}
    out["unembed.weight"] = out["embed.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    for layer in range(cfg.n_layers):
        out.update(convert_layer(sd, cfg, layer, BAILING_NAMES))
    layer_of = (re.match(r"model\.layers\.(\d+)\.", k) for k in sd)
    mtp = [k for k, m in zip(sd, layer_of, strict=True) if m and int(m[1]) >= cfg.n_layers]
    if mtp:
        logger.info("Bailing hybrid: ignoring %d multi-token-prediction tensors", len(mtp))
        for k in mtp:
            sd[k]  # read: the loader reports tensors no conversion read
    return out


def to_bailing_state_dict(sd: dict[str, Tensor], cfg: KdaHybridConfig) -> dict[str, Tensor]:
    """Our state dict in `BailingHybridForCausalLM`'s in-memory names."""
    return to_hf_state_dict(sd, cfg, BAILING_NAMES)


FAMILY = register_family(
    Family(
        architecture="bailing_hybrid",
        display="Bailing hybrid",
        model_types=("bailing_hybrid",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
        checkpoints=("inclusionAI/Ling-3.0-Flash (the reference's documented checkpoint)",),
        layout="groups of `layer_group_size` layers: KDA layers then one MLA layer (interleaved "
        "RoPE, head gate); dense MLPs in the first blocks, MoE (sigmoid router, shared expert) "
        "after",
        bridge="not among TransformerLens 4.3's recurrent bridges (Gated DeltaNet, Mamba, RWKV-7): "
        "module hooks on the HF layers only, no state, write or decay hooks",
    )
)
