"""OLMo hybrid (AI2): Gated DeltaNet with negative eigenvalues, and post-norm attention layers.

The Gated DeltaNet is Qwen3.5's with beta = 2 sigmoid(b) (`linear_allow_neg_eigval`), separate
q/k/v projections (concatenated into `W_qkv` at load time), its own output gate projection
(`g_proj`, our `W_z`) and a fixed 1e-5 epsilon in the gated output norm. Its blocks are pre-norm.
The attention blocks are post-norm (`Block(ln1_post=, ln2_post=)`): resid + norm(attn(resid)),
then resid + norm(mlp(resid)); their attention has no output gate, one RMSNorm over all heads'
q (and k) channels, and RoPE over the whole head, or none (NoPE) when the config has no
`rope_theta`, as in the released checkpoints. Norms scale by w (not 1 + w).

Reads the layout `transformers` keeps in memory (`input_layernorm`, one `conv1d`) and the
published one (`attention_layer_norm`, `feedforward_layer_norm`, `q_conv1d` / `k_conv1d` /
`v_conv1d`), which `save_pretrained` also writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hooked_recurrent.components.attention import GatedAttention
from hooked_recurrent.components.block import Block
from hooked_recurrent.components.mlp import GatedMLP
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.pretrained import Family, register_family
from hooked_recurrent.pretrained.qwen3_5 import Qwen35Config, build_gated_deltanet, need

__all__ = ["OlmoHybridConfig", "config_from_hf", "convert_state_dict", "to_hf_state_dict"]

#: epsilon of the Gated DeltaNet's gated output norm (fixed in the reference, not rms_norm_eps)
GDN_NORM_EPS = 1e-5


@dataclass
class OlmoHybridConfig(Qwen35Config):
    """Qwen3.5's fields (see `Qwen35Config`) and `beta_scale` (2 with
    `linear_allow_neg_eigval`, else 1)."""

    beta_scale: float = 2.0


def config_from_hf(config: dict[str, Any]) -> OlmoHybridConfig:
    """Our config from a Hugging Face OLMo hybrid config dict (its defaults filled in as
    `transformers`' `OlmoHybridConfig` fills them)."""
    n_layers, d_model = config["num_hidden_layers"], config["hidden_size"]
    n_attn = config["num_attention_heads"]
    layer_types = config.get("layer_types") or [
        "full_attention" if i % 4 == 3 else "linear_attention" for i in range(n_layers)
    ]
    n_key_heads = config.get("linear_num_key_heads") or n_attn
    d_k = config.get("linear_key_head_dim") or int(0.75 * d_model / n_key_heads)
    d_head = config.get("head_dim") or d_model // n_attn
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    return OlmoHybridConfig(
        architecture="olmo_hybrid",
        n_layers=n_layers,
        d_model=d_model,
        d_vocab=config["vocab_size"],
        layer_types=["recurrent" if t == "linear_attention" else "attention" for t in layer_types],
        n_heads=config.get("linear_num_value_heads") or n_attn,
        d_k=d_k,
        d_v=config.get("linear_value_head_dim") or 2 * d_k,
        d_mlp=config["intermediate_size"],
        n_key_heads=n_key_heads,
        conv_kernel=config.get("linear_conv_kernel_dim", 4),
        eps=config.get("rms_norm_eps", 1e-6),
        attn_n_heads=n_attn,
        attn_n_kv_heads=config.get("num_key_value_heads") or n_attn,
        attn_d_head=d_head,
        rotary_dim=d_head if theta is not None else 0,
        rope_theta=float(theta or 10000.0),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        beta_scale=2.0 if config.get("linear_allow_neg_eigval", True) else 1.0,
        hf_config=config,
    )


def build_block(cfg: OlmoHybridConfig, layer: int) -> Block:
    """A pre-norm Gated DeltaNet block, or a post-norm attention block; SwiGLU MLP."""
    mlp = GatedMLP(cfg.d_model, cfg.d_mlp)
    if cfg.layer_types[layer] == "recurrent":
        gdn = build_gated_deltanet(cfg, layer, GDN_NORM_EPS, beta_scale=cfg.beta_scale)
        ln1, ln2 = RMSNorm(cfg.d_model, cfg.eps), RMSNorm(cfg.d_model, cfg.eps)
        return Block(layer, ln1=ln1, attn=gdn, ln2=ln2, mlp=mlp)
    attn = GatedAttention.from_config(cfg, layer, gated=False, qk_norm="all")
    post1, post2 = RMSNorm(cfg.d_model, cfg.eps), RMSNorm(cfg.d_model, cfg.eps)
    return Block(layer, ln1=None, attn=attn, mlp=mlp, ln1_post=post1, ln2_post=post2)


# our name (after "blocks.{l}.") -> Hugging Face names (after "layers.{l}."), in-memory first
_MLP = {
    "mlp.W_gate.weight": ("mlp.gate_proj.weight",),
    "mlp.W_in.weight": ("mlp.up_proj.weight",),
    "mlp.W_out.weight": ("mlp.down_proj.weight",),
}
_GDN = {
    "ln1.w": ("input_layernorm.weight", "attention_layer_norm.weight"),
    "ln2.w": ("post_attention_layernorm.weight", "feedforward_layer_norm.weight"),
    "attn.W_z.weight": ("linear_attn.g_proj.weight",),
    "attn.W_b.weight": ("linear_attn.b_proj.weight",),
    "attn.W_a.weight": ("linear_attn.a_proj.weight",),
    "attn.dt_bias": ("linear_attn.dt_bias",),
    "attn.A_log": ("linear_attn.A_log",),
    "attn.norm_w": ("linear_attn.o_norm.weight",),
    "attn.W_out.weight": ("linear_attn.o_proj.weight",),
}
_ATTN = {
    "ln1_post.w": ("post_attention_layernorm.weight", "feedforward_layer_norm.weight"),
    "ln2_post.w": ("post_feedforward_layernorm.weight",),
    "attn.q_proj.weight": ("self_attn.q_proj.weight",),
    "attn.k_proj.weight": ("self_attn.k_proj.weight",),
    "attn.v_proj.weight": ("self_attn.v_proj.weight",),
    "attn.o_proj.weight": ("self_attn.o_proj.weight",),
    "attn.q_norm.w": ("self_attn.q_norm.weight",),
    "attn.k_norm.w": ("self_attn.k_norm.weight",),
}


def _first(sd: dict[str, Tensor], pre: str, names: tuple[str, ...]) -> Tensor:
    """The first of `names` (after `pre`) present in `sd`; a KeyError names the first."""
    for name in names:
        if pre + name in sd:
            return sd[pre + name]
    return need(sd, pre + names[0])


def _read_gdn_inputs(sd: dict[str, Tensor], pre: str) -> dict[str, Tensor]:
    """W_qkv from q/k/v_proj, and the convolution over [q, k, v] (one tensor, or three)."""
    a = f"{pre}linear_attn."
    w_qkv = torch.cat([need(sd, f"{a}{n}_proj.weight") for n in "qkv"])
    if f"{a}conv1d.weight" in sd:
        conv = sd[f"{a}conv1d.weight"]
    else:
        conv = torch.cat([need(sd, f"{a}{n}_conv1d.weight") for n in "qkv"])
    return {"attn.W_qkv.weight": w_qkv, "attn.conv_w": conv[:, 0, :]}


def convert_state_dict(sd: dict[str, Tensor], cfg: OlmoHybridConfig) -> dict[str, Tensor]:
    """A Hugging Face OLMo hybrid state dict (in-memory or published names) in our names."""
    out = {"embed.weight": need(sd, "model.embed_tokens.weight")}
    out["ln_final.w"] = need(sd, "model.norm.weight")
    tied = cfg.tie_word_embeddings
    out["unembed.weight"] = out["embed.weight"] if tied else need(sd, "lm_head.weight")
    for layer in range(cfg.n_layers):
        pre = f"model.layers.{layer}."
        recurrent = cfg.layer_types[layer] == "recurrent"
        names = {**(_GDN if recurrent else _ATTN), **_MLP}
        weights = {ours: _first(sd, pre, theirs) for ours, theirs in names.items()}
        if recurrent:
            weights.update(_read_gdn_inputs(sd, pre))
        out.update({f"blocks.{layer}.{k}": t for k, t in weights.items()})
    return out


def to_hf_state_dict(sd: dict[str, Tensor], cfg: OlmoHybridConfig) -> dict[str, Tensor]:
    """Our state dict in the names an `OlmoHybridForCausalLM` holds (for `load_state_dict`)."""
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["ln_final.w"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["unembed.weight"]
    for layer in range(cfg.n_layers):
        pre, hf = f"blocks.{layer}.", f"model.layers.{layer}."
        recurrent = cfg.layer_types[layer] == "recurrent"
        names = {**(_GDN if recurrent else _ATTN), **_MLP}
        out.update({hf + theirs[0]: sd[pre + ours] for ours, theirs in names.items()})
        if recurrent:
            q, k, v = sd[f"{pre}attn.W_qkv.weight"].split(
                [cfg.n_key_heads * cfg.d_k, cfg.n_key_heads * cfg.d_k, cfg.n_heads * cfg.d_v]
            )
            for n, t in zip("qkv", (q, k, v), strict=True):
                out[f"{hf}linear_attn.{n}_proj.weight"] = t
            out[f"{hf}linear_attn.conv1d.weight"] = sd[f"{pre}attn.conv_w"][:, None, :]
    return out


FAMILY = register_family(
    Family(
        architecture="olmo_hybrid",
        display="OLMo hybrid",
        model_types=("olmo_hybrid",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
        checkpoints=("allenai/Olmo-Hybrid-7B (7B)",),
        layout="3 Gated DeltaNet blocks (pre-norm) then 1 attention block (post-norm, no "
        "position encoding in the released checkpoints), repeated",
        bridge="not among the hybrids TransformerLens 4.3's TransformerBridge has adapters for "
        "(Qwen3.5/Next, Mamba, NemotronH, Jamba, ...): no hooks",
    )
)
