"""Jamba (AI21, `JambaForCausalLM`): Mamba-1 layers with softmax attention every
`attn_layer_period` layers, each followed by a SwiGLU MLP or, every `expert_layer_period` layers,
a softmax-routed MoE; config, weight conversion, block factory.

Reads `JambaForCausalLM` checkpoints in transformers' in-memory layout
(`feed_forward.experts.gate_up_proj` `[expert, 2 d_mlp, d_model]`, gate rows first) and in the
published one (`feed_forward.experts.{e}.gate_proj/up_proj/down_proj.weight`, as `save_pretrained`
writes it). Layer `l` is attention when `l % attn_layer_period == attn_layer_offset`, a Mamba-1
layer otherwise; its MLP is the MoE when `l % expert_layer_period == expert_layer_offset` and
there is more than one expert.

The Mamba layers are the Mamba-1 mixer (`components/mamba1.py`) with Jamba's weighted RMSNorm on
dt, B and C (`bcdt_norm="weighted"`, epsilon `rms_norm_eps`); the attention has no positional
encoding, no bias, no output gate and no q/k norm. The router is a softmax over all experts whose
top-k probabilities weight the chosen experts without renormalisation; there is no shared expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from hooked_recurrent.components.attention import GatedAttention
from hooked_recurrent.components.block import Block
from hooked_recurrent.components.mlp import GatedMLP
from hooked_recurrent.components.moe import MoE
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.config import SwiGLU
from hooked_recurrent.pretrained import Family, register_family
from hooked_recurrent.pretrained.experts import read_experts, write_experts
from hooked_recurrent.pretrained.mamba1 import Mamba1Config, _dt_rank, build_mixer, mixer_map
from hooked_recurrent.pretrained.mamba2_hybrid import hf_ends, rename_layers

__all__ = ["JambaConfig", "config_from_hf", "convert_state_dict", "to_hf_state_dict"]


@dataclass
class JambaConfig(SwiGLU, Mamba1Config):
    """Jamba fields beyond `Mamba1Config` (Hugging Face name in brackets).

    The Mamba-1 fields: `d_k` = d_state [mamba_d_state], `d_v` = d_inner [mamba_expand *
    hidden_size], `dt_rank` [mamba_dt_rank], `conv_kernel` [mamba_d_conv], `use_conv_bias`
    [mamba_conv_bias], `use_bias` [mamba_proj_bias], `eps` = `bcdt_eps` [rms_norm_eps].

    Attributes:
        d_mlp: hidden width of the MLPs and of each expert [intermediate_size].
        attn_n_heads, attn_n_kv_heads, attn_d_head: attention shape [num_attention_heads,
            num_key_value_heads, hidden_size // num_attention_heads].
        n_experts, top_k: experts and experts per token [num_experts, num_experts_per_tok].
        moe_layers: the layers whose MLP is the MoE [expert_layer_period, expert_layer_offset].
    """

    d_mlp: int = 0
    attn_n_heads: int = 0
    attn_n_kv_heads: int = 0
    attn_d_head: int = 0
    n_experts: int = 1
    top_k: int = 1
    moe_layers: list[int] = field(default_factory=list)


def _every(n_layers: int, period: int, offset: int) -> list[int]:
    if not 0 <= offset < period:
        raise ValueError(f"layer offset {offset} must lie in [0, period {period})")
    return [i for i in range(n_layers) if i % period == offset]


def config_from_hf(config: dict[str, Any]) -> JambaConfig:
    """Our config from a Hugging Face `JambaConfig` dict."""
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r}: only 'silu' is supported")
    n_layers, d_model = config["num_hidden_layers"], config["hidden_size"]
    attn = set(
        _every(n_layers, config.get("attn_layer_period", 8), config.get("attn_layer_offset", 4))
    )
    n_experts = config.get("num_experts", 16)
    moe = _every(
        n_layers, config.get("expert_layer_period", 2), config.get("expert_layer_offset", 1)
    )
    n_attn = config.get("num_attention_heads", 32)
    eps = config.get("rms_norm_eps", 1e-6)
    return JambaConfig(
        architecture="jamba",
        n_layers=n_layers,
        d_model=d_model,
        d_vocab=config["vocab_size"],
        layer_types=["attention" if i in attn else "recurrent" for i in range(n_layers)],
        n_heads=1,
        d_k=config.get("mamba_d_state", 16),
        d_v=int(config.get("mamba_expand", 2) * d_model),
        dt_rank=_dt_rank(config.get("mamba_dt_rank", "auto"), d_model),
        conv_kernel=config.get("mamba_d_conv", 4),
        eps=eps,
        use_conv_bias=bool(config.get("mamba_conv_bias", True)),
        use_bias=bool(config.get("mamba_proj_bias", False)),
        bcdt_norm="weighted",
        bcdt_eps=eps,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        d_mlp=config["intermediate_size"],
        attn_n_heads=n_attn,
        attn_n_kv_heads=config.get("num_key_value_heads") or n_attn,
        attn_d_head=d_model // n_attn,
        n_experts=n_experts,
        top_k=config.get("num_experts_per_tok", 2),
        moe_layers=moe if n_experts > 1 else [],
        hf_config=config,
    )


def build_block(cfg: JambaConfig, layer: int) -> Block:
    """Mamba-1 mixer or attention (no RoPE) at `attn`, then the MoE or the SwiGLU MLP, each after
    an RMSNorm."""
    attn: nn.Module
    if cfg.layer_types[layer] == "recurrent":
        attn = build_mixer(cfg, layer)
    else:
        attn = GatedAttention(
            layer,
            cfg.d_model,
            cfg.attn_n_heads,
            cfg.attn_n_kv_heads,
            cfg.attn_d_head,
            0,  # no RoPE
            10000.0,
            cfg.eps,
            gated=False,
            qk_norm="none",
        )
    mlp: nn.Module
    if layer in cfg.moe_layers:
        mlp = MoE(cfg.d_model, cfg.d_mlp, cfg.n_experts, cfg.top_k, norm_topk=False)
    else:
        mlp = GatedMLP(cfg.d_model, cfg.d_mlp)
    return Block(
        layer,
        ln1=RMSNorm(cfg.d_model, cfg.eps),
        attn=attn,
        ln2=RMSNorm(cfg.d_model, cfg.eps),
        mlp=mlp,
    )


def _layer_map(cfg: JambaConfig, layer: int) -> dict[str, str]:
    """Layer `layer`'s one-to-one names: ours (after "blocks.{l}.") -> Hugging Face's (after
    "layers.{l}."); the experts are read by `read_experts`."""
    out = {"ln1.w": "input_layernorm.weight", "ln2.w": "pre_ff_layernorm.weight"}
    if cfg.layer_types[layer] == "recurrent":
        out.update({k: "mamba." + v.removeprefix("mixer.") for k, v in mixer_map(cfg).items()})
    else:
        out.update({f"attn.{n}.weight": f"self_attn.{n}.weight" for n in _ATTN})
    if layer in cfg.moe_layers:
        out["mlp.W_router.weight"] = "feed_forward.router.weight"
    else:
        out.update({f"mlp.{o}.weight": f"feed_forward.{t}.weight" for o, t in _MLP.items()})
    return out


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = {"W_gate": "gate_proj", "W_in": "up_proj", "W_out": "down_proj"}


def convert_state_dict(sd: dict[str, Tensor], cfg: JambaConfig) -> dict[str, Tensor]:
    """A `JambaForCausalLM` state dict (either layout) in our names."""
    if "model.embed_tokens.weight" not in sd:
        raise KeyError("no model.embed_tokens.weight: not a Jamba state dict")
    embed = sd["model.embed_tokens.weight"]
    out = {"embed.weight": embed, "ln_final.w": sd["model.final_layernorm.weight"]}
    lm_head = sd.get("lm_head.weight")
    if lm_head is None and not cfg.tie_word_embeddings:
        raise KeyError("untied Jamba checkpoint lacks lm_head.weight")
    out["unembed.weight"] = embed if cfg.tie_word_embeddings else lm_head
    out.update(rename_layers(sd, cfg, lambda li: _layer_map(cfg, li), "model.layers."))
    for layer in cfg.moe_layers:
        prefix = f"model.layers.{layer}.feed_forward."
        out.update(read_experts(sd, prefix, cfg.n_experts, f"blocks.{layer}.mlp.experts."))
    return out


def to_hf_state_dict(sd: dict[str, Tensor], cfg: JambaConfig) -> dict[str, Tensor]:
    """Our state dict in transformers' in-memory `JambaForCausalLM` names (fused experts)."""
    out = hf_ends(sd, cfg.tie_word_embeddings)
    out.update(rename_layers(sd, cfg, lambda li: _layer_map(cfg, li), "model.layers.", True))
    for layer in cfg.moe_layers:
        ours = f"blocks.{layer}.mlp.experts."
        out.update(write_experts(sd, ours, f"model.layers.{layer}.feed_forward."))
    return out


FAMILY = register_family(
    Family(
        architecture="jamba",
        display="Jamba",
        model_types=("jamba",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
        checkpoints=(
            "ai21labs/AI21-Jamba-Mini-1.5 (52B, 12B active)",
            "ai21labs/Jamba-v0.1 (52B, 12B active)",
        ),
        layout="32 layers: Mamba-1 mixer (RMSNorm on dt, B, C), or attention without RoPE at "
        "every 8th layer (offset 4), each followed by a SwiGLU MLP, or by a softmax-routed MoE "
        "(16 experts, top-2) at every 2nd layer (offset 1)",
        bridge="TransformerBridge (TL 4.3, Jamba adapter): residual, attention and Mamba-1 "
        "projection hooks; hook_ssm_write / hook_ssm_state only on its eager scan of a prefill, "
        "state edits not propagated to later tokens, no mixer-interior hooks live in generate()",
    )
)
