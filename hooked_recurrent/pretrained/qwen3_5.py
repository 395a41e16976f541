"""Qwen3.5 and Qwen3.5-MoE (Gated DeltaNet + gated attention): config, weight conversion, blocks.

Reads `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` checkpoints (`model.layers.*`) and the
published multimodal layout `Qwen3_5(Moe)ForConditionalGeneration` (`model.language_model.layers.*`,
with the vision tower and the multi-token-prediction head, which are dropped with one log line).
Qwen3.5-MoE has the same mixers with a sparse MoE MLP (`components/moe.py`) in every block; its
experts are read per expert (`mlp.experts.{e}.gate_proj.weight`, as published and as
`save_pretrained` writes them) or fused (`mlp.experts.gate_up_proj`, as in a model's memory).
Qwen3-Next (`qwen3_next.py`) reuses all of this with its fused projections split at load time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from hooked_recurrent.components.attention import GatedAttention
from hooked_recurrent.components.block import Block
from hooked_recurrent.components.gated_deltanet import GatedDeltaNet
from hooked_recurrent.components.mlp import GatedMLP
from hooked_recurrent.components.moe import MoE
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.config import HookedRecurrentConfig, SwiGLU
from hooked_recurrent.pretrained import Family, register_family

logger = logging.getLogger(__name__)

#: Hugging Face model_type -> our architecture name
_ARCHITECTURES = {
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen3_next": "qwen3_next",
}
#: multimodal model_types, whose language model is under `text_config`
_MULTIMODAL = ("qwen3_5", "qwen3_5_moe")


@dataclass
class Qwen35Config(SwiGLU, HookedRecurrentConfig):
    """Qwen3.5-family fields beyond the shared ones (Hugging Face name in brackets).

    Attributes:
        d_mlp: dense MLP width [intermediate_size]; on Qwen3.5-MoE (no dense MLP) the expert
            width.
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
        moe_layers: the blocks whose MLP is a sparse MoE (empty on Qwen3.5).
        n_experts, top_k: routed experts and experts per token [num_experts,
            num_experts_per_tok].
        d_expert, d_shared: routed and shared expert widths [moe_intermediate_size,
            shared_expert_intermediate_size].
        norm_topk: renormalise the chosen experts' weights [norm_topk_prob].
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
    moe_layers: list[int] = field(default_factory=list)
    n_experts: int = 0
    top_k: int = 0
    d_expert: int = 0
    d_shared: int = 0
    norm_topk: bool = True

    # TransformerLens fields (see HookedRecurrentConfig) this family knows directly
    @property
    def d_head(self) -> int:
        """Width of one softmax-attention head (`head_dim`)."""
        return self.attn_d_head

    @property
    def n_key_value_heads(self) -> int:
        """Key/value heads of the softmax-attention layers (GQA)."""
        return self.attn_n_kv_heads

    @property
    def positional_embedding_type(self) -> str:
        """ "rotary" when the attention layers rotate q and k, else "none"."""
        return "rotary" if self.rotary_dim else "none"


