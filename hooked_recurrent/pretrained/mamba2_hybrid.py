"""What the Mamba-2 hybrid families share: their config fields, the plain attention of their
attention layers, and the layer-by-layer weight renaming.

Each hybrid family (Bamba, Nemotron-H, ...) is its own module with its own `config_from_hf`, block
factory and weight map; the Mamba-2 mixer is `Mamba2Mixer` built by `mamba2.build_mixer`, its
weight names `mamba2.mixer_map`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from hooked_recurrent.components.attention import GatedAttention
from hooked_recurrent.config import HookedRecurrentConfig
from hooked_recurrent.pretrained.mamba2 import Mamba2Config, _limit

#: what TransformerLens 4.3's TransformerBridge offers for these hybrids (its Mamba-2 mixer bridge)
BRIDGE = (
    "TransformerBridge (TL 4.3): residual, attention and mixer projection hooks; hook_ssm_write / "
    "hook_ssm_state only with eager_scan on a prefill without cache, state patches not propagated "
    "to later tokens, no mixer-interior hooks live in generate()"
)

__all__ = [
    "BRIDGE",
    "HybridConfig",
    "build_attention",
    "mamba2_fields",
    "fold_scales",
    "rename_layers",
    "rope_theta_and_fraction",
]


@dataclass
class HybridConfig(Mamba2Config):
    """A Mamba-2 hybrid: the Mamba-2 fields plus its attention and MLP layers.

    Attributes:
        d_mlp: MLP width.
        attn_n_heads, attn_n_kv_heads, attn_d_head: attention shape (query heads, key/value heads,
            head size).
        rotary_dim: rotated channels per attention head (0: no RoPE).
        rope_theta: RoPE base.
        attn_bias: biases on the attention projections.
        mlp_bias: biases on the MLP projections.
        mlp_act: the MLP's activation ("silu" in a gated MLP, "relu2" in a plain one).
    """

    d_mlp: int = 0
    attn_n_heads: int = 0
    attn_n_kv_heads: int = 0
    attn_d_head: int = 0
    rotary_dim: int = 0
    rope_theta: float = 10000.0
    attn_bias: bool = False
    mlp_bias: bool = False
    mlp_act: str = "silu"


def time_step_limit(config: dict[str, Any], key: str = "time_step_limit") -> tuple[float, float]:
    """The dt clamp of a config (default: none)."""
    return _limit(config.get(key) or (0.0, float("inf")))


def mamba2_fields(
    config: dict[str, Any], d_inner: int | None = None, eps: float = 1e-5
) -> dict[str, Any]:
    """The `HybridConfig` fields that Bamba, Falcon-H1 and Granite 4.0 hybrids name alike in their
    Hugging Face configs (`mamba_*`, the attention shape, the MLP width), as keyword arguments.

    `d_inner` is the mixer's width (default `mamba_expand * hidden_size`); `eps` the default of
    `rms_norm_eps`. The family adds `architecture`, `n_layers`, `layer_types` and its own fields.
    """
    d_model, H = config["hidden_size"], config["mamba_n_heads"]
    d_inner = d_inner or int(config.get("mamba_expand", 2) * d_model)
    P = config.get("mamba_d_head", "auto")
    P = d_inner // H if P == "auto" else P
    if H * P != d_inner:
        raise ValueError(f"mamba_n_heads * mamba_d_head = {H * P} != the mixer width {d_inner}")
    n_attn = config["num_attention_heads"]
    return dict(
        d_model=d_model,
        d_vocab=config["vocab_size"],
        n_heads=H,
        d_k=config["mamba_d_state"],
        d_v=P,
        n_groups=config.get("mamba_n_groups", 1),
        conv_kernel=config.get("mamba_d_conv", 4),
        eps=config.get("rms_norm_eps", eps),
        chunk_size=config.get("mamba_chunk_size", 256),
        time_step_limit=time_step_limit(config),
        use_conv_bias=bool(config.get("mamba_conv_bias", True)),
        use_bias=bool(config.get("mamba_proj_bias", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        d_mlp=config["intermediate_size"],
        attn_n_heads=n_attn,
        attn_n_kv_heads=config.get("num_key_value_heads") or n_attn,
        attn_d_head=config.get("head_dim") or d_model // n_attn,
        attn_bias=bool(config.get("attention_bias", False)),
    )


def rope_theta_and_fraction(config: dict[str, Any]) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) of a config; only the default RoPE is supported."""
    rope = config.get("rope_parameters") or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"rope_type {kind!r}: only the default RoPE is supported")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta), float(rope.get("partial_rotary_factor", 1.0))


