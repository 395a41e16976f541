"""Kimi Linear (KDA + MLA without position encoding, MoE): config, weight conversion, blocks.

Reads `KimiLinearForCausalLM` checkpoints in the published layout (`block_sparse_moe.*`, per-expert
`w1/w2/w3`, separate `q/k/v_conv1d`, forget-gate weights directly under `self_attn`; this is what
`save_pretrained` writes) and a model's in-memory layout (`mlp.experts.gate_up_proj`, `conv1d`,
`self_attn.forget_gate.*`). `KdaHybridConfig` and `build_block` also serve Bailing hybrid
(`bailing_hybrid.py`), whose differences are constructor parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hooked_recurrent.components.block import Block
from hooked_recurrent.components.kda import KimiDeltaAttention
from hooked_recurrent.components.mla import LatentAttention
from hooked_recurrent.components.mlp import GatedMLP
from hooked_recurrent.components.moe import MoE
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.config import HookedRecurrentConfig
from hooked_recurrent.pretrained import Family, register_family
from hooked_recurrent.pretrained.experts import moe_prefix, read_experts, write_experts

__all__ = ["KdaHybridConfig", "config_from_hf", "convert_state_dict", "to_hf_state_dict"]


@dataclass
class KdaHybridConfig(HookedRecurrentConfig):
    """Fields of the KDA hybrids (Kimi Linear, Bailing hybrid) beyond the shared ones.

    Attributes:
        conv_kernel, eps: KDA's short convolution and the RMSNorm epsilon.
        decay, lower_bound, gate_rank: see `KimiDeltaAttention`.
        dense_layers: blocks with a dense SwiGLU MLP of width `d_mlp`; the others are MoE.
        d_mlp, d_expert, d_shared: dense, routed-expert and shared-expert widths.
        n_experts, top_k, norm_topk, routed_scale, n_group, topk_group: the sigmoid router.
        attn_n_heads, d_nope, d_rope, d_v_attn, kv_rank, q_rank: the MLA layers.
        rope_theta: RoPE base of the MLA layers, None for no position encoding (Kimi Linear).
        head_gate: the MLA layers' per-head output gate (Bailing).
        attn_bias: biases on the MLA projections [attention_bias].
        tie_word_embeddings: whether the unembedding is the embedding.
    """

    conv_kernel: int = 4
    eps: float = 1e-5
    decay: str = "softplus"
    lower_bound: float = -5.0
    gate_rank: int | None = None
    dense_layers: list[int] = field(default_factory=list)
    d_mlp: int = 0
    d_expert: int = 0
    d_shared: int = 0
    n_experts: int = 1
    top_k: int = 1
    norm_topk: bool = True
    routed_scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    attn_n_heads: int = 0
    d_nope: int = 0
    d_rope: int = 0
    d_v_attn: int = 0
    kv_rank: int = 0
    q_rank: int | None = None
    rope_theta: float | None = None
    head_gate: bool = False
    attn_bias: bool = False
    tie_word_embeddings: bool = False


def hybrid_config(c: Any, architecture: str, config: dict[str, Any], **kda: Any) -> KdaHybridConfig:
    """Our config from a `transformers` KDA-hybrid config object `c` (its derived fields filled);
    `kda` sets the family's KDA and MLA variant fields."""
    return KdaHybridConfig(
        architecture=architecture,
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        d_vocab=c.vocab_size,
        layer_types=[
            "recurrent" if t == "linear_attention" else "attention" for t in c.layer_types
        ],
        n_heads=c.linear_num_heads,
        d_k=c.linear_head_dim,
        d_v=c.linear_head_dim,
        conv_kernel=c.linear_conv_kernel_dim,
        eps=c.rms_norm_eps,
        dense_layers=[i for i, t in enumerate(c.mlp_layer_types) if t == "dense"],
        d_mlp=c.intermediate_size,
        d_expert=c.moe_intermediate_size,
        d_shared=c.moe_intermediate_size * (c.n_shared_experts or 0),
        n_experts=c.num_local_experts,
        top_k=c.num_experts_per_tok,
        norm_topk=bool(c.norm_topk_prob),
        routed_scale=float(c.routed_scaling_factor),
        n_group=c.n_group,
        topk_group=c.topk_group,
        attn_n_heads=c.num_attention_heads,
        d_nope=c.qk_nope_head_dim,
        d_rope=c.qk_rope_head_dim,
        d_v_attn=c.v_head_dim,
        kv_rank=c.kv_lora_rank,
        q_rank=c.q_lora_rank,
        attn_bias=bool(c.attention_bias),
        tie_word_embeddings=bool(c.tie_word_embeddings),
        hf_config=config,
        **kda,
    )


