"""Mamba-2: config, weight conversion, block builder.

Reads two layouts:

* Hugging Face `Mamba2ForCausalLM` (`model_type` "mamba2"): `backbone.embeddings.weight`,
  `backbone.layers.{i}.norm.weight`, `backbone.layers.{i}.mixer.*`, `backbone.norm_f.weight`,
  `lm_head.weight`;
* the original `mamba_ssm` layout (e.g. `state-spaces/mamba2-370m`): a `config.json` with
  `d_model`, `n_layer`, `ssm_cfg`, `vocab_size`, `pad_vocab_size_multiple`, `tie_embeddings`, and
  `pytorch_model.bin` with `backbone.embedding.weight` (singular) and otherwise the same names.

The mixer weights have the same names in both. The `mamba_ssm` vocabulary is padded up to a
multiple of `pad_vocab_size_multiple` (50277 -> 50288 for mamba2-370m), and its mixer defaults
(`ngroups=1`, `headdim=64`, `d_state=128`, ...) differ from Hugging Face's (`n_groups=8`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from hooked_recurrent.components.block import Block
from hooked_recurrent.components.mamba2 import Mamba2Mixer
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.config import HookedRecurrentConfig
from hooked_recurrent.pretrained import Family, register_family

__all__ = [
    "Mamba2Config",
    "config_from_hf",
    "convert_state_dict",
    "to_hf_state_dict",
    "to_hf_config",
    "backbone_hf_config",
]

#: mamba_ssm's `Mamba2` module defaults (mamba_ssm/modules/mamba2.py); `ssm_cfg` overrides them
_MAMBA_SSM_DEFAULTS = dict(
    d_state=128,
    d_conv=4,
    expand=2,
    headdim=64,
    d_ssm=None,
    ngroups=1,
    chunk_size=256,
    rmsnorm=True,
    norm_before_gate=False,
    D_has_hdim=False,
    bias=False,
    conv_bias=True,
    dt_limit=(0.0, float("inf")),
)


@dataclass
class Mamba2Config(HookedRecurrentConfig):
    """Mamba-2 fields beyond the shared ones (Hugging Face name; mamba_ssm name).

    The shared fields: `n_heads` [num_heads; d_inner / headdim], `d_k` = d_state [state_size;
    d_state], `d_v` = headdim [head_dim; headdim]; every layer is "recurrent".

    Attributes:
        n_groups: B/C groups [n_groups; ngroups]; head h reads group h // (n_heads / n_groups),
            and the gated RMSNorm normalises groups of d_inner / n_groups channels.
        conv_kernel: causal convolution width [conv_kernel; d_conv].
        eps: epsilon of the block norms, norm_f and the gated norm [layer_norm_epsilon; 1e-5].
        chunk_size: chunk length of the fast SSD path [chunk_size].
        time_step_limit: clamp of dt after the softplus [time_step_limit; dt_limit].
        use_conv_bias: [use_conv_bias; conv_bias].
        use_bias: bias on in_proj and out_proj [use_bias; bias].
        tie_word_embeddings: unembedding = embedding [tie_word_embeddings; tie_embeddings].
        gated_norm: the grouped RMSNorm after the gate (False: y * silu(z) alone; Falcon-H1's
            `mamba_rms_norm`).
        norm_before_gate: the norm before the gate (Falcon-H1's `mamba_norm_before_gate`).
        out_bias: bias on out_proj when it differs from `use_bias` (Falcon-H1's
            `projectors_bias`); None: `use_bias`.
    """

    n_groups: int = 1
    conv_kernel: int = 4
    eps: float = 1e-5
    chunk_size: int = 256
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    use_conv_bias: bool = True
    use_bias: bool = False
    tie_word_embeddings: bool = False
    gated_norm: bool = True
    norm_before_gate: bool = False
    out_bias: bool | None = None

    @property
    def d_inner(self) -> int:
        """Width of the inner (expanded) stream: `n_heads * d_v`."""
        return self.n_heads * self.d_v


def _limit(pair: Any) -> tuple[float, float]:
    """A dt clamp from a config: floats, or transformers' JSON form {"__float__": "Infinity"}."""

    def one(x: Any) -> float:
        return float(x["__float__"]) if isinstance(x, dict) else float(x)

    lo, hi = pair
    return one(lo), one(hi)


def is_mamba_ssm_config(config: dict[str, Any]) -> bool:
    """True for an original `mamba_ssm` config.json of a Mamba-2 model (`d_model`, `n_layer`,
    `ssm_cfg` with "layer": "Mamba2"; Mamba-1 configs belong to `pretrained/mamba1.py`)."""
    return (
        "model_type" not in config
        and {"d_model", "n_layer", "ssm_cfg"} <= set(config)
        and (config.get("ssm_cfg") or {}).get("layer") == "Mamba2"
    )


def _from_mamba_ssm(config: dict[str, Any]) -> Mamba2Config:
    ssm = {**_MAMBA_SSM_DEFAULTS, **(config.get("ssm_cfg") or {})}
    layer = ssm.pop("layer", "Mamba1")
    if layer != "Mamba2":
        raise ValueError(
            f"mamba_ssm checkpoint with ssm_cfg.layer={layer!r}: only 'Mamba2' is supported "
            "(Mamba-1 is a different architecture)"
        )
    unsupported = {
        "d_intermediate": (config.get("d_intermediate", 0), 0),
        "attn_layer_idx": (list(config.get("attn_layer_idx") or []), []),
        "rms_norm": (config.get("rms_norm", True), True),
        "ssm_cfg.rmsnorm": (ssm["rmsnorm"], True),
        "ssm_cfg.norm_before_gate": (ssm["norm_before_gate"], False),
        "ssm_cfg.D_has_hdim": (ssm["D_has_hdim"], False),
    }
    for name, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"mamba_ssm config has {name}={got!r}; only {want!r} is supported")
    d_model = config["d_model"]
    d_inner = int(ssm["expand"] * d_model)
    if ssm["d_ssm"] not in (None, d_inner):
        raise ValueError(
            f"mamba_ssm config has ssm_cfg.d_ssm={ssm['d_ssm']} != d_inner={d_inner} (a gated MLP "
            "inside the mixer); not supported"
        )
    if d_inner % ssm["headdim"]:
        raise ValueError(f"d_inner {d_inner} is not a multiple of headdim {ssm['headdim']}")
    vocab = config["vocab_size"]
    mult = config.get("pad_vocab_size_multiple", 8)
    vocab = math.ceil(vocab / mult) * mult
    n_layers = config["n_layer"]
    return Mamba2Config(
        architecture="mamba2",
        n_layers=n_layers,
        d_model=d_model,
        d_vocab=vocab,
        layer_types=["recurrent"] * n_layers,
        n_heads=d_inner // ssm["headdim"],
        d_k=ssm["d_state"],
        d_v=ssm["headdim"],
        n_groups=ssm["ngroups"],
        conv_kernel=ssm["d_conv"],
        eps=1e-5,  # mamba_ssm's default norm_epsilon, and hard-coded in its gated norm
        chunk_size=ssm["chunk_size"],
        time_step_limit=_limit(ssm["dt_limit"]),
        use_conv_bias=bool(ssm["conv_bias"]),
        use_bias=bool(ssm["bias"]),
        tie_word_embeddings=bool(config.get("tie_embeddings", True)),
        hf_config=config,
    )


