"""Granite 4.0 hybrids (IBM, `GraniteMoeHybridForCausalLM`): Mamba-2 or attention (NoPE, or RoPE
where `position_embedding_type` is "rope") at `attn`, then a MoE plus a shared SwiGLU MLP (or the
shared MLP alone when there are no experts); Granite's multipliers; config, weight conversion,
block factory.

The multipliers:

* `attention_multiplier` is the attention's softmax scale (a constructor argument, in place of
  1 / sqrt(d_head));
* `residual_multiplier` multiplies each sublayer's output before the residual add: folded into
  the output projections (Mamba-2 `W_out`, attention `o_proj`, the experts' and shared MLP's
  `W_out`), so `hook_attn_out` / `hook_mlp_out` are what is added to the residual;
* `embedding_multiplier` multiplies the embedding: a `ScaleEmbedding` after the embedding (the
  matrix is usually tied to the unembedding), so `hook_embed` is the unscaled embedding and
  `blocks.0.hook_resid_pre` the scaled one;
* `logits_scaling` divides the logits: folded into the final norm's weight, so
  `ln_final.hook_normalized` is divided by it too.

The MoE router is a softmax over the top-k logits (`MoE` with softmax scoring and renormalised
top-k), the experts and the shared MLP are SwiGLU; transformers' fused `gate_up_proj` /
`input_linear` are split into our `W_gate` (first half) and `W_in` (second half).
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass
from typing import Any, cast

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.components.block import Block
from hooked_recurrent.components.mlp import GatedMLP
from hooked_recurrent.components.moe import MoE
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

__all__ = ["GraniteHybridConfig", "ScaleEmbedding", "config_from_hf", "convert_state_dict"]

_KINDS = {"mamba": "recurrent", "linear_attention": "recurrent", "attention": "attention",
          "full_attention": "attention"}  # fmt: skip


@dataclass
class GraniteHybridConfig(HybridConfig):
    """Granite 4.0 hybrid fields beyond `HybridConfig` (Hugging Face name in brackets).

    Attributes:
        n_experts, top_k: routed experts and experts per token [num_local_experts,
            num_experts_per_tok]; 0 experts: the shared MLP alone.
        d_shared: the shared MLP's width [shared_intermediate_size]; `d_mlp` is each expert's
            [intermediate_size].
        attention_multiplier, residual_multiplier, embedding_multiplier, logits_scaling: see the
            module docstring.
    """

    n_experts: int = 0
    top_k: int = 0
    d_shared: int = 0
    attention_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0


class ScaleEmbedding(nn.Module):
    """x -> multiplier * x, after the embedding (Granite's `embedding_multiplier`)."""

    def __init__(self, multiplier: float) -> None:
        super().__init__()
        self.multiplier = float(multiplier)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """`x` times the embedding multiplier."""
        return x * self.multiplier


def config_from_hf(config: dict[str, Any]) -> GraniteHybridConfig:
    """Our config from a Hugging Face `GraniteMoeHybridConfig` dict."""
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r}: only 'silu' is supported")
    n_layers = config["num_hidden_layers"]
    types = config.get("layer_types") or config.get("layers_block_type") or ["mamba"] * n_layers
    bad = sorted(set(types) - set(_KINDS))
    if bad:
        raise ValueError(f"layer_types has unknown kinds {bad}; known: {sorted(_KINDS)}")
    fields = mamba2_fields(config, eps=1e-6)
    rope = config.get("position_embedding_type") == "rope"
    theta, fraction = rope_theta_and_fraction(config) if rope else (10000.0, 0.0)
    return GraniteHybridConfig(
        architecture="granitemoehybrid",
        n_layers=n_layers,
        layer_types=[_KINDS[t] for t in types],
        rotary_dim=int(fields["attn_d_head"] * fraction),
        rope_theta=theta,
        n_experts=config.get("num_local_experts") or 0,
        top_k=config.get("num_experts_per_tok") or 0,
        d_shared=config.get("shared_intermediate_size", 1024),
        attention_multiplier=float(config.get("attention_multiplier", 1.0)),
        residual_multiplier=float(config.get("residual_multiplier", 1.0)),
        embedding_multiplier=float(config.get("embedding_multiplier", 1.0)),
        logits_scaling=float(config.get("logits_scaling", 1.0)),
        hf_config=config,
        **fields,
    )


def build_block(cfg: GraniteHybridConfig, layer: int) -> Block:
    """Mamba-2 or attention at `attn`, then the MoE with its shared MLP (or the shared MLP)."""
    attn: nn.Module
    mlp: nn.Module
    if cfg.layer_types[layer] == "recurrent":
        attn = build_mixer(cfg, layer)
    else:
        attn = build_attention(cfg, layer, scale=cfg.attention_multiplier)
    if cfg.n_experts:
        mlp = MoE(cfg.d_model, cfg.d_mlp, cfg.n_experts, cfg.top_k, d_shared=cfg.d_shared)
    else:
        mlp = GatedMLP(cfg.d_model, cfg.d_shared)
    return Block.rms_norm(layer, cfg.d_model, cfg.eps, attn, mlp)


def _layer_map(cfg: GraniteHybridConfig, layer: int) -> dict[str, str]:
    """Layer `layer`'s names (ours -> Hugging Face's) for the tensors that map one to one."""
    norms = {"ln1.w": "input_layernorm.weight", "ln2.w": "post_attention_layernorm.weight"}
    if cfg.layer_types[layer] == "recurrent":
        mixer = mixer_map(cfg, "attn.", "mamba.")
    else:
        mixer = attention_map(cfg, "self_attn.")
    shared = "mlp.shared_expert." if cfg.n_experts else "mlp."
    mlp = {f"{shared}W_out.weight": "shared_mlp.output_linear.weight"}
    if cfg.n_experts:
        mlp["mlp.W_router.weight"] = "block_sparse_moe.router.weight"
        mlp["mlp.experts.W_out"] = "block_sparse_moe.experts.down_proj"
    return {**norms, **mixer, **mlp}


