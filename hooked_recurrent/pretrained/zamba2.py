"""Zamba2 (Zyphra): a Mamba-2 mixer in every layer; at the hybrid layers a shared transformer
block (attention + gated MLP, no residual) runs first on concat(residual, token embeddings) and
its output, through the layer's own linear map, is added to the mixer's input; config, weight
conversion, block factory.

Reads `Zamba2ForCausalLM` checkpoints: `model.layers.{l}.mamba.*` and `.input_layernorm` at the
Mamba layers; at the hybrid layers (`layers_block_type` "hybrid", `hybrid_layer_ids`)
`model.layers.{l}.mamba_decoder.{mamba,input_layernorm}.*`, `.linear.weight` and
`.shared_transformer.*`. The hybrid layers use `num_mem_blocks` shared blocks in turn (the j-th
hybrid layer uses block j mod num_mem_blocks), each with per-layer low-rank adapters (rank
`adapter_rank`) on the MLP's gate/up projection and, with `use_shared_attention_adapter`, on q, k
and v; RoPE when `use_mem_rope`. The attention reads 2 d_model channels, has heads of
2 d_model / num_attention_heads channels and scales its scores by (d_head / 2)^-1/2.

Every layer gets its own module (`Zamba2Block`, the shared part at `blocks.{l}.shared`), the
shared weights *copied* into each at load, so each layer's hooks are separate and nothing is tied
at run time. transformers ties the users of a block only when `tie_word_embeddings` is set (it
ties nothing otherwise): a tied `save_pretrained` folder stores each block once, under its first
user's layer, and an in-memory state dict repeats it under every user; an untied model has a
copy of its own in every hybrid layer. The conversion reads a layer's own copy where there is one,
else its block's first user's; `to_hf_state_dict` writes each shared block from its first user
(tied) or from each layer (untied).

The Mamba-2 mixers clamp dt below at `time_step_min` at every position, in generation too
(transformers clamps in its chunked scan only, not in its one-token decode step). The gated norm
of the mixer has epsilon 1e-5 whatever `rms_norm_eps` is, as in transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hooked_recurrent.components.attention import GatedAttention
from hooked_recurrent.components.block import SharedTransformer, Zamba2Block
from hooked_recurrent.components.mlp import ACTIVATIONS, GatedMLP
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.pretrained import Family, register_family
from hooked_recurrent.pretrained.mamba2 import build_mixer, mixer_map
from hooked_recurrent.pretrained.mamba2_hybrid import (
    BRIDGE,
    HybridConfig,
    hf_ends,
    rope_theta_and_fraction,
)

__all__ = ["Zamba2Config", "config_from_hf", "convert_state_dict", "to_hf_state_dict"]

#: epsilon of the Mamba-2 mixers' gated norm (fixed in transformers' Zamba2MambaMixer)
MIXER_EPS = 1e-5


@dataclass
class Zamba2Config(HybridConfig):
    """Zamba2's fields beyond the Mamba-2 hybrids' (Hugging Face name in brackets).

    Attributes:
        hybrid_layers: the layers that run the shared transformer [hybrid_layer_ids].
        n_mem_blocks: shared transformer blocks, used in turn by the hybrid layers
            [num_mem_blocks].
        adapter_rank: rank of the per-layer adapters [adapter_rank].
        attn_adapters: adapters on q, k, v too, not only on the MLP
            [use_shared_attention_adapter].
    """

    hybrid_layers: list[int] = field(default_factory=list)
    n_mem_blocks: int = 1
    adapter_rank: int = 0
    attn_adapters: bool = False

    def owner(self, layer: int) -> int:
        """The first hybrid layer using the same shared block as hybrid layer `layer`."""
        return self.hybrid_layers[self.hybrid_layers.index(layer) % self.n_mem_blocks]

    def source(self, layer: int) -> int:
        """The layer whose copy of the shared block hybrid layer `layer` runs in transformers:
        the block's first user when the model is tied (`tie_word_embeddings`), else itself."""
        return self.owner(layer) if self.tie_word_embeddings else layer

    def users(self, layer: int) -> list[int]:
        """The hybrid indices j (into `hybrid_layers`) of the layers sharing `layer`'s block."""
        block = self.hybrid_layers.index(layer) % self.n_mem_blocks
        return [j for j in range(len(self.hybrid_layers)) if j % self.n_mem_blocks == block]

    @property
    def attn_only(self) -> bool:
        """True: a block adds only its mixer's output to the residual (the shared MLP feeds the
        mixer's input)."""
        return True

    @property
    def positional_embedding_type(self) -> str:
        """ "rotary" when the shared attention uses RoPE, else "none"."""
        return "rotary" if self.rotary_dim else "none"