def config_from_hf(config: dict[str, Any]) -> Mamba2Config:
    """Our config from a Hugging Face `Mamba2Config` dict or a `mamba_ssm` config.json dict."""
    if "model_type" not in config and {"d_model", "n_layer"} <= set(config):
        return _from_mamba_ssm(config)
    d_inner = int(config.get("expand", 2) * config["hidden_size"])
    H, P = config["num_heads"], config["head_dim"]
    if H * P != d_inner:
        raise ValueError(f"num_heads * head_dim = {H * P} != expand * hidden_size = {d_inner}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r}: only 'silu' is supported")
    n_layers = config["num_hidden_layers"]
    return Mamba2Config(
        architecture="mamba2",
        n_layers=n_layers,
        d_model=config["hidden_size"],
        d_vocab=config["vocab_size"],
        layer_types=["recurrent"] * n_layers,
        n_heads=H,
        d_k=config["state_size"],
        d_v=P,
        n_groups=config.get("n_groups", 8),
        conv_kernel=config.get("conv_kernel", 4),
        eps=config.get("layer_norm_epsilon", 1e-5),
        chunk_size=config.get("chunk_size", 256),
        time_step_limit=_limit(config.get("time_step_limit", (0.0, math.inf))),
        use_conv_bias=bool(config.get("use_conv_bias", True)),
        use_bias=bool(config.get("use_bias", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        hf_config=config,
    )


def backbone_hf_config(cfg: Any, what: str) -> dict[str, Any]:
    """The keyword arguments that transformers' `MambaConfig` and `Mamba2Config` (`what`, for the
    error) name alike, for a Mamba-1 or Mamba-2 config `cfg`: sizes, conv, norm, biases, tying."""
    if cfg.d_inner % cfg.d_model:
        raise ValueError(
            f"d_inner {cfg.d_inner} is not an integer multiple of d_model {cfg.d_model}; "
            f"transformers' {what} needs an integer expand"
        )
    return dict(
        vocab_size=cfg.d_vocab,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        state_size=cfg.d_k,
        expand=cfg.d_inner // cfg.d_model,
        conv_kernel=cfg.conv_kernel,
        layer_norm_epsilon=cfg.eps,
        use_conv_bias=cfg.use_conv_bias,
        use_bias=cfg.use_bias,
        tie_word_embeddings=cfg.tie_word_embeddings,
        residual_in_fp32=True,
    )


def to_hf_config(cfg: Mamba2Config) -> dict[str, Any]:
    """Keyword arguments of a Hugging Face `Mamba2Config` for this model."""
    return backbone_hf_config(cfg, "Mamba2Config") | dict(
        head_dim=cfg.d_v,
        num_heads=cfg.n_heads,
        n_groups=cfg.n_groups,
        chunk_size=cfg.chunk_size,
        time_step_limit=tuple(cfg.time_step_limit),
    )


def build_mixer(cfg: Mamba2Config, layer: int) -> Mamba2Mixer:
    """The Mamba-2 mixer of layer `layer` (also used by the hybrid families' block factories)."""
    return Mamba2Mixer(
        layer,
        cfg.d_model,
        cfg.n_heads,
        cfg.d_v,
        cfg.d_k,
        cfg.n_groups,
        cfg.conv_kernel,
        cfg.eps,
        cfg.chunk_size,
        cfg.time_step_limit,
        cfg.use_conv_bias,
        cfg.use_bias,
        cfg.gated_norm,
        cfg.norm_before_gate,
        cfg.out_bias,
    )


def build_block(cfg: Mamba2Config, layer: int) -> Block:
    return Block(layer, ln1=RMSNorm(cfg.d_model, cfg.eps), attn=build_mixer(cfg, layer))


#: the Mamba-2 mixer's parameters: our name (after "attn.") -> Hugging Face / mamba_ssm name
#: (after the mixer's own prefix); the hybrid families use the same names
MIXER_MAP = {
    "W_in.weight": "in_proj.weight",
    "conv_w": "conv1d.weight",
    "dt_bias": "dt_bias",
    "A_log": "A_log",
    "D": "D",
    "norm_w": "norm.weight",
    "W_out.weight": "out_proj.weight",
}


def mixer_map(cfg: Mamba2Config, ours: str, theirs: str) -> dict[str, str]:
    """The mixer's weight names with prefixes (e.g. "attn." and "mixer."), biases and norm as
    configured."""
    names = dict(MIXER_MAP)
    if not cfg.gated_norm:
        del names["norm_w"]
    if cfg.use_conv_bias:
        names["conv_b"] = "conv1d.bias"
    if cfg.use_bias:
        names["W_in.bias"] = "in_proj.bias"
    if cfg.use_bias if cfg.out_bias is None else cfg.out_bias:
        names["W_out.bias"] = "out_proj.bias"
    return {ours + k: theirs + v for k, v in names.items()}


def _layer_map(cfg: Mamba2Config) -> dict[str, str]:
    """our name (after "blocks.{l}.") -> Hugging Face / mamba_ssm name (after
    "backbone.layers.{l}.")"""
    return {"ln1.w": "norm.weight", **mixer_map(cfg, "attn.", "mixer.")}


def convert_backbone(
    sd: dict[str, Tensor], cfg: Any, layer_map: dict[str, str], name: str
) -> dict[str, Tensor]:
    """A Mamba-layout state dict (Hugging Face `backbone.embeddings` or `mamba_ssm`
    `backbone.embedding`, `backbone.layers.{l}.*`, `backbone.norm_f`, `lm_head`) in our names,
    with `layer_map` {ours: theirs} per layer; `name` goes in the error messages. Shared by the
    Mamba-1 and Mamba-2 families."""
    embed = sd.get("backbone.embeddings.weight", sd.get("backbone.embedding.weight"))
    if embed is None:
        raise KeyError(
            "no backbone.embeddings.weight (Hugging Face) or backbone.embedding.weight "
            f"(mamba_ssm): not a {name} state dict"
        )
    if embed.shape[0] != cfg.d_vocab:
        raise ValueError(
            f"embedding has {embed.shape[0]} rows but the config gives a vocabulary of "
            f"{cfg.d_vocab} (after padding to pad_vocab_size_multiple)"
        )
    out = {"embed.weight": embed, "ln_final.w": sd["backbone.norm_f.weight"]}
    lm_head = sd.get("lm_head.weight")  # read even when tied: mamba_ssm saves both names
    if not cfg.tie_word_embeddings and lm_head is None:
        raise KeyError(f"untied {name} checkpoint lacks lm_head.weight")
    out["unembed.weight"] = embed if cfg.tie_word_embeddings else lm_head
    for layer in range(cfg.n_layers):
        for ours, theirs in layer_map.items():
            key = f"backbone.layers.{layer}.{theirs}"
            if key not in sd:
                raise KeyError(f"{name} checkpoint lacks {key}")
            t = sd[key]
            out[f"blocks.{layer}.{ours}"] = t[:, 0, :] if ours == "attn.conv_w" else t
    return out


def backbone_to_hf(sd: dict[str, Tensor], cfg: Any, layer_map: dict[str, str]) -> dict[str, Tensor]:
    """Our state dict in the Hugging Face Mamba layout (`convert_backbone` backwards)."""
    out = {
        "backbone.embeddings.weight": sd["embed.weight"],
        "backbone.norm_f.weight": sd["ln_final.w"],
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["unembed.weight"]
    for layer in range(cfg.n_layers):
        for ours, theirs in layer_map.items():
            t = sd[f"blocks.{layer}.{ours}"]
            key = f"backbone.layers.{layer}.{theirs}"
            out[key] = t[:, None, :] if ours == "attn.conv_w" else t
    return out


def convert_state_dict(sd: dict[str, Tensor], cfg: Mamba2Config) -> dict[str, Tensor]:
    """A `Mamba2ForCausalLM` or `mamba_ssm` state dict in our names."""
    return convert_backbone(sd, cfg, _layer_map(cfg), "Mamba-2")


def to_hf_state_dict(sd: dict[str, Tensor], cfg: Mamba2Config) -> dict[str, Tensor]:
    """Our state dict in `Mamba2ForCausalLM` names (for saving a checkpoint)."""
    return backbone_to_hf(sd, cfg, _layer_map(cfg))


FAMILY = register_family(
    Family(
        architecture="mamba2",
        display="Mamba-2",
        model_types=("mamba2",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
        detect=is_mamba_ssm_config,
        checkpoints=(
            "state-spaces/mamba2-130m (130M)",
            "state-spaces/mamba2-370m (370M)",
            "state-spaces/mamba2-780m (780M)",
            "state-spaces/mamba2-1.3b (1.3B)",
            "state-spaces/mamba2-2.7b (2.7B)",
        ),
        layout="every block: RMSNorm + Mamba-2 mixer (no MLP)",
        bridge="TransformerBridge (SSM2MixerBridge): projection hooks; hook_ssm_write/state "
        "only on its eager scan, edits do not propagate, silent in generate",
    )
)