def _fused(cfg: GraniteHybridConfig) -> dict[str, tuple[str, str]]:
    """Fused gate/up tensors: Hugging Face name (after "layers.{l}.") -> our two halves."""
    shared = "mlp.shared_expert." if cfg.n_experts else "mlp."
    out = {"shared_mlp.input_linear.weight": (f"{shared}W_gate.weight", f"{shared}W_in.weight")}
    if cfg.n_experts:
        out["block_sparse_moe.experts.gate_up_proj"] = ("mlp.experts.W_gate", "mlp.experts.W_in")
    return out


def _scales(cfg: GraniteHybridConfig) -> dict[str, tuple[Tensor, Tensor]]:
    r = torch.tensor(cfg.residual_multiplier)
    names = (
        "attn.W_out",
        "attn.o_proj",
        "mlp.W_out",
        "mlp.shared_expert.W_out",
        "mlp.experts.W_out",
    )
    return dict.fromkeys(names, (r, r))


#: the published checkpoints' MoE names -> transformers' in-memory names (after "layers.{l}.")
_PUBLISHED = {
    "block_sparse_moe.input_linear.weight": "block_sparse_moe.experts.gate_up_proj",
    "block_sparse_moe.output_linear.weight": "block_sparse_moe.experts.down_proj",
    "block_sparse_moe.router.layer.weight": "block_sparse_moe.router.weight",
}


def _renamed(sd: dict[str, Tensor], cfg: GraniteHybridConfig) -> dict[str, Tensor]:
    """The published layout's MoE tensors under transformers' in-memory names."""
    out = {}
    for layer in range(cfg.n_layers):
        for published, theirs in _PUBLISHED.items():
            key = f"model.layers.{layer}.{published}"
            if key in sd:
                out[f"model.layers.{layer}.{theirs}"] = sd[key]
    return out


def convert_state_dict(sd: dict[str, Tensor], cfg: GraniteHybridConfig) -> dict[str, Tensor]:
    """A `GraniteMoeHybridForCausalLM` state dict (the published layout, as `save_pretrained`
    writes it, or transformers' in-memory names) in our names, the multipliers folded in."""
    if "model.embed_tokens.weight" not in sd:
        raise KeyError("no model.embed_tokens.weight: not a Granite 4.0 hybrid state dict")
    sd = cast(
        dict[str, Tensor], ChainMap(_renamed(sd, cfg), sd)
    )  # the checkpoint's reads stay recorded by the loader
    embed = sd["model.embed_tokens.weight"]
    out = {"embed.weight": embed, "ln_final.w": sd["model.norm.weight"] / cfg.logits_scaling}
    lm_head = sd.get("lm_head.weight")
    if lm_head is None and not cfg.tie_word_embeddings:
        raise KeyError("untied Granite checkpoint lacks lm_head.weight")
    out["unembed.weight"] = embed if cfg.tie_word_embeddings else lm_head
    out.update(rename_layers(sd, cfg, lambda li: _layer_map(cfg, li), "model.layers."))
    for layer in range(cfg.n_layers):
        for theirs, (gate, up) in _fused(cfg).items():
            key = f"model.layers.{layer}.{theirs}"
            if key not in sd:
                raise KeyError(f"granitemoehybrid checkpoint lacks {key}")
            g, u = sd[key].chunk(2, dim=-2)
            out[f"blocks.{layer}.{gate}"], out[f"blocks.{layer}.{up}"] = g, u
    fold_scales(out, cfg, _scales(cfg))
    return out


def to_hf_state_dict(sd: dict[str, Tensor], cfg: GraniteHybridConfig) -> dict[str, Tensor]:
    """Our state dict in `GraniteMoeHybridForCausalLM` names, the multipliers divided out."""
    ours = dict(sd)
    fold_scales(ours, cfg, _scales(cfg), inverse=True)
    out = {
        "model.embed_tokens.weight": sd["embed.weight"],
        "model.norm.weight": sd["ln_final.w"] * cfg.logits_scaling,
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["unembed.weight"]
    out.update(rename_layers(ours, cfg, lambda li: _layer_map(cfg, li), "model.layers.", True))
    for layer in range(cfg.n_layers):
        for theirs, (gate, up) in _fused(cfg).items():
            parts = (ours[f"blocks.{layer}.{gate}"], ours[f"blocks.{layer}.{up}"])
            out[f"model.layers.{layer}.{theirs}"] = torch.cat(parts, dim=-2)
    return out


FAMILY = register_family(
    Family(
        architecture="granitemoehybrid",
        display="Granite 4.0 hybrid",
        model_types=("granitemoehybrid",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
        build_embed_norm=lambda cfg: ScaleEmbedding(cfg.embedding_multiplier),
        checkpoints=(
            "ibm-granite/granite-4.0-h-micro (3B)",
            "ibm-granite/granite-4.0-h-tiny (7B, MoE)",
            "ibm-granite/granite-4.0-h-small (32B, MoE)",
        ),
        layout="Mamba-2 layers with NoPE attention every few layers, each followed by a MoE plus "
        "a shared SwiGLU MLP (or the shared MLP alone); Granite's multipliers",
        bridge=BRIDGE,
    )
)
