"""Qwen3.5 (Gated DeltaNet + gated attention): config, weight conversion, block builder.

Reads `Qwen3_5ForCausalLM` checkpoints (`model.layers.*`) and the published multimodal layout
`Qwen3_5ForConditionalGeneration` (`model.language_model.layers.*`, with the vision tower and the
multi-token-prediction head, which are dropped with one log line).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from hooked_recurrent.components.attention import GatedAttention
from hooked_recurrent.components.block import Block
from hooked_recurrent.components.gated_deltanet import GatedDeltaNet
from hooked_recurrent.components.mlp import GatedMLP
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.config import HookedRecurrentConfig
from hooked_recurrent.pretrained import Family, register_family

logger = logging.getLogger(__name__)


@dataclass
class Qwen35Config(HookedRecurrentConfig):
    """Qwen3.5 fields beyond the shared ones (Hugging Face name in brackets).

    Attributes:
        d_mlp: MLP width [intermediate_size].
        n_key_heads: key heads of the Gated DeltaNet [linear_num_key_heads]; `n_heads`
            [linear_num_value_heads] state heads share them in consecutive groups.
        conv_kernel: causal convolution width [linear_conv_kernel_dim].
        eps: RMSNorm epsilon [rms_norm_eps].
        attn_n_heads, attn_n_kv_heads, attn_d_head: full-attention shape [num_attention_heads,
            num_key_value_heads, head_dim].
        rotary_dim: rotated channels per attention head [head_dim * partial_rotary_factor].
        rope_theta: RoPE base.
        tie_word_embeddings: whether the unembedding is the embedding.
        chunk_size: chunk length of the fast Gated DeltaNet path.
    """

    d_mlp: int = 0
    n_key_heads: int = 0
    conv_kernel: int = 4
    eps: float = 1e-6
    attn_n_heads: int = 0
    attn_n_kv_heads: int = 0
    attn_d_head: int = 0
    rotary_dim: int = 0
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    chunk_size: int = 64


def config_from_hf(config: dict[str, Any]) -> Qwen35Config:
    """Our config from a Hugging Face Qwen3.5 config dict (the text config of a multimodal
    checkpoint).
    """
    text = config.get("text_config") or config
    if config.get("model_type") == "qwen3_5" and "text_config" not in config:
        raise ValueError("a qwen3_5 (multimodal) config without text_config")
    rope = text.get("rope_parameters") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    n_layers = text["num_hidden_layers"]
    interval = text.get("full_attention_interval", 4)
    layer_types = text.get("layer_types") or [
        "linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)
    ]
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    d_head = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return Qwen35Config(
        architecture="qwen3_5",
        n_layers=n_layers,
        d_model=text["hidden_size"],
        d_vocab=text["vocab_size"],
        layer_types=["recurrent" if t == "linear_attention" else "attention" for t in layer_types],
        n_heads=text["linear_num_value_heads"],
        d_k=text["linear_key_head_dim"],
        d_v=text["linear_value_head_dim"],
        d_mlp=text["intermediate_size"],
        n_key_heads=text["linear_num_key_heads"],
        conv_kernel=text["linear_conv_kernel_dim"],
        eps=text["rms_norm_eps"],
        attn_n_heads=text["num_attention_heads"],
        attn_n_kv_heads=text["num_key_value_heads"],
        attn_d_head=d_head,
        rotary_dim=int(d_head * partial),
        rope_theta=float(theta),
        tie_word_embeddings=bool(tie),
        hf_config=config,
    )


def build_block(cfg: Qwen35Config, layer: int) -> Block:
    """The block of layer `layer`: Gated DeltaNet or gated attention, then the gated MLP."""
    attn: nn.Module
    if cfg.layer_types[layer] == "recurrent":
        attn = GatedDeltaNet(
            layer,
            cfg.d_model,
            cfg.n_heads,
            cfg.n_key_heads,
            cfg.d_k,
            cfg.d_v,
            cfg.conv_kernel,
            cfg.eps,
            cfg.chunk_size,
        )
    else:
        attn = GatedAttention(
            layer,
            cfg.d_model,
            cfg.attn_n_heads,
            cfg.attn_n_kv_heads,
            cfg.attn_d_head,
            cfg.rotary_dim,
            cfg.rope_theta,
            cfg.eps,
        )
    return Block(
        layer,
        ln1=RMSNorm(cfg.d_model, cfg.eps, zero_centred=True),
        attn=attn,
        ln2=RMSNorm(cfg.d_model, cfg.eps, zero_centred=True),
        mlp=GatedMLP(cfg.d_model, cfg.d_mlp),
    )


# our name (after "blocks.{l}.") -> Hugging Face name (after "layers.{l}.")
_LAYER_MAP = {
    "ln1.w": "input_layernorm.weight",
    "ln2.w": "post_attention_layernorm.weight",
    "mlp.W_gate.weight": "mlp.gate_proj.weight",
    "mlp.W_in.weight": "mlp.up_proj.weight",
    "mlp.W_out.weight": "mlp.down_proj.weight",
}
_GDN_MAP = {
    "attn.W_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "attn.W_z.weight": "linear_attn.in_proj_z.weight",
    "attn.W_b.weight": "linear_attn.in_proj_b.weight",
    "attn.W_a.weight": "linear_attn.in_proj_a.weight",
    "attn.conv_w": "linear_attn.conv1d.weight",
    "attn.dt_bias": "linear_attn.dt_bias",
    "attn.A_log": "linear_attn.A_log",
    "attn.norm_w": "linear_attn.norm.weight",
    "attn.W_out.weight": "linear_attn.out_proj.weight",
}
_ATTN_MAP = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.w": "self_attn.q_norm.weight",
    "attn.k_norm.w": "self_attn.k_norm.weight",
}


def _text_prefix(sd: dict[str, Tensor]) -> str:
    for prefix in ("model.language_model.", "model.", ""):
        if f"{prefix}embed_tokens.weight" in sd:
            return prefix
    raise KeyError("no embed_tokens.weight: not a Qwen3.5 state dict")


def convert_state_dict(sd: dict[str, Tensor], cfg: Qwen35Config) -> dict[str, Tensor]:
    """A Hugging Face Qwen3.5 state dict in our names."""
    p = _text_prefix(sd)
    dropped = [k for k in sd if k.startswith(("model.visual.", "visual.", "mtp."))]
    if dropped:
        logger.info("Qwen3.5: ignoring %d vision-tower / MTP tensors", len(dropped))
    out = {"embed.weight": sd[f"{p}embed_tokens.weight"], "ln_final.w": sd[f"{p}norm.weight"]}
    lm_head = sd.get("lm_head.weight")
    if lm_head is None and not cfg.tie_word_embeddings:
        raise KeyError("untied Qwen3.5 checkpoint (tie_word_embeddings=false) lacks lm_head.weight")
    out["unembed.weight"] = out["embed.weight"] if cfg.tie_word_embeddings else lm_head
    for layer in range(cfg.n_layers):
        mixer = _GDN_MAP if cfg.layer_types[layer] == "recurrent" else _ATTN_MAP
        for ours, theirs in {**_LAYER_MAP, **mixer}.items():
            key = f"{p}layers.{layer}.{theirs}"
            if key not in sd:
                raise KeyError(f"Qwen3.5 checkpoint lacks {key}")
            t = sd[key]
            out[f"blocks.{layer}.{ours}"] = t[:, 0, :] if ours == "attn.conv_w" else t
    return out


def to_hf_state_dict(sd: dict[str, Tensor], cfg: Qwen35Config) -> dict[str, Tensor]:
    """Our state dict in `Qwen3_5ForCausalLM` names (for saving a checkpoint)."""
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["ln_final.w"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["unembed.weight"]
    for layer in range(cfg.n_layers):
        mixer = _GDN_MAP if cfg.layer_types[layer] == "recurrent" else _ATTN_MAP
        for ours, theirs in {**_LAYER_MAP, **mixer}.items():
            t = sd[f"blocks.{layer}.{ours}"]
            out[f"model.layers.{layer}.{theirs}"] = t[:, None, :] if ours == "attn.conv_w" else t
    return out


FAMILY = register_family(
    Family(
        architecture="qwen3_5",
        display="Qwen3.5",
        model_types=("qwen3_5", "qwen3_5_text"),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps, zero_centred=True),
        ignored_prefixes=("model.visual.", "visual.", "mtp."),
    )
)
