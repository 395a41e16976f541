"""Nemotron-H (NVIDIA): one mixer per block - Mamba-2, attention (no RoPE), a relu^2 MLP or a
sigmoid-routed MoE - each after its own RMSNorm; config, weight conversion, block factory.

Reads `NemotronHForCausalLM` checkpoints in both layouts: transformers' (`model.layers.{l}.mixer`,
experts stacked as `mixer.experts.up_proj` `[expert, d_mlp, d_model]`) and the published one
(`backbone.layers.{l}.mixer`, one `mixer.experts.{e}.up_proj.weight` per expert). The layer kinds
come from `layers_block_type` or the published `hybrid_override_pattern` ("M" Mamba-2, "*"
attention, "-" MLP, "E" MoE). The Mamba-2 step size is clamped to the config's `time_step_limit`
(default: no clamp) at every position, as NVIDIA's kernel path (`dt_limit=time_step_limit`) and
transformers >= 5.25 do; transformers 5.23-5.24 clamped below at `time_step_min` instead (as the
published code's torch fallback does), which differs only where softplus(dt + dt_bias) falls below
`time_step_min`.

In our blocks a Mamba-2 or attention block is `ln1` -> `attn` (no MLP); an MLP or MoE block is
`ln2` -> `mlp` (no token mixer), so the hook names say what each block holds.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from hooked_recurrent.components.block import Block
from hooked_recurrent.components.mlp import ACTIVATIONS, MLP
from hooked_recurrent.components.moe import MoE
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.pretrained import Family, register_family
from hooked_recurrent.pretrained.mamba2 import build_mixer, mixer_map
from hooked_recurrent.pretrained.mamba2_hybrid import (
    BRIDGE,
    HybridConfig,
    attention_map,
    build_attention,
    rename_layers,
    time_step_limit,
)

__all__ = ["NemotronHConfig", "config_from_hf", "convert_state_dict", "to_hf_state_dict"]

#: Hugging Face block type -> ours
_KINDS = {
    "linear_attention": "recurrent",
    "full_attention": "attention",
    "mlp": "mlp",
    "moe": "moe",
}
_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


@dataclass
class NemotronHConfig(HybridConfig):
    """Nemotron-H fields beyond `HybridConfig` (Hugging Face name in brackets).

    Attributes:
        n_experts, top_k: routed experts and experts per token [n_routed_experts,
            num_experts_per_tok].
        d_expert: each routed expert's hidden width [moe_intermediate_size].
        d_shared: the shared expert's hidden width [moe_shared_expert_intermediate_size].
        routed_scale, norm_topk: [routed_scaling_factor, norm_topk_prob].
        n_group, topk_group: the router's group limit [n_group, topk_group].
    """

    n_experts: int = 0
    top_k: int = 0
    d_expert: int = 0
    d_shared: int = 0
    routed_scale: float = 1.0
    norm_topk: bool = True
    n_group: int = 1
    topk_group: int = 1


def _block_types(config: dict[str, Any]) -> list[str]:
    types = config.get("layers_block_type") or config.get("layer_types")
    if not types:
        pattern = config.get("hybrid_override_pattern")
        if not pattern:
            raise KeyError("layers_block_type")
        bad = sorted(set(pattern) - set(_PATTERN))
        if bad:
            raise ValueError(f"hybrid_override_pattern has unknown layer kinds {bad}")
        types = [_PATTERN[c] for c in pattern]
    bad = sorted(set(types) - set(_KINDS))
    if bad:
        raise ValueError(f"layers_block_type has unknown kinds {bad}; known: {sorted(_KINDS)}")
    return [_KINDS[t] for t in types]


def config_from_hf(config: dict[str, Any]) -> NemotronHConfig:
    """Our config from a Hugging Face `NemotronHConfig` dict."""
    kinds = _block_types(config)
    if config.get("mamba_hidden_act", "silu") != "silu":
        raise ValueError(f"mamba_hidden_act {config['mamba_hidden_act']!r}: only 'silu'")
    if config.get("mlp_hidden_act", "relu2") not in ACTIVATIONS:
        raise ValueError(f"mlp_hidden_act {config['mlp_hidden_act']!r} is not supported")
    if "moe" in kinds and config.get("moe_latent_size") is not None:
        raise ValueError(
            "Nemotron-H MoE with moe_latent_size (latent projections) is not supported"
        )
    if "moe" in kinds and config.get("mlp_bias", False):
        raise ValueError("Nemotron-H MoE with mlp_bias=True is not supported")
    n_attn = config.get("num_attention_heads", 32)
    return NemotronHConfig(
        architecture="nemotron_h",
        n_layers=len(kinds),
        d_model=config["hidden_size"],
        d_vocab=config["vocab_size"],
        layer_types=kinds,
        n_heads=config["mamba_num_heads"],
        d_k=config["ssm_state_size"],
        d_v=config["mamba_head_dim"],
        n_groups=config.get("n_groups", 8),
        conv_kernel=config.get("conv_kernel", 4),
        eps=config.get("layer_norm_epsilon", 1e-5),
        chunk_size=config.get("chunk_size", 128),
        # NVIDIA's kernels and transformers >= 5.25 clamp dt to time_step_limit (not time_step_min)
        time_step_limit=time_step_limit(
            config, "time_step_limit" if "time_step_limit" in config else "mamba_dt_limit"
        ),
        use_conv_bias=bool(config.get("use_conv_bias", True)),
        use_bias=bool(config.get("use_bias", False)),
        # transformers' NemotronHForCausalLM never ties lm_head to the embedding
        tie_word_embeddings=False,
        d_mlp=config.get("intermediate_size", 0),
        attn_n_heads=n_attn,
        attn_n_kv_heads=config.get("num_key_value_heads") or n_attn,
        attn_d_head=config.get("head_dim") or config["hidden_size"] // n_attn,
        rotary_dim=0,  # Nemotron-H's attention has no positional encoding
        attn_bias=False,  # transformers builds its projections without bias
        mlp_bias=bool(config.get("mlp_bias", False)),
        mlp_act=config.get("mlp_hidden_act", "relu2"),
        n_experts=config.get("n_routed_experts", 0),
        top_k=config.get("num_experts_per_tok", 0),
        d_expert=config.get("moe_intermediate_size", 0),
        d_shared=config.get("moe_shared_expert_intermediate_size", 0),
        routed_scale=float(config.get("routed_scaling_factor", 1.0)),
        norm_topk=bool(config.get("norm_topk_prob", True)),
        n_group=config.get("n_group", 1),
        topk_group=config.get("topk_group", 1),
        hf_config=config,
    )


def build_block(cfg: NemotronHConfig, layer: int) -> Block:
    """One mixer after an RMSNorm: Mamba-2 / attention at `attn`, MLP / MoE at `mlp`."""
    kind = cfg.layer_types[layer]
    norm = RMSNorm(cfg.d_model, cfg.eps)
    if kind == "recurrent":
        return Block(layer, ln1=norm, attn=build_mixer(cfg, layer))
    if kind == "attention":
        return Block(layer, ln1=norm, attn=build_attention(cfg, layer))
    mlp: nn.Module
    if kind == "mlp":
        mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.mlp_act, cfg.mlp_bias)
    else:
        mlp = MoE(
            cfg.d_model,
            cfg.d_expert,
            cfg.n_experts,
            cfg.top_k,
            scoring="sigmoid",
            norm_topk=cfg.norm_topk,
            routed_scale=cfg.routed_scale,
            score_bias=True,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            d_shared=cfg.d_shared,
            gated=False,
            act=ACTIVATIONS[cfg.mlp_act],
            shared_act=cfg.mlp_act,
        )
    return Block(layer, ln1=None, attn=None, ln2=norm, mlp=mlp)


def _layer_map(cfg: NemotronHConfig, layer: int) -> dict[str, str]:
    """Layer `layer`'s names: ours (after "blocks.{l}.") -> Hugging Face's (after "layers.{l}.")."""
    kind = cfg.layer_types[layer]
    if kind == "recurrent":
        return {"ln1.w": "norm.weight", **mixer_map(cfg, "attn.", "mixer.")}
    if kind == "attention":
        return {"ln1.w": "norm.weight", **attention_map(cfg, "mixer.")}
    if kind == "mlp":
        kinds = ("weight", "bias") if cfg.mlp_bias else ("weight",)
        return {
            "ln2.w": "norm.weight",
            **{f"mlp.W_in.{k}": f"mixer.up_proj.{k}" for k in kinds},
            **{f"mlp.W_out.{k}": f"mixer.down_proj.{k}" for k in kinds},
        }
    out = {
        "ln2.w": "norm.weight",
        "mlp.W_router.weight": "mixer.gate.weight",
        "mlp.score_bias": "mixer.gate.e_score_correction_bias",
        "mlp.experts.W_in": "mixer.experts.up_proj",
        "mlp.experts.W_out": "mixer.experts.down_proj",
    }
    if cfg.d_shared:
        out["mlp.shared_expert.W_in.weight"] = "mixer.shared_experts.up_proj.weight"
        out["mlp.shared_expert.W_out.weight"] = "mixer.shared_experts.down_proj.weight"
    return out


def _stack_experts(sd: dict[str, Tensor], cfg: NemotronHConfig, p: str) -> dict[str, Tensor]:
    """The published layout's per-expert weights stacked as transformers stores them."""
    out = {}
    for layer in (i for i, k in enumerate(cfg.layer_types) if k == "moe"):
        for proj in ("up_proj", "down_proj"):
            fused = f"{p}layers.{layer}.mixer.experts.{proj}"
            if fused in sd:
                continue
            keys = [
                f"{p}layers.{layer}.mixer.experts.{e}.{proj}.weight" for e in range(cfg.n_experts)
            ]
            if all(k in sd for k in keys):
                out[fused] = torch.stack([sd[k] for k in keys])
    return out


