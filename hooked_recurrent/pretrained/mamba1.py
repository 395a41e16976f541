"""Mamba-1 and Falcon-Mamba: config, weight conversion, block builder.

Reads three layouts:

* Hugging Face `MambaForCausalLM` (`model_type` "mamba"): `backbone.embeddings.weight`,
  `backbone.layers.{i}.norm.weight`, `backbone.layers.{i}.mixer.*`, `backbone.norm_f.weight`,
  `lm_head.weight` (tied by default);
* Hugging Face `FalconMambaForCausalLM` (`model_type` "falcon_mamba"): the same names; its RMSNorm
  on dt, B and C has no weights (`mixer_rms_eps`);
* the original `mamba_ssm` layout (`state-spaces/mamba-130m` ... `mamba-2.8b`): a `config.json`
  with `d_model`, `n_layer`, `vocab_size`, `pad_vocab_size_multiple`, `ssm_cfg` (no "layer", or
  "layer": "Mamba1"), `rms_norm`, `residual_in_fp32`, `fused_add_norm`, `tie_embeddings`, and
  `pytorch_model.bin` with `backbone.embedding.weight` (singular), otherwise the same names. Its
  vocabulary is padded up to a multiple of `pad_vocab_size_multiple` (50277 -> 50280).

Every block is one Mamba-1 mixer after an RMSNorm (no MLP); the state is one head of
d_state x d_inner (see `components/mamba1.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from hooked_recurrent.components.block import Block
from hooked_recurrent.components.mamba1 import Mamba1Mixer
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.config import HookedRecurrentConfig
from hooked_recurrent.pretrained import Family, register_family
from hooked_recurrent.pretrained.mamba2 import backbone_hf_config, backbone_to_hf, convert_backbone

__all__ = [
    "Mamba1Config",
    "config_from_hf",
    "convert_state_dict",
    "to_hf_state_dict",
    "to_hf_config",
    "is_mamba1_ssm_config",
    "build_mixer",
    "mixer_map",
]

#: mamba_ssm's `Mamba` (v1) module defaults (mamba_ssm/modules/mamba_simple.py)
_MAMBA_SSM_DEFAULTS = dict(
    d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False
)
#: the mamba_ssm block norm's epsilon (`norm_epsilon`)
_MAMBA_SSM_EPS = 1e-5


@dataclass
class Mamba1Config(HookedRecurrentConfig):
    """Mamba-1 fields beyond the shared ones (Hugging Face name; mamba_ssm name).

    The shared fields: `n_heads` = 1, `d_k` = d_state [state_size; d_state], `d_v` = d_inner
    [intermediate_size; expand * d_model]; every layer is "recurrent".

    Attributes:
        dt_rank: width of dt before its projection [time_step_rank; dt_rank].
        conv_kernel: causal convolution width [conv_kernel; d_conv].
        eps: epsilon of the block norms and norm_f [layer_norm_epsilon; 1e-5].
        use_conv_bias: [use_conv_bias; conv_bias].
        use_bias: bias on in_proj and out_proj [use_bias; bias].
        bcdt_norm: the norm on dt, B, C: "none" (Mamba), "weightless" (Falcon-Mamba), "weighted"
            (Jamba's mixer).
        bcdt_eps: its epsilon [mixer_rms_eps].
        chunk_size: chunk length of the fast path; None picks about sqrt(T).
        tie_word_embeddings: unembedding = embedding [tie_word_embeddings; tie_embeddings].
    """

    dt_rank: int = 1
    conv_kernel: int = 4
    eps: float = 1e-5
    use_conv_bias: bool = True
    use_bias: bool = False
    bcdt_norm: str = "none"
    bcdt_eps: float = 1e-6
    chunk_size: int | None = None
    tie_word_embeddings: bool = True

    @property
    def d_inner(self) -> int:
        """Width of the inner (expanded) stream: `d_v`."""
        return self.d_v


def _ssm_cfg(config: dict[str, Any]) -> dict[str, Any]:
    return {**_MAMBA_SSM_DEFAULTS, **(config.get("ssm_cfg") or {})}


def is_mamba1_ssm_config(config: dict[str, Any]) -> bool:
    """True for an original `mamba_ssm` config.json of a Mamba-1 model."""
    keys = {"d_model", "n_layer", "vocab_size"}
    if "model_type" in config or not keys <= set(config):
        return False
    return _ssm_cfg(config).get("layer", "Mamba1") == "Mamba1"


def _dt_rank(rank: Any, d_model: int) -> int:
    return math.ceil(d_model / 16) if rank == "auto" else int(rank)


def _from_mamba_ssm(config: dict[str, Any]) -> Mamba1Config:
    ssm = _ssm_cfg(config)
    unsupported = {
        "d_intermediate": (config.get("d_intermediate", 0), 0),
        "attn_layer_idx": (list(config.get("attn_layer_idx") or []), []),
        "rms_norm": (config.get("rms_norm", True), True),
    }
    for name, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"mamba_ssm config has {name}={got!r}; only {want!r} is supported")
    d_model, n_layers = config["d_model"], config["n_layer"]
    mult = config.get("pad_vocab_size_multiple", 8)
    return Mamba1Config(
        architecture="mamba",
        n_layers=n_layers,
        d_model=d_model,
        d_vocab=math.ceil(config["vocab_size"] / mult) * mult,
        layer_types=["recurrent"] * n_layers,
        n_heads=1,
        d_k=ssm["d_state"],
        d_v=int(ssm["expand"] * d_model),
        dt_rank=_dt_rank(ssm["dt_rank"], d_model),
        conv_kernel=ssm["d_conv"],
        eps=_MAMBA_SSM_EPS,
        use_conv_bias=bool(ssm["conv_bias"]),
        use_bias=bool(ssm["bias"]),
        tie_word_embeddings=bool(config.get("tie_embeddings", True)),
        hf_config=config,
    )


def config_from_hf(config: dict[str, Any]) -> Mamba1Config:
    """Our config from a Hugging Face `MambaConfig` / `FalconMambaConfig` dict or a `mamba_ssm`
    config.json dict."""
    if is_mamba1_ssm_config(config):
        return _from_mamba_ssm(config)
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r}: only 'silu' is supported")
    falcon = config.get("model_type") == "falcon_mamba"
    d_model, n_layers = config["hidden_size"], config["num_hidden_layers"]
    return Mamba1Config(
        architecture="falcon_mamba" if falcon else "mamba",
        n_layers=n_layers,
        d_model=d_model,
        d_vocab=config["vocab_size"],
        layer_types=["recurrent"] * n_layers,
        n_heads=1,
        d_k=config["state_size"],
        d_v=config.get("intermediate_size", int(config.get("expand", 2) * d_model)),
        dt_rank=_dt_rank(config.get("time_step_rank", "auto"), d_model),
        conv_kernel=config.get("conv_kernel", 4),
        eps=config.get("layer_norm_epsilon", 1e-5),
        use_conv_bias=bool(config.get("use_conv_bias", True)),
        use_bias=bool(config.get("use_bias", False)),
        bcdt_norm="weightless" if falcon else "none",
        bcdt_eps=config.get("mixer_rms_eps", 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        hf_config=config,
    )


def to_hf_config(cfg: Mamba1Config) -> dict[str, Any]:
    """Keyword arguments of a Hugging Face `MambaConfig` (or `FalconMambaConfig`) for this
    model."""
    kw = backbone_hf_config(cfg, "MambaConfig")
    kw["time_step_rank"] = cfg.dt_rank
    if cfg.bcdt_norm == "weightless":
        kw["mixer_rms_eps"] = cfg.bcdt_eps
    return kw


def build_mixer(cfg: Mamba1Config, layer: int) -> Mamba1Mixer:
    """The Mamba-1 mixer of layer `layer` (also Jamba's Mamba layers)."""
    return Mamba1Mixer(
        layer,
        cfg.d_model,
        cfg.d_inner,
        cfg.d_k,
        cfg.dt_rank,
        cfg.conv_kernel,
        cfg.use_conv_bias,
        cfg.use_bias,
        cfg.bcdt_norm,
        cfg.bcdt_eps,
        cfg.chunk_size,
    )


def build_block(cfg: Mamba1Config, layer: int) -> Block:
    return Block(layer, ln1=RMSNorm(cfg.d_model, cfg.eps), attn=build_mixer(cfg, layer))


#: our name (after "blocks.{l}.") -> Hugging Face / mamba_ssm name (after "backbone.layers.{l}.")
MIXER_MAP = {
    "attn.W_in.weight": "mixer.in_proj.weight",
    "attn.conv_w": "mixer.conv1d.weight",
    "attn.W_x.weight": "mixer.x_proj.weight",
    "attn.W_dt.weight": "mixer.dt_proj.weight",
    "attn.W_dt.bias": "mixer.dt_proj.bias",
    "attn.A_log": "mixer.A_log",
    "attn.D": "mixer.D",
    "attn.W_out.weight": "mixer.out_proj.weight",
}
#: the weighted RMSNorm on dt, B, C (`bcdt_norm="weighted"`, Jamba's mixer)
_BCDT_NORMS = {
    "attn.dt_norm_w": "mixer.dt_layernorm.weight",
    "attn.B_norm_w": "mixer.b_layernorm.weight",
    "attn.C_norm_w": "mixer.c_layernorm.weight",
}
_CONV_BIAS = {"attn.conv_b": "mixer.conv1d.bias"}
_PROJ_BIAS = {"attn.W_in.bias": "mixer.in_proj.bias", "attn.W_out.bias": "mixer.out_proj.bias"}


def mixer_map(cfg: Any) -> dict[str, str]:
    """The mixer's weight names (ours -> theirs, after "blocks.{l}." and the source's layer
    prefix) for a config with `use_conv_bias`, `use_bias` and `bcdt_norm`; a hybrid family whose
    layers name the mixer otherwise (Jamba: "mamba.") replaces the leading "mixer."."""
    return {
        **MIXER_MAP,
        **(_CONV_BIAS if cfg.use_conv_bias else {}),
        **(_PROJ_BIAS if cfg.use_bias else {}),
        **(_BCDT_NORMS if cfg.bcdt_norm == "weighted" else {}),
    }


def _layer_map(cfg: Mamba1Config) -> dict[str, str]:
    return {"ln1.w": "norm.weight", **mixer_map(cfg)}


def convert_state_dict(sd: dict[str, Tensor], cfg: Mamba1Config) -> dict[str, Tensor]:
    """A `MambaForCausalLM`, `FalconMambaForCausalLM` or `mamba_ssm` state dict in our names."""
    return convert_backbone(sd, cfg, _layer_map(cfg), "Mamba")


def to_hf_state_dict(sd: dict[str, Tensor], cfg: Mamba1Config) -> dict[str, Tensor]:
    """Our state dict in `MambaForCausalLM` / `FalconMambaForCausalLM` names."""
    return backbone_to_hf(sd, cfg, _layer_map(cfg))


_COMMON: dict[str, Any] = dict(
    config_from_hf=config_from_hf,
    convert_state_dict=convert_state_dict,
    build_block=build_block,
    build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
)

FAMILY = register_family(
    Family(
        architecture="mamba",
        display="Mamba-1",
        model_types=("mamba",),
        detect=is_mamba1_ssm_config,
        checkpoints=(
            "state-spaces/mamba-130m-hf (130M)",
            "state-spaces/mamba-370m-hf (370M)",
            "state-spaces/mamba-790m-hf (790M)",
            "state-spaces/mamba-1.4b-hf (1.4B)",
            "state-spaces/mamba-2.8b-hf (2.8B)",
            "state-spaces/mamba-130m (130M, mamba_ssm layout)",
            "state-spaces/mamba-2.8b (2.8B, mamba_ssm layout)",
        ),
        layout="every block: RMSNorm + Mamba-1 mixer (no MLP); state 1 x d_state x d_inner",
        bridge=(
            "residual and in/x/out projection hooks; hook_ssm_write/hook_ssm_state only on its "
            "eager scan, state edits do not propagate, dt_proj/conv1d hooks never fire, state "
            "hooks silent in generate"
        ),
        **_COMMON,
    )
)

FALCON_FAMILY = register_family(
    Family(
        architecture="falcon_mamba",
        display="Falcon-Mamba",
        model_types=("falcon_mamba",),
        checkpoints=(
            "tiiuae/falcon-mamba-7b (7B)",
            "tiiuae/falcon-mamba-7b-instruct (7B)",
            "tiiuae/Falcon3-Mamba-7B-Base (7B)",
        ),
        layout=(
            "every block: RMSNorm + Mamba-1 mixer with weightless RMSNorm on dt, B, C (no MLP)"
        ),
        bridge=(
            "as Mamba-1 where the model is mapped (SSMMixerBridge): projection hooks, "
            "non-propagating state hooks on the eager scan only"
        ),
        **_COMMON,
    )
)