def build_attention(cfg: HybridConfig, layer: int, scale: float | None = None) -> GatedAttention:
    """The hybrids' attention: no output gate, no q/k norm, RoPE on `cfg.rotary_dim` channels."""
    return GatedAttention.from_config(
        cfg, layer, gated=False, qk_norm="none", bias=cfg.attn_bias, scale=scale
    )


def attention_map(cfg: HybridConfig, theirs: str) -> dict[str, str]:
    """The attention's weight names: ours (after "blocks.{l}.") -> theirs (`theirs` + q_proj...)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    kinds = ("weight", "bias") if cfg.attn_bias else ("weight",)
    return {f"attn.{n}.{k}": f"{theirs}{n}.{k}" for n in names for k in kinds}


def hf_ends(sd: Mapping[str, Tensor], tied: bool) -> dict[str, Tensor]:
    """The embedding, final norm and head (unless `tied` to the embedding) in transformers'
    `model.embed_tokens`, `model.final_layernorm`, `lm_head` names: the start of a family's
    `to_hf_state_dict`."""
    out = {
        "model.embed_tokens.weight": sd["embed.weight"],
        "model.final_layernorm.weight": sd["ln_final.w"],
    }
    if not tied:
        out["lm_head.weight"] = sd["unembed.weight"]
    return out


def rename_layers(
    sd: Mapping[str, Tensor],
    cfg: HookedRecurrentConfig,
    layer_map: Callable[[int], dict[str, str]],
    prefix: str,
    to_hf: bool = False,
) -> dict[str, Tensor]:
    """Every block's weights renamed: from `{prefix}{l}.{theirs}` to `blocks.{l}.{ours}`, or back
    with `to_hf=True`. `layer_map(l)` gives layer l's names (ours -> theirs); a Mamba-1 or
    Mamba-2 convolution weight `[conv_dim, 1, K]` is stored as `[conv_dim, K]`."""
    out = {}
    for layer in range(cfg.n_layers):
        for ours, theirs in layer_map(layer).items():
            src, dst = f"blocks.{layer}.{ours}", f"{prefix}{layer}.{theirs}"
            if not to_hf:
                src, dst = dst, src
            if src not in sd:
                raise KeyError(f"{cfg.architecture} checkpoint lacks {src}")
            t = sd[src]
            if ours.endswith("conv_w"):
                t = t[:, None, :] if to_hf else t[:, 0, :]
            out[dst] = t
    return out


def fold_scales(
    sd: dict[str, Tensor],
    cfg: HybridConfig,
    scales: dict[str, tuple[Tensor, Tensor]],
    inverse: bool = False,
) -> None:
    """Multiply (or with `inverse`, divide) in place every block's projections by constant
    factors: `scales[name] = (weight factor, bias factor)` for `blocks.{l}.{name}.weight` /
    `.bias` (a weight factor with one entry per output row scales the rows), or for a bare
    parameter `blocks.{l}.{name}` (the weight factor). Families use it to fold multipliers that
    act on a linear map's output into the map (exactly, up to float rounding)."""
    for name, (w_scale, b_scale) in scales.items():
        for layer in range(cfg.n_layers):
            for suffix, s in ((".weight", w_scale), (".bias", b_scale), ("", w_scale)):
                key = f"blocks.{layer}.{name}{suffix}"
                if key in sd:
                    t = sd[key]
                    s = (s[:, None] if suffix == ".weight" and s.dim() else s).to(t.dtype)
                    sd[key] = t / s if inverse else t * s