def convert_state_dict(sd: dict[str, Tensor], cfg: NemotronHConfig) -> dict[str, Tensor]:
    """A `NemotronHForCausalLM` state dict (either layout) in our names."""
    p = next((p for p in ("model.", "backbone.") if f"{p}embeddings.weight" in sd), None)
    if p is None:
        raise KeyError("no model.embeddings.weight or backbone.embeddings.weight: not Nemotron-H")
    embed = sd[f"{p}embeddings.weight"]
    out = {"embed.weight": embed, "ln_final.w": sd[f"{p}norm_f.weight"]}
    out["unembed.weight"] = sd["lm_head.weight"]
    # the stacked experts in front of the checkpoint (whose reads stay recorded by the loader)
    sd = cast(dict[str, Tensor], ChainMap(_stack_experts(sd, cfg, p), sd))
    out.update(rename_layers(sd, cfg, lambda li: _layer_map(cfg, li), f"{p}layers."))
    return out


def to_hf_state_dict(sd: dict[str, Tensor], cfg: NemotronHConfig) -> dict[str, Tensor]:
    """Our state dict in transformers' `NemotronHForCausalLM` names (for saving a checkpoint)."""
    out = {"model.embeddings.weight": sd["embed.weight"], "model.norm_f.weight": sd["ln_final.w"]}
    out["lm_head.weight"] = sd["unembed.weight"]
    out.update(rename_layers(sd, cfg, lambda li: _layer_map(cfg, li), "model.layers.", True))
    return out


FAMILY = register_family(
    Family(
        architecture="nemotron_h",
        display="Nemotron-H",
        model_types=("nemotron_h",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
        checkpoints=(
            "nvidia/Nemotron-H-8B-Base-8K (8B)",
            "nvidia/Nemotron-H-4B-Base-8K (4B)",
            "nvidia/NVIDIA-Nemotron-Nano-9B-v2 (9B)",
            "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 (30B, MoE)",
        ),
        layout="one mixer per block after an RMSNorm, from hybrid_override_pattern: Mamba-2 "
        "(M), attention without RoPE (*), relu^2 MLP (-), sigmoid-routed MoE (E)",
        bridge=BRIDGE,
    )
)
