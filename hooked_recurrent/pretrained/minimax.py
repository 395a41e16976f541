"""MiniMax (lightning attention + softmax attention, MoE): config, weight conversion, blocks.

Reads `MiniMaxForCausalLM` checkpoints in the published layout
(`block_sparse_moe.experts.{e}.w1`, as `save_pretrained` writes them) and a model's in-memory
layout (`mlp.experts.gate_up_proj`). Every block carries its normalised input as the residual,
scaled by the config's alpha / beta factors (`Block(scales=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from hooked_recurrent.components.attention import GatedAttention
from hooked_recurrent.components.block import Block
from hooked_recurrent.components.lightning import LightningAttention, lightning_slopes
from hooked_recurrent.components.moe import MoE
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.config import HookedRecurrentConfig
from hooked_recurrent.pretrained import Family, register_family
from hooked_recurrent.pretrained.experts import moe_prefix, read_experts, write_experts

__all__ = ["MiniMaxConfig", "config_from_hf", "convert_state_dict", "to_hf_state_dict"]


@dataclass
class MiniMaxConfig(HookedRecurrentConfig):
    """MiniMax fields beyond the shared ones (Hugging Face name in brackets).

    Attributes:
        d_mlp: each expert's hidden width [intermediate_size].
        n_experts, top_k: routed experts and experts per token [num_local_experts,
            num_experts_per_tok].
        eps: RMSNorm epsilon of the block and final norms [rms_norm_eps].
        attn_n_kv_heads: key/value heads of the softmax layers [num_key_value_heads]; their query
            heads and head size are `n_heads` and `d_k`.
        rope_theta: RoPE base of the softmax layers (full rotary).
        linear_scales, full_scales: (alpha, beta) of the residual around the lightning and the
            softmax layers [linear_attn_*_factor, full_attn_*_factor].
        mlp_scales: (alpha, beta) around the MoE [mlp_*_factor].
        tie_word_embeddings: whether the unembedding is the embedding.
        chunk_size: chunk length of the fast lightning path [block_size].
    """

    d_mlp: int = 0
    n_experts: int = 1
    top_k: int = 1
    eps: float = 1e-5
    attn_n_kv_heads: int = 0
    rope_theta: float = 10000.0
    linear_scales: tuple[float, float] = (1.0, 1.0)
    full_scales: tuple[float, float] = (1.0, 1.0)
    mlp_scales: tuple[float, float] = (1.0, 1.0)
    tie_word_embeddings: bool = False
    chunk_size: int = 64


def _factors(config: dict[str, Any], prefix: str) -> tuple[float, float]:
    """(alpha, beta) of a residual: `{prefix}_alpha_factor`, `{prefix}_beta_factor`."""
    return (
        float(config.get(f"{prefix}_alpha_factor", 1)),
        float(config.get(f"{prefix}_beta_factor", 1)),
    )


def config_from_hf(config: dict[str, Any]) -> MiniMaxConfig:
    """Our config from a Hugging Face MiniMax config dict."""
    n_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types") or [
        "full_attention" if (i + 1) % 2 else "linear_attention" for i in range(n_layers)
    ]
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"MiniMax: only default RoPE is supported, not {rope['rope_type']!r}")
    d_head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return MiniMaxConfig(
        architecture="minimax",
        n_layers=n_layers,
        d_model=config["hidden_size"],
        d_vocab=config["vocab_size"],
        layer_types=["recurrent" if t == "linear_attention" else "attention" for t in layer_types],
        n_heads=config["num_attention_heads"],
        d_k=d_head,
        d_v=d_head,
        d_mlp=config["intermediate_size"],
        n_experts=config["num_local_experts"],
        top_k=config["num_experts_per_tok"],
        eps=config["rms_norm_eps"],
        attn_n_kv_heads=config["num_key_value_heads"],
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        linear_scales=_factors(config, "linear_attn"),
        full_scales=_factors(config, "full_attn"),
        mlp_scales=_factors(config, "mlp"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        chunk_size=config.get("block_size", 256),
        hf_config=config,
    )


def build_block(cfg: MiniMaxConfig, layer: int) -> Block:
    """Layer `layer`: lightning or softmax attention, then the MoE, with scaled residuals."""
    attn: nn.Module
    if cfg.layer_types[layer] == "recurrent":
        attn = LightningAttention(
            layer, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_k, chunk_size=cfg.chunk_size
        )
        scales = cfg.linear_scales
    else:
        attn = GatedAttention(
            layer,
            cfg.d_model,
            cfg.n_heads,
            cfg.attn_n_kv_heads,
            cfg.d_k,
            cfg.d_k,
            cfg.rope_theta,
            cfg.eps,
            gated=False,
            qk_norm="none",
        )
        scales = cfg.full_scales
    mlp = MoE(cfg.d_model, cfg.d_mlp, cfg.n_experts, cfg.top_k)
    return Block.rms_norm(layer, cfg.d_model, cfg.eps, attn, mlp, scales=(*scales, *cfg.mlp_scales))


# our name (after "blocks.{l}.") -> Hugging Face name (after "layers.{l}.")
_LAYER_MAP = {
    "ln1.w": "input_layernorm.weight",
    "ln2.w": "post_attention_layernorm.weight",
}
_LINEAR_MAP = {
    "attn.W_qkv.weight": "self_attn.qkv_proj.weight",
    "attn.W_gate.weight": "self_attn.output_gate.weight",
    "attn.norm_w": "self_attn.norm.weight",
    "attn.W_out.weight": "self_attn.out_proj.weight",
}
_ATTN_MAP = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
}
#: buffers the reference stores in its state dict, all functions of the slopes we recompute
_DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


def convert_state_dict(sd: dict[str, Tensor], cfg: MiniMaxConfig) -> dict[str, Tensor]:
    """A Hugging Face MiniMax state dict in our names."""
    out = {"embed.weight": sd["model.embed_tokens.weight"], "ln_final.w": sd["model.norm.weight"]}
    out["unembed.weight"] = out["embed.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    for layer in range(cfg.n_layers):
        p = f"model.layers.{layer}."
        linear = cfg.layer_types[layer] == "recurrent"
        for ours, theirs in {**_LAYER_MAP, **(_LINEAR_MAP if linear else _ATTN_MAP)}.items():
            out[f"blocks.{layer}.{ours}"] = sd[p + theirs]
        moe = moe_prefix(sd, p)
        out[f"blocks.{layer}.mlp.W_router.weight"] = sd[moe + "gate.weight"]
        out.update(read_experts(sd, moe, cfg.n_experts, f"blocks.{layer}.mlp.experts."))
        if linear and (p + "self_attn.slope_rate") in sd:
            slopes = lightning_slopes(cfg.n_heads, layer, cfg.n_layers)
            stored = sd[p + "self_attn.slope_rate"].flatten().float()
            if not stored.allclose(slopes, rtol=1e-5, atol=0):
                raise ValueError(f"{p}self_attn.slope_rate differs from the MiniMax slopes")
            for name in _DECAY_BUFFERS[1:]:
                sd.get(p + "self_attn." + name)  # derived from the slopes: read, not kept
    return out


def to_hf_state_dict(sd: dict[str, Tensor], cfg: MiniMaxConfig) -> dict[str, Tensor]:
    """Our state dict in `MiniMaxForCausalLM`'s in-memory names (the slope buffers are left out:
    the reference rebuilds them)."""
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["ln_final.w"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["unembed.weight"]
    for layer in range(cfg.n_layers):
        p, q = f"model.layers.{layer}.", f"blocks.{layer}."
        linear = cfg.layer_types[layer] == "recurrent"
        for ours, theirs in {**_LAYER_MAP, **(_LINEAR_MAP if linear else _ATTN_MAP)}.items():
            out[p + theirs] = sd[q + ours]
        out[p + "mlp.gate.weight"] = sd[q + "mlp.W_router.weight"]
        out.update(write_experts(sd, q + "mlp.experts.", p + "mlp."))
    return out


FAMILY = register_family(
    Family(
        architecture="minimax",
        display="MiniMax",
        model_types=("minimax",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
        checkpoints=("MiniMaxAI/MiniMax-Text-01-hf (456B, 45.9B active)",),
        layout="7 lightning-attention layers then 1 softmax-attention layer, repeated; MoE MLP "
        "in every layer",
        bridge="not among TransformerLens 4.3's recurrent bridges (Gated DeltaNet, Mamba, RWKV-7): "
        "module hooks on the HF layers only, no state, write or decay hooks",
    )
)