def config_from_hf(config: dict[str, Any]) -> KdaHybridConfig:
    """Our config from a Hugging Face Kimi Linear config dict (read through `transformers`'
    `KimiLinearConfig`, which derives the layer types from `linear_attn_config`)."""
    from transformers import KimiLinearConfig

    c = KimiLinearConfig.from_dict(config)
    if c.num_key_value_heads != c.num_attention_heads:
        raise ValueError("Kimi Linear: MLA expects num_key_value_heads == num_attention_heads")
    # the reference never ties its output layer (whatever tie_word_embeddings says)
    c.tie_word_embeddings = False
    return hybrid_config(c, "kimi_linear", config, gate_rank=c.linear_head_dim)


def build_block(cfg: KdaHybridConfig, layer: int) -> Block:
    """Layer `layer`: KDA or MLA, then a dense MLP or the MoE."""
    attn: nn.Module
    mlp: nn.Module
    if cfg.layer_types[layer] == "recurrent":
        attn = KimiDeltaAttention(
            layer, cfg.d_model, cfg.n_heads, cfg.d_k, cfg.conv_kernel, cfg.eps,
            decay=cfg.decay, lower_bound=cfg.lower_bound, gate_rank=cfg.gate_rank,
        )  # fmt: skip
    else:
        attn = LatentAttention(
            layer, cfg.d_model, cfg.attn_n_heads, cfg.d_nope, cfg.d_rope, cfg.d_v_attn,
            cfg.kv_rank, cfg.q_rank, cfg.rope_theta, cfg.head_gate, cfg.attn_bias,
        )  # fmt: skip
    if layer in cfg.dense_layers:
        mlp = GatedMLP(cfg.d_model, cfg.d_mlp)
    else:
        mlp = MoE(
            cfg.d_model, cfg.d_expert, cfg.n_experts, cfg.top_k, scoring="sigmoid",
            norm_topk=cfg.norm_topk, routed_scale=cfg.routed_scale, score_bias=True,
            n_group=cfg.n_group, topk_group=cfg.topk_group, d_shared=cfg.d_shared,
        )  # fmt: skip
    return Block.rms_norm(layer, cfg.d_model, cfg.eps, attn, mlp)


#: our mixer names (after "blocks.{l}.attn.") -> the in-memory Hugging Face names (after
#: "model.layers.{l}."); a family's `published` function gives the checkpoint name of each
_KDA = {
    "W_q.weight": "self_attn.q_proj.weight",
    "W_k.weight": "self_attn.k_proj.weight",
    "W_v.weight": "self_attn.v_proj.weight",
    "W_b.weight": "self_attn.b_proj.weight",
    "W_f.0.weight": "self_attn.forget_gate.f_a_proj.weight",
    "W_f.1.weight": "self_attn.forget_gate.f_b_proj.weight",
    "dt_bias": "self_attn.forget_gate.dt_bias",
    "A_log": "self_attn.forget_gate.A_log",
    "W_g.0.weight": "self_attn.g_a_proj.weight",
    "W_g.1.weight": "self_attn.g_b_proj.weight",
    "norm_w": "self_attn.o_norm.weight",
    "W_out.weight": "self_attn.o_proj.weight",
}
_MLA = {
    "W_q.weight": "self_attn.q_proj.weight",
    "W_qa.weight": "self_attn.q_a_proj.weight",
    "W_qa.bias": "self_attn.q_a_proj.bias",
    "q_norm.w": "self_attn.q_a_layernorm.weight",
    "W_qb.weight": "self_attn.q_b_proj.weight",
    "W_kva.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "W_kva.bias": "self_attn.kv_a_proj_with_mqa.bias",
    "kv_norm.w": "self_attn.kv_a_layernorm.weight",
    "W_kvb.weight": "self_attn.kv_b_proj.weight",
    "o_proj.weight": "self_attn.o_proj.weight",
    "o_proj.bias": "self_attn.o_proj.bias",
}
_DENSE = {"W_gate.weight": "gate_proj.weight", "W_in.weight": "up_proj.weight",
          "W_out.weight": "down_proj.weight"}  # fmt: skip
_NORMS = {"ln1.w": "input_layernorm.weight", "ln2.w": "post_attention_layernorm.weight"}


def _kimi_published(name: str) -> str:
    """The name in Moonshot's checkpoints (the MoE prefix is `moe_prefix`'s business)."""
    return name.replace("self_attn.forget_gate.", "self_attn.")


@dataclass
class WeightNames:
    """A KDA hybrid's weight names: the mixer maps (ours -> in-memory name), the function from an
    in-memory name to the published one, and the shape the reference gives `A_log`."""

    kda: dict[str, str]
    mla: dict[str, str]
    published: Callable[[str], str]
    a_log_shape: Callable[[int], tuple[int, ...]]


KIMI_NAMES = WeightNames(_KDA, _MLA, _kimi_published, lambda h: (1, 1, h, 1))


def _first(sd: dict[str, Tensor], p: str, name: str, names: WeightNames) -> Tensor | None:
    """sd[p + name] or sd[p + its published name], None when neither is there."""
    for n in (name, names.published(name)):
        if p + n in sd:
            return sd[p + n]
    return None