def config_from_hf(config: dict[str, Any]) -> Zamba2Config:
    """Our config from a Hugging Face `Zamba2Config` dict."""
    act = config.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r}: one of {sorted(ACTIVATIONS)} is supported")
    n_layers, d_model = config["num_hidden_layers"], config["hidden_size"]
    types = config.get("layers_block_type")
    hybrid = (
        [i for i, t in enumerate(types) if t == "hybrid"]
        if types is not None
        else list(config["hybrid_layer_ids"])
    )
    H = config["n_mamba_heads"]
    d_inner = int(config.get("mamba_expand", 2) * d_model)
    if d_inner % H:
        raise ValueError(f"mamba_expand * hidden_size = {d_inner} is not a multiple of {H} heads")
    n_attn = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_attn
    if (2 * d_model) % n_attn:
        raise ValueError(f"2 * hidden_size = {2 * d_model} is not a multiple of {n_attn} heads")
    attn_adapters = bool(config.get("use_shared_attention_adapter", False))
    if attn_adapters and n_kv != n_attn:
        raise ValueError(
            "use_shared_attention_adapter needs num_key_value_heads == num_attention_heads (the "
            "k and v adapters have 2 * hidden_size outputs)"
        )
    d_head = 2 * d_model // n_attn
    rope = bool(config.get("use_mem_rope", False))
    theta = rope_theta_and_fraction(config)[0] if rope else 10000.0  # every channel rotated
    bias = bool(config.get("add_bias_linear", False))
    return Zamba2Config(
        architecture="zamba2",
        n_layers=n_layers,
        d_model=d_model,
        d_vocab=config["vocab_size"],
        layer_types=["recurrent"] * n_layers,
        n_heads=H,
        d_k=config["mamba_d_state"],
        d_v=d_inner // H,
        n_groups=config.get("mamba_ngroups", 1),
        conv_kernel=config.get("mamba_d_conv", 4),
        eps=config.get("rms_norm_eps", 1e-5),
        chunk_size=config.get("chunk_size", 256),
        time_step_limit=(float(config.get("time_step_min", 0.001)), float("inf")),
        use_conv_bias=True,  # transformers' Zamba2 convolution always has a bias
        use_bias=bias,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        d_mlp=config.get("intermediate_size") or 4 * d_model,
        attn_n_heads=n_attn,
        attn_n_kv_heads=n_kv,
        attn_d_head=d_head,
        rotary_dim=d_head if rope else 0,
        rope_theta=theta,
        mlp_bias=bias,
        mlp_act=act,
        hybrid_layers=hybrid,
        n_mem_blocks=config.get("num_mem_blocks", 1),
        adapter_rank=config.get("adapter_rank", 128),
        attn_adapters=attn_adapters,
        hf_config=config,
    )


