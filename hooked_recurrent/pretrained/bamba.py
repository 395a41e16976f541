"""Bamba (IBM): Mamba-2 layers with softmax attention at `attn_layer_indices`, each followed by a
SwiGLU MLP; config, weight conversion, block factory.

Reads `BambaForCausalLM` checkpoints (`model.layers.{l}.mamba.*` or `.self_attn.*`, then
`.feed_forward.*`). The attention has no output gate and no q/k norm, and rotates half of each
head's channels (`partial_rotary_factor` 0.5, which transformers hard-codes for Bamba).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from hooked_recurrent.components.block import Block
from hooked_recurrent.components.mlp import GatedMLP
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.pretrained import Family, register_family
from hooked_recurrent.pretrained.mamba2 import build_mixer, mixer_map
from hooked_recurrent.pretrained.mamba2_hybrid import (
    BRIDGE,
    HybridConfig,
    attention_map,
    build_attention,
    hf_ends,
    mamba2_fields,
    rename_layers,
    rope_theta_and_fraction,
)

__all__ = ["config_from_hf", "convert_state_dict", "to_hf_state_dict", "to_hf_config"]


def config_from_hf(config: dict[str, Any]) -> HybridConfig:
    """Our config from a Hugging Face `BambaConfig` dict."""
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r}: only 'silu' is supported")
    n_layers = config["num_hidden_layers"]
    attn = set(config.get("attn_layer_indices") or [])
    theta, fraction = rope_theta_and_fraction(config)
    fields = mamba2_fields(config)
    return HybridConfig(
        architecture="bamba",
        n_layers=n_layers,
        layer_types=["attention" if i in attn else "recurrent" for i in range(n_layers)],
        rotary_dim=int(fields["attn_d_head"] * fraction),
        rope_theta=theta,
        mlp_bias=bool(config.get("mlp_bias", False)),
        **fields,
        hf_config=config,
    )


def to_hf_config(cfg: HybridConfig) -> dict[str, Any]:
    """Keyword arguments of a Hugging Face `BambaConfig` for this model."""
    return dict(
        vocab_size=cfg.d_vocab,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.attn_n_heads,
        num_key_value_heads=cfg.attn_n_kv_heads,
        rms_norm_eps=cfg.eps,
        attn_layer_indices=cfg.attention_layers,
        mamba_n_heads=cfg.n_heads,
        mamba_d_head=cfg.d_v,
        mamba_n_groups=cfg.n_groups,
        mamba_d_state=cfg.d_k,
        mamba_d_conv=cfg.conv_kernel,
        mamba_expand=cfg.d_inner // cfg.d_model,
        mamba_chunk_size=cfg.chunk_size,
        mamba_conv_bias=cfg.use_conv_bias,
        mamba_proj_bias=cfg.use_bias,
        time_step_limit=tuple(cfg.time_step_limit),
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=cfg.attn_bias,
        mlp_bias=cfg.mlp_bias,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )


def build_block(cfg: HybridConfig, layer: int) -> Block:
    """Mamba-2 mixer or attention at `attn`, then the gated MLP, each after an RMSNorm."""
    recurrent = cfg.layer_types[layer] == "recurrent"
    attn = build_mixer(cfg, layer) if recurrent else build_attention(cfg, layer)
    mlp = GatedMLP(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
    return Block.rms_norm(layer, cfg.d_model, cfg.eps, attn, mlp)


def _layer_map(cfg: HybridConfig, layer: int) -> dict[str, str]:
    """Layer `layer`'s names: ours (after "blocks.{l}.") -> Hugging Face's (after "layers.{l}.")."""
    kinds = ("weight", "bias") if cfg.mlp_bias else ("weight",)
    mlp = {
        f"mlp.{ours}.{k}": f"feed_forward.{theirs}.{k}"
        for ours, theirs in (("W_gate", "gate_proj"), ("W_in", "up_proj"), ("W_out", "down_proj"))
        for k in kinds
    }
    if cfg.layer_types[layer] == "recurrent":
        mixer = mixer_map(cfg, "attn.", "mamba.")
    else:
        mixer = attention_map(cfg, "self_attn.")
    norms = {"ln1.w": "input_layernorm.weight", "ln2.w": "pre_ff_layernorm.weight"}
    return {**norms, **mixer, **mlp}


def convert_state_dict(sd: dict[str, Tensor], cfg: HybridConfig) -> dict[str, Tensor]:
    """A `BambaForCausalLM` state dict in our names."""
    if "model.embed_tokens.weight" not in sd:
        raise KeyError("no model.embed_tokens.weight: not a Bamba state dict")
    embed = sd["model.embed_tokens.weight"]
    out = {"embed.weight": embed, "ln_final.w": sd["model.final_layernorm.weight"]}
    lm_head = sd.get("lm_head.weight")
    if lm_head is None and not cfg.tie_word_embeddings:
        raise KeyError("untied Bamba checkpoint lacks lm_head.weight")
    out["unembed.weight"] = embed if cfg.tie_word_embeddings else lm_head
    out.update(rename_layers(sd, cfg, lambda li: _layer_map(cfg, li), "model.layers."))
    return out


def to_hf_state_dict(sd: dict[str, Tensor], cfg: HybridConfig) -> dict[str, Tensor]:
    """Our state dict in `BambaForCausalLM` names (for saving a checkpoint)."""
    out = hf_ends(sd, cfg.tie_word_embeddings)
    out.update(rename_layers(sd, cfg, lambda li: _layer_map(cfg, li), "model.layers.", True))
    return out


FAMILY = register_family(
    Family(
        architecture="bamba",
        display="Bamba",
        model_types=("bamba",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
        checkpoints=("ibm-ai-platform/Bamba-9B-v1 (9B)", "ibm-ai-platform/Bamba-9B-v2 (9B)"),
        layout="32 layers: Mamba-2 mixer + SwiGLU MLP, softmax attention (RoPE on half the "
        "channels) + SwiGLU MLP at layers 9, 18, 27",
        bridge=BRIDGE,
    )
)