def _moe_fields(text: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """The MoE fields of a Qwen3.5-MoE / Qwen3-Next text config (none for Qwen3.5)."""
    n_experts = text.get("num_experts", 0)
    if not n_experts:
        return {}
    step = text.get("decoder_sparse_step", 1)
    dense = set(text.get("mlp_only_layers") or [])
    return dict(
        moe_layers=[l for l in range(n_layers) if l not in dense and (l + 1) % step == 0],
        n_experts=n_experts,
        top_k=text["num_experts_per_tok"],
        d_expert=text["moe_intermediate_size"],
        d_shared=text.get("shared_expert_intermediate_size", 0),
        norm_topk=bool(text.get("norm_topk_prob", True)),
    )


def config_from_hf(config: dict[str, Any]) -> Qwen35Config:
    """Our config from a Hugging Face Qwen3.5 / Qwen3.5-MoE / Qwen3-Next config dict (the text
    config of a multimodal checkpoint).
    """
    text = config.get("text_config") or config
    if config.get("model_type") in _MULTIMODAL and "text_config" not in config:
        raise ValueError(f"a {config['model_type']} (multimodal) config without text_config")
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
    moe = _moe_fields(text, n_layers)
    return Qwen35Config(
        architecture=_ARCHITECTURES.get(config.get("model_type"), "qwen3_5"),
        n_layers=n_layers,
        d_model=text["hidden_size"],
        d_vocab=text["vocab_size"],
        layer_types=["recurrent" if t == "linear_attention" else "attention" for t in layer_types],
        n_heads=text["linear_num_value_heads"],
        d_k=text["linear_key_head_dim"],
        d_v=text["linear_value_head_dim"],
        d_mlp=text.get("intermediate_size") or text["moe_intermediate_size"],
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
        **moe,
    )


def build_mlp(cfg: Qwen35Config, layer: int) -> GatedMLP | MoE:
    """The MLP of block `layer`: the sparse MoE with its gated shared expert, or the dense MLP."""
    if layer not in cfg.moe_layers:
        return GatedMLP(cfg.d_model, cfg.d_mlp)
    return MoE(
        cfg.d_model,
        cfg.d_expert,
        cfg.n_experts,
        cfg.top_k,
        norm_topk=cfg.norm_topk,
        d_shared=cfg.d_shared,
        shared_gate=True,
    )


def build_gated_deltanet(
    cfg: Qwen35Config, layer: int, eps: float, beta_scale: float = 1.0
) -> GatedDeltaNet:
    """The Gated DeltaNet of layer `layer`, its shape from `cfg`; `eps` is its output norm's."""
    return GatedDeltaNet(
        layer,
        cfg.d_model,
        cfg.n_heads,
        cfg.n_key_heads,
        cfg.d_k,
        cfg.d_v,
        cfg.conv_kernel,
        eps,
        cfg.chunk_size,
        beta_scale=beta_scale,
    )


def build_block(cfg: Qwen35Config, layer: int) -> Block:
    """The block of layer `layer`: Gated DeltaNet or gated attention, then the MLP."""
    attn: nn.Module
    if cfg.layer_types[layer] == "recurrent":
        attn = build_gated_deltanet(cfg, layer, cfg.eps)
    else:
        attn = GatedAttention.from_config(cfg, layer)
    return Block(
        layer,
        ln1=RMSNorm(cfg.d_model, cfg.eps, zero_centred=True),
        attn=attn,
        ln2=RMSNorm(cfg.d_model, cfg.eps, zero_centred=True),
        mlp=build_mlp(cfg, layer),
    )


# our name (after "blocks.{l}.") -> Hugging Face name (after "layers.{l}.")
_NORM_MAP = {
    "ln1.w": "input_layernorm.weight",
    "ln2.w": "post_attention_layernorm.weight",
}
_MLP_MAP = {
    "mlp.W_gate.weight": "mlp.gate_proj.weight",
    "mlp.W_in.weight": "mlp.up_proj.weight",
    "mlp.W_out.weight": "mlp.down_proj.weight",
}
_MOE_MAP = {
    "mlp.W_router.weight": "mlp.gate.weight",
    "mlp.shared_expert.W_gate.weight": "mlp.shared_expert.gate_proj.weight",
    "mlp.shared_expert.W_in.weight": "mlp.shared_expert.up_proj.weight",
    "mlp.shared_expert.W_out.weight": "mlp.shared_expert.down_proj.weight",
    "mlp.W_shared_gate.weight": "mlp.shared_expert_gate.weight",
}
GDN_MAP = {
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

#: (source state dict, "...layers.{l}." prefix, config) -> that layer's mixer weights, our names
MixerReader = Callable[[dict[str, Tensor], str, Qwen35Config], dict[str, Tensor]]
#: (our state dict, "blocks.{l}." prefix, config) -> that layer's mixer weights, HF names
MixerWriter = Callable[[dict[str, Tensor], str, Qwen35Config], dict[str, Tensor]]


def need(sd: dict[str, Tensor], key: str) -> Tensor:
    """`sd[key]`, or a KeyError naming the missing tensor."""
    if key not in sd:
        raise KeyError(f"checkpoint lacks {key}")
    return sd[key]


def _read(sd: dict[str, Tensor], pre: str, names: dict[str, str]) -> dict[str, Tensor]:
    return {ours: need(sd, pre + theirs) for ours, theirs in names.items()}


def read_gdn(sd: dict[str, Tensor], pre: str, cfg: Qwen35Config) -> dict[str, Tensor]:
    """Qwen3.5's Gated DeltaNet weights (separate in_proj_qkv / _z / _b / _a)."""
    out = _read(sd, pre, GDN_MAP)
    out["attn.conv_w"] = out["attn.conv_w"][:, 0, :]
    return out


def write_gdn(sd: dict[str, Tensor], pre: str, cfg: Qwen35Config) -> dict[str, Tensor]:
    """Inverse of `read_gdn`."""
    out = {theirs: sd[pre + ours] for ours, theirs in GDN_MAP.items()}
    out["linear_attn.conv1d.weight"] = out["linear_attn.conv1d.weight"][:, None, :]
    return out


def _read_mlp(sd: dict[str, Tensor], pre: str, cfg: Qwen35Config, layer: int) -> dict:
    """The dense MLP, or the MoE: router, shared expert and experts (fused or per expert)."""
    if layer not in cfg.moe_layers:
        return _read(sd, pre, _MLP_MAP)
    out = _read(sd, pre, _MOE_MAP)
    ex = f"{pre}mlp.experts."
    if f"{ex}gate_up_proj" in sd:  # a model's own state dict: [expert, 2 d_expert, d_model]
        out["mlp.experts.W_gate"], out["mlp.experts.W_in"] = sd[f"{ex}gate_up_proj"].chunk(2, 1)
        out["mlp.experts.W_out"] = need(sd, f"{ex}down_proj")
        return out
    for ours, theirs in (("W_gate", "gate_proj"), ("W_in", "up_proj"), ("W_out", "down_proj")):
        out[f"mlp.experts.{ours}"] = torch.stack(
            [need(sd, f"{ex}{e}.{theirs}.weight") for e in range(cfg.n_experts)]
        )
    return out


def _write_mlp(sd: dict[str, Tensor], pre: str, cfg: Qwen35Config, layer: int) -> dict:
    """Inverse of `_read_mlp`, with the experts fused (the names a `transformers` model holds)."""
    if layer not in cfg.moe_layers:
        return {theirs: sd[pre + ours] for ours, theirs in _MLP_MAP.items()}
    out = {theirs: sd[pre + ours] for ours, theirs in _MOE_MAP.items()}
    gate_up = (sd[f"{pre}mlp.experts.W_gate"], sd[f"{pre}mlp.experts.W_in"])
    out["mlp.experts.gate_up_proj"] = torch.cat(gate_up, 1)
    out["mlp.experts.down_proj"] = sd[f"{pre}mlp.experts.W_out"]
    return out


def _text_prefix(sd: dict[str, Tensor]) -> str:
    for prefix in ("model.language_model.", "model.", ""):
        if f"{prefix}embed_tokens.weight" in sd:
            return prefix
    raise KeyError("no embed_tokens.weight: not a Qwen3.5-family state dict")


def convert_state_dict(
    sd: dict[str, Tensor], cfg: Qwen35Config, read_mixer: MixerReader = read_gdn
) -> dict[str, Tensor]:
    """A Hugging Face Qwen3.5-family state dict in our names; `read_mixer` reads the Gated
    DeltaNet layers (Qwen3-Next passes one that splits its fused projections)."""
    p = _text_prefix(sd)
    dropped = [k for k in sd if k.startswith(("model.visual.", "visual.", "mtp."))]
    if dropped:
        logger.info("%s: ignoring %d vision-tower / MTP tensors", cfg.architecture, len(dropped))
    out = {"embed.weight": sd[f"{p}embed_tokens.weight"], "ln_final.w": sd[f"{p}norm.weight"]}
    lm_head = sd.get("lm_head.weight")
    if lm_head is None and not cfg.tie_word_embeddings:
        raise KeyError("untied checkpoint (tie_word_embeddings=false) lacks lm_head.weight")
    out["unembed.weight"] = out["embed.weight"] if cfg.tie_word_embeddings else lm_head
    for layer in range(cfg.n_layers):
        pre = f"{p}layers.{layer}."
        recurrent = cfg.layer_types[layer] == "recurrent"
        mixer = read_mixer(sd, pre, cfg) if recurrent else _read(sd, pre, _ATTN_MAP)
        weights = {**_read(sd, pre, _NORM_MAP), **mixer, **_read_mlp(sd, pre, cfg, layer)}
        out.update({f"blocks.{layer}.{k}": t for k, t in weights.items()})
    return out


def to_hf_state_dict(
    sd: dict[str, Tensor], cfg: Qwen35Config, write_mixer: MixerWriter = write_gdn
) -> dict[str, Tensor]:
    """Our state dict in `Qwen3_5(Moe)ForCausalLM` / `Qwen3NextForCausalLM` names (for
    `load_state_dict` into a `transformers` model, which then saves the checkpoint)."""
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["ln_final.w"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["unembed.weight"]
    for layer in range(cfg.n_layers):
        pre = f"blocks.{layer}."
        if cfg.layer_types[layer] == "recurrent":
            mixer = write_mixer(sd, pre, cfg)
        else:
            mixer = {theirs: sd[pre + ours] for ours, theirs in _ATTN_MAP.items()}
        norms = {theirs: sd[pre + ours] for ours, theirs in _NORM_MAP.items()}
        weights = {**norms, **mixer, **_write_mlp(sd, pre, cfg, layer)}
        out.update({f"model.layers.{layer}.{k}": t for k, t in weights.items()})
    return out


def build_final_norm(cfg: Qwen35Config) -> RMSNorm:
    """The final norm (zero-centred RMSNorm, as every norm of the family)."""
    return RMSNorm(cfg.d_model, cfg.eps, zero_centred=True)


FAMILY = register_family(
    Family(
        architecture="qwen3_5",
        display="Qwen3.5",
        model_types=("qwen3_5", "qwen3_5_text"),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=build_final_norm,
        ignored_prefixes=("model.visual.", "visual.", "mtp."),
        checkpoints=("Qwen/Qwen3.5-0.8B (0.8B)", "Qwen/Qwen3.5-9B (9B)"),
        layout="3 Gated DeltaNet blocks then 1 gated-attention block, repeated; SwiGLU MLPs",
        bridge="TransformerBridge (GatedDeltaNetBridge): interior Gated DeltaNet hooks on a "
        "prefill without a cache only, the state only with eager_scan, none live in generation",
    )
)

# the same config reader, conversion and blocks (the MLP kind comes from the config)
MOE_FAMILY = register_family(
    replace(
        FAMILY,
        architecture="qwen3_5_moe",
        display="Qwen3.5-MoE",
        model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
        checkpoints=(
            "Qwen/Qwen3.5-35B-A3B (35B, 3B active)",
            "Qwen/Qwen3.5-122B-A10B (122B, 10B active)",
            "Qwen/Qwen3.5-397B-A17B (397B, 17B active)",
        ),
        layout="3 Gated DeltaNet blocks then 1 gated-attention block, repeated; every MLP a "
        "sparse MoE with a sigmoid-gated shared expert",
        bridge="no TransformerLens 4.3 TransformerBridge adapter of its own (Qwen3.5 and "
        "Qwen3-Next have one: Gated DeltaNet hooks on a cache-free prefill, the state only with "
        "eager_scan, none live in generation); no router hooks",
    )
)