def build_block(cfg: Zamba2Config, layer: int) -> Zamba2Block:
    """The Mamba-2 mixer after an RMSNorm; at a hybrid layer, the shared transformer and the
    layer's linear map first."""
    mixer = build_mixer(dataclasses.replace(cfg, eps=MIXER_EPS), layer)
    if layer not in cfg.hybrid_layers:
        return Zamba2Block(layer, RMSNorm(cfg.d_model, cfg.eps), mixer)
    D = cfg.attn_d_head
    attn = GatedAttention(
        layer,
        cfg.d_model,
        cfg.attn_n_heads,
        cfg.attn_n_kv_heads,
        D,
        cfg.rotary_dim,
        cfg.rope_theta,
        cfg.eps,
        gated=False,
        qk_norm="none",
        scale=(D / 2) ** -0.5,
        d_in=2 * cfg.d_model,
        adapter_rank=cfg.adapter_rank if cfg.attn_adapters else 0,
    )
    mlp = GatedMLP(cfg.d_model, cfg.d_mlp, cfg.mlp_bias, cfg.mlp_act, cfg.adapter_rank)
    shared = SharedTransformer(
        RMSNorm(2 * cfg.d_model, cfg.eps), attn, RMSNorm(cfg.d_model, cfg.eps), mlp
    )
    linear = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
    return Zamba2Block(layer, RMSNorm(cfg.d_model, cfg.eps), mixer, shared, linear)


def _shared_map(cfg: Zamba2Config) -> dict[str, str]:
    """The shared block's weights but the MLP's gate/up projection and the adapters: ours (after
    "blocks.{l}.shared.") -> Hugging Face's (after "layers.{l}.shared_transformer.")."""
    names = {"ln1.w": "input_layernorm.weight", "ln2.w": "pre_ff_layernorm.weight"}
    names.update({f"attn.{n}.weight": f"self_attn.{n}.weight" for n in ("q_proj", "k_proj")})
    names.update({f"attn.{n}.weight": f"self_attn.{n}.weight" for n in ("v_proj", "o_proj")})
    kinds = ("weight", "bias") if cfg.mlp_bias else ("weight",)
    names.update({f"mlp.W_out.{k}": f"feed_forward.down_proj.{k}" for k in kinds})
    return names


def _adapter_map(cfg: Zamba2Config, j: int) -> dict[str, str]:
    """The adapters of the j-th hybrid layer: ours (after "blocks.{l}.shared.") -> Hugging
    Face's (after "layers.{owner}.shared_transformer.")."""
    names = {
        "mlp.adapter.A.weight": f"feed_forward.gate_up_proj_adapter_list.{j}.0.weight",
        "mlp.adapter.B.weight": f"feed_forward.gate_up_proj_adapter_list.{j}.1.weight",
    }
    if cfg.attn_adapters:
        for n in "qkv":
            names[f"attn.adapters.{n}.A.weight"] = f"self_attn.linear_{n}_adapter_list.{j}.0.weight"
            names[f"attn.adapters.{n}.B.weight"] = f"self_attn.linear_{n}_adapter_list.{j}.1.weight"
    return names


def _mamba_prefix(cfg: Zamba2Config, layer: int) -> str:
    hybrid = layer in cfg.hybrid_layers
    return f"model.layers.{layer}." + ("mamba_decoder." if hybrid else "")