def convert_layer(
    sd: dict[str, Tensor], cfg: KdaHybridConfig, layer: int, names: WeightNames
) -> dict[str, Tensor]:
    """One block's tensors in our names, read from either layout (optional tensors that are
    absent, such as biases, are skipped; the loader reports any that the model needs)."""
    p, q = f"model.layers.{layer}.", f"blocks.{layer}."
    out = {q + ours: sd[p + theirs] for ours, theirs in _NORMS.items()}
    recurrent = cfg.layer_types[layer] == "recurrent"
    for ours, theirs in (names.kda if recurrent else names.mla).items():
        t = _first(sd, p, theirs, names)
        if t is not None:
            out[q + "attn." + ours] = t
    if recurrent:
        conv = _first(sd, p, "self_attn.conv1d.weight", names)
        if conv is None:  # the published layout: one convolution each for q, k, v
            conv = torch.cat(
                [sd[p + names.published(f"self_attn.{n}_conv1d.weight")] for n in "qkv"]
            )
        out[q + "attn.conv_w"] = conv[:, 0]
        out[q + "attn.A_log"] = out[q + "attn.A_log"].reshape(-1)
    m = moe_prefix(sd, p)
    if layer in cfg.dense_layers:
        out.update({f"{q}mlp.{o}": sd[m + t] for o, t in _DENSE.items()})
        return out
    out[q + "mlp.W_router.weight"] = sd[m + "gate.weight"]
    out[q + "mlp.score_bias"] = _first(sd, m, "gate.e_score_correction_bias", names)
    out.update(read_experts(sd, m, cfg.n_experts, q + "mlp.experts."))
    if cfg.d_shared:
        out.update({f"{q}mlp.shared_expert.{o}": sd[f"{m}shared_experts.{t}"]
                    for o, t in _DENSE.items()})  # fmt: skip
    return out


def convert_state_dict(sd: dict[str, Tensor], cfg: KdaHybridConfig) -> dict[str, Tensor]:
    """A Hugging Face Kimi Linear state dict in our names."""
    out = {"embed.weight": sd["model.embed_tokens.weight"], "ln_final.w": sd["model.norm.weight"]}
    out["unembed.weight"] = out["embed.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    for layer in range(cfg.n_layers):
        out.update(convert_layer(sd, cfg, layer, KIMI_NAMES))
    return out


def to_hf_state_dict(
    sd: dict[str, Tensor], cfg: KdaHybridConfig, names: WeightNames = KIMI_NAMES
) -> dict[str, Tensor]:
    """Our state dict in `KimiLinearForCausalLM`'s (or with Bailing's `names`,
    `BailingHybridForCausalLM`'s) in-memory names."""
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["ln_final.w"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["unembed.weight"]
    for layer in range(cfg.n_layers):
        p, q = f"model.layers.{layer}.", f"blocks.{layer}."
        out.update({p + t: sd[q + o] for o, t in _NORMS.items()})
        recurrent = cfg.layer_types[layer] == "recurrent"
        for ours, theirs in (names.kda if recurrent else names.mla).items():
            if q + "attn." + ours in sd:
                out[p + theirs] = sd[q + "attn." + ours]
        if recurrent:
            out[p + "self_attn.conv1d.weight"] = sd[q + "attn.conv_w"][:, None]
            A_log = sd[q + "attn.A_log"]
            out[p + names.kda["A_log"]] = A_log.view(names.a_log_shape(len(A_log)))
        if layer in cfg.dense_layers:
            out.update({f"{p}mlp.{t}": sd[f"{q}mlp.{o}"] for o, t in _DENSE.items()})
            continue
        out[p + "mlp.gate.weight"] = sd[q + "mlp.W_router.weight"]
        out[p + "mlp.gate.e_score_correction_bias"] = sd[q + "mlp.score_bias"]
        out.update(write_experts(sd, q + "mlp.experts.", p + "mlp."))
        out.update({f"{p}mlp.shared_experts.{t}": sd[f"{q}mlp.shared_expert.{o}"]
                    for o, t in _DENSE.items() if cfg.d_shared})  # fmt: skip
    return out


FAMILY = register_family(
    Family(
        architecture="kimi_linear",
        display="Kimi Linear",
        model_types=("kimi_linear",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
        checkpoints=(
            "moonshotai/Kimi-Linear-48B-A3B-Base (48B, 3B active)",
            "moonshotai/Kimi-Linear-48B-A3B-Instruct (48B, 3B active)",
        ),
        layout="3 KDA layers then 1 MLA layer (no position encoding), repeated; a dense MLP in "
        "the first block, MoE (sigmoid router, shared expert) after",
        bridge="not among TransformerLens 4.3's recurrent bridges (Gated DeltaNet, Mamba, RWKV-7): "
        "module hooks on the HF layers only, no state, write or decay hooks",
    )
)
