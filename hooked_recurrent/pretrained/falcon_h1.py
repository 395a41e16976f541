"""Falcon-H1 (TII): in every layer a Mamba-2 mixer and softmax attention (RoPE) run in parallel on
the same normed residual and are summed, then a SwiGLU MLP; muP multipliers; config, weight
conversion, block factory.

Reads `FalconH1ForCausalLM` checkpoints (`model.layers.{l}.mamba.*`, `.self_attn.*`,
`.feed_forward.*`). Blocks are `ParallelBlock`s: the Mamba-2 mixer at `blocks.{l}.attn` (so the
state hooks keep their names), the attention at `blocks.{l}.attn2`.

The mixer's width is `mamba_d_ssm` (not tied to `expand * hidden_size`); its gated norm is
optional (`mamba_rms_norm`; without it y * silu(z)) and may come before the gate
(`mamba_norm_before_gate`). Every muP multiplier multiplies the output of a linear map, so the
conversion folds it into that map's weights (and back in `to_hf_state_dict`):

    embedding_multiplier -> embedding        lm_head_multiplier -> unembedding
    ssm_in_multiplier x ssm_multipliers (per z / x / B / C / dt rows) -> W_in
    ssm_out_multiplier -> W_out              attention_in_multiplier -> q, k, v projections
    key_multiplier -> k projection           attention_out_multiplier -> o projection
    mlp_multipliers (gate, down) -> W_gate, W_out of the MLP

The hooks then show the quantities the model uses (`attn2.hook_k` is the scaled key, `hook_embed`
the scaled embedding). A tied checkpoint with embedding or lm_head multipliers other than 1 is
refused (the one shared matrix cannot carry both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hooked_recurrent.components.block import ParallelBlock
from hooked_recurrent.components.mlp import GatedMLP
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.pretrained import Family, register_family
from hooked_recurrent.pretrained.mamba2 import build_mixer, mixer_map
from hooked_recurrent.pretrained.mamba2_hybrid import (
    BRIDGE,
    HybridConfig,
    attention_map,
    build_attention,
    fold_scales,
    mamba2_fields,
    rename_layers,
    rope_theta_and_fraction,
)

__all__ = ["FalconH1Config", "config_from_hf", "convert_state_dict", "to_hf_state_dict"]


@dataclass
class FalconH1Config(HybridConfig):
    """Falcon-H1's muP multipliers (Hugging Face names), folded into the weights at conversion.

    Attributes:
        multipliers: `embedding_multiplier`, `lm_head_multiplier`, `ssm_in_multiplier`,
            `ssm_out_multiplier`, `attention_in_multiplier`, `attention_out_multiplier`,
            `key_multiplier` (floats), `ssm_multipliers` (5: z, x, B, C, dt rows of in_proj) and
            `mlp_multipliers` (2: gate, down).
    """

    multipliers: dict[str, Any] = field(default_factory=dict)


_SCALARS = (
    "embedding_multiplier",
    "lm_head_multiplier",
    "ssm_in_multiplier",
    "ssm_out_multiplier",
    "attention_in_multiplier",
    "attention_out_multiplier",
    "key_multiplier",
)


def config_from_hf(config: dict[str, Any]) -> FalconH1Config:
    """Our config from a Hugging Face `FalconH1Config` dict."""
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r}: only 'silu' is supported")
    fields = mamba2_fields(config, d_inner=config.get("mamba_d_ssm"))
    theta, _ = rope_theta_and_fraction(config)  # Falcon-H1 rotates every channel
    mult: dict[str, Any] = {k: float(config.get(k, 1.0) or 1.0) for k in _SCALARS}
    mult["ssm_multipliers"] = [float(x) for x in config.get("ssm_multipliers") or [1.0] * 5]
    mult["mlp_multipliers"] = [float(x) for x in config.get("mlp_multipliers") or [1.0] * 2]
    tie = fields["tie_word_embeddings"]
    if tie and (mult["embedding_multiplier"], mult["lm_head_multiplier"]) != (1.0, 1.0):
        raise ValueError(
            "tied Falcon-H1 embeddings with embedding_multiplier or lm_head_multiplier != 1 are "
            "not supported (the multipliers are folded into the weights)"
        )
    n_layers = config["num_hidden_layers"]
    return FalconH1Config(
        architecture="falcon_h1",
        n_layers=n_layers,
        layer_types=["recurrent"] * n_layers,
        out_bias=bool(config.get("projectors_bias", False)),
        gated_norm=bool(config.get("mamba_rms_norm", False)),
        norm_before_gate=bool(config.get("mamba_norm_before_gate", True)),
        rotary_dim=fields["attn_d_head"],
        rope_theta=theta,
        mlp_bias=bool(config.get("mlp_bias", False)),
        multipliers=mult,
        hf_config=config,
        **fields,
    )


def build_block(cfg: FalconH1Config, layer: int) -> ParallelBlock:
    """Mamba-2 mixer (`attn`) and attention (`attn2`) in parallel, then the SwiGLU MLP."""
    return ParallelBlock(
        layer,
        ln1=RMSNorm(cfg.d_model, cfg.eps),
        attn=build_mixer(cfg, layer),
        attn2=build_attention(cfg, layer),
        ln2=RMSNorm(cfg.d_model, cfg.eps),
        mlp=GatedMLP(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias),
    )


def _layer_map(cfg: FalconH1Config) -> dict[str, str]:
    """Every layer's names: ours (after "blocks.{l}.") -> Hugging Face's (after "layers.{l}.")."""
    kinds = ("weight", "bias") if cfg.mlp_bias else ("weight",)
    mlp = {
        f"mlp.{ours}.{k}": f"feed_forward.{theirs}.{k}"
        for ours, theirs in (("W_gate", "gate_proj"), ("W_in", "up_proj"), ("W_out", "down_proj"))
        for k in kinds
    }
    attn2 = {
        k.replace("attn.", "attn2.", 1): v for k, v in attention_map(cfg, "self_attn.").items()
    }
    norms = {"ln1.w": "input_layernorm.weight", "ln2.w": "pre_ff_layernorm.weight"}
    return {**norms, **mixer_map(cfg, "attn.", "mamba."), **attn2, **mlp}


def _scales(cfg: FalconH1Config) -> dict[str, tuple[Tensor, Tensor]]:
    """Per projection (our name, after "blocks.{l}."): the factors folded into its weight rows and
    its bias."""
    m = cfg.multipliers
    Di, GN, H = cfg.d_inner, cfg.n_groups * cfg.d_k, cfg.n_heads
    mup = torch.cat(
        [
            torch.full((n,), x)
            for n, x in zip((Di, Di, GN, GN, H), m["ssm_multipliers"], strict=True)
        ]
    )
    a_in, k_mult = m["attention_in_multiplier"], m["key_multiplier"]
    gate, down = m["mlp_multipliers"]
    pairs = {
        "attn.W_in": (m["ssm_in_multiplier"] * mup, mup),
        "attn.W_out": (m["ssm_out_multiplier"], m["ssm_out_multiplier"]),
        "attn2.q_proj": (a_in, 1.0),
        "attn2.k_proj": (a_in * k_mult, k_mult),
        "attn2.v_proj": (a_in, 1.0),
        "attn2.o_proj": (m["attention_out_multiplier"], m["attention_out_multiplier"]),
        "mlp.W_gate": (gate, gate),
        "mlp.W_out": (down, down),
    }
    return {k: (torch.as_tensor(w), torch.as_tensor(b)) for k, (w, b) in pairs.items()}


def convert_state_dict(sd: dict[str, Tensor], cfg: FalconH1Config) -> dict[str, Tensor]:
    """A `FalconH1ForCausalLM` state dict in our names, the muP multipliers folded in."""
    if "model.embed_tokens.weight" not in sd:
        raise KeyError("no model.embed_tokens.weight: not a Falcon-H1 state dict")
    m = cfg.multipliers
    embed = sd["model.embed_tokens.weight"]
    out = {"ln_final.w": sd["model.final_layernorm.weight"]}
    if cfg.tie_word_embeddings:
        out["embed.weight"] = out["unembed.weight"] = embed
    else:
        if "lm_head.weight" not in sd:
            raise KeyError("untied Falcon-H1 checkpoint lacks lm_head.weight")
        out["embed.weight"] = embed * m["embedding_multiplier"]
        out["unembed.weight"] = sd["lm_head.weight"] * m["lm_head_multiplier"]
    out.update(rename_layers(sd, cfg, lambda li: _layer_map(cfg), "model.layers."))
    fold_scales(out, cfg, _scales(cfg))
    return out


def to_hf_state_dict(sd: dict[str, Tensor], cfg: FalconH1Config) -> dict[str, Tensor]:
    """Our state dict in `FalconH1ForCausalLM` names, the multipliers divided back out."""
    m = cfg.multipliers
    ours = dict(sd)
    fold_scales(ours, cfg, _scales(cfg), inverse=True)
    out = {
        "model.embed_tokens.weight": sd["embed.weight"] / m["embedding_multiplier"],
        "model.final_layernorm.weight": sd["ln_final.w"],
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["unembed.weight"] / m["lm_head_multiplier"]
    out.update(rename_layers(ours, cfg, lambda li: _layer_map(cfg), "model.layers.", True))
    return out


FAMILY = register_family(
    Family(
        architecture="falcon_h1",
        display="Falcon-H1",
        model_types=("falcon_h1",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
        checkpoints=(
            "tiiuae/Falcon-H1-0.5B-Base (0.5B)",
            "tiiuae/Falcon-H1-1.5B-Base (1.5B)",
            "tiiuae/Falcon-H1-7B-Base (7B)",
            "tiiuae/Falcon-H1-34B-Base (34B)",
        ),
        layout="every layer: Mamba-2 mixer (attn) and RoPE attention (attn2) in parallel on one "
        "normed residual, summed, then a SwiGLU MLP; muP multipliers folded into the weights",
        bridge=BRIDGE,
    )
)