def _get(sd: dict[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise KeyError(f"zamba2 checkpoint lacks {key}")
    return sd[key]


def _convert_shared(sd: dict[str, Tensor], cfg: Zamba2Config, layer: int) -> dict[str, Tensor]:
    """Hybrid layer `layer`'s copy of its shared block with its own adapters (its own copy where
    the state dict has one, else the block's first user's), and its linear map, in our names."""
    ours, j = f"blocks.{layer}.", cfg.hybrid_layers.index(layer)
    own = f"model.layers.{layer}.shared_transformer."
    first = f"model.layers.{cfg.owner(layer)}.shared_transformer."

    def pick(name: str) -> Tensor:
        return sd[own + name] if own + name in sd else _get(sd, first + name)

    out = {ours + "linear.weight": _get(sd, f"model.layers.{layer}.linear.weight")}
    names = {**_shared_map(cfg), **_adapter_map(cfg, j)}
    out.update({ours + "shared." + k: pick(v) for k, v in names.items()})
    kinds = ("weight", "bias") if cfg.mlp_bias else ("weight",)
    for k in kinds:
        gate, up = pick(f"feed_forward.gate_up_proj.{k}").split(cfg.d_mlp)
        out[f"{ours}shared.mlp.W_gate.{k}"], out[f"{ours}shared.mlp.W_in.{k}"] = gate, up
    # a copy also carries the other users' adapters, which transformers never runs in this
    # layer (and a tied in-memory copy repeats the first user's): read, not used
    for key in [k for k in sd if k.startswith(own)]:
        sd[key]  # noqa: B018
    return out


def convert_state_dict(sd: dict[str, Tensor], cfg: Zamba2Config) -> dict[str, Tensor]:
    """A `Zamba2ForCausalLM` state dict in our names, each shared block copied into every
    hybrid layer that uses it."""
    if "model.embed_tokens.weight" not in sd:
        raise KeyError("no model.embed_tokens.weight: not a Zamba2 state dict")
    embed = sd["model.embed_tokens.weight"]
    out = {"embed.weight": embed, "ln_final.w": _get(sd, "model.final_layernorm.weight")}
    lm_head = sd.get("lm_head.weight")
    if lm_head is None and not cfg.tie_word_embeddings:
        raise KeyError("untied Zamba2 checkpoint lacks lm_head.weight")
    out["unembed.weight"] = embed if cfg.tie_word_embeddings else lm_head
    for layer in range(cfg.n_layers):
        src = _mamba_prefix(cfg, layer)
        out[f"blocks.{layer}.ln1.w"] = _get(sd, src + "input_layernorm.weight")
        for ours, theirs in mixer_map(cfg, "attn.", "mamba.").items():
            t = _get(sd, src + theirs)
            out[f"blocks.{layer}.{ours}"] = t[:, 0, :] if ours.endswith("conv_w") else t
        if layer in cfg.hybrid_layers:
            out.update(_convert_shared(sd, cfg, layer))
    return out


def to_hf_state_dict(sd: dict[str, Tensor], cfg: Zamba2Config) -> dict[str, Tensor]:
    """Our state dict in `Zamba2ForCausalLM` names, every copy included (as the in-memory state
    dict of `Zamba2ForCausalLM` has them): each shared block from its first user (tied) or from
    each layer (untied), each adapter from its own layer."""
    out = hf_ends(sd, cfg.tie_word_embeddings)
    kinds = ("weight", "bias") if cfg.mlp_bias else ("weight",)
    for layer in range(cfg.n_layers):
        dst = _mamba_prefix(cfg, layer)
        out[dst + "input_layernorm.weight"] = sd[f"blocks.{layer}.ln1.w"]
        for ours, theirs in mixer_map(cfg, "attn.", "mamba.").items():
            t = sd[f"blocks.{layer}.{ours}"]
            out[dst + theirs] = t[:, None, :] if ours.endswith("conv_w") else t
        if layer not in cfg.hybrid_layers:
            continue
        out[f"model.layers.{layer}.linear.weight"] = sd[f"blocks.{layer}.linear.weight"]
        dst = f"model.layers.{layer}.shared_transformer."
        src = f"blocks.{cfg.source(layer)}.shared."
        out.update({dst + v: sd[src + k] for k, v in _shared_map(cfg).items()})
        for k in kinds:
            gate_up = (sd[f"{src}mlp.W_gate.{k}"], sd[f"{src}mlp.W_in.{k}"])
            out[f"{dst}feed_forward.gate_up_proj.{k}"] = torch.cat(gate_up)
        for j in cfg.users(layer):
            user = f"blocks.{cfg.hybrid_layers[j]}.shared."
            out.update({dst + v: sd[user + k] for k, v in _adapter_map(cfg, j).items()})
    return out


FAMILY = register_family(
    Family(
        architecture="zamba2",
        display="Zamba2",
        model_types=("zamba2",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
        checkpoints=(
            "Zyphra/Zamba2-1.2B (1.2B)",
            "Zyphra/Zamba2-2.7B (2.7B)",
            "Zyphra/Zamba2-7B (7B)",
        ),
        layout="every layer: RMSNorm + Mamba-2 mixer; at the hybrid layers a shared transformer "
        "block (attention + gated MLP on concat(residual, embeddings), per-layer adapters, "
        "num_mem_blocks blocks in turn) first, its output through a per-layer linear added to "
        "the mixer's input",
        bridge=BRIDGE,
    )
)
