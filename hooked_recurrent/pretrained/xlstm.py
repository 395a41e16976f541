"""xLSTM (NX-AI's xLSTM 7B, `xLSTMForCausalLM`): config, weight conversion, blocks.

Every block is pre-norm: resid_mid = resid_pre + mLSTM(rmsnorm(resid_pre)), resid_post =
resid_mid + SwiGLU(rmsnorm(resid_mid)); the mLSTM cell is `components.mlstm`. The logits are
soft-capped, cap tanh(logits / cap) (`output_logit_soft_cap`), by the model's final transform.
Both weight layouts load: `weight_mode="single"` (separate q, k, v, gate projections) and
`"fused"` (`qkv_opreact`, `ifgate_preact`, `proj_up_gate_z`, split at load time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.components.block import Block
from hooked_recurrent.components.mlp import GatedMLP
from hooked_recurrent.components.mlstm import MLSTMMixer, soft_cap
from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.config import HookedRecurrentConfig, SwiGLU
from hooked_recurrent.pretrained import Family, register_family

__all__ = [
    "XLSTMConfig",
    "LogitSoftCap",
    "config_from_hf",
    "convert_state_dict",
    "to_hf_state_dict",
]


@dataclass
class XLSTMConfig(SwiGLU, HookedRecurrentConfig):
    """xLSTM fields beyond the shared ones (Hugging Face name in brackets).

    `d_v` is the state's column count, the value head size plus one (the normaliser's column);
    `d_head` is the value head size itself (what `W_O` reads).

    Attributes:
        d_mlp: the SwiGLU's hidden width (hidden size x [ffn_proj_factor], rounded up to a
            multiple of [ffn_round_up_to_multiple_of]).
        eps: epsilon of the RMSNorms and the per-head LayerNorm [norm_eps].
        cell_eps: epsilon added to the read's denominator [eps].
        gate_cap: soft cap of the input and forget gate pre-activations [gate_soft_cap].
        logit_cap: soft cap of the logits [output_logit_soft_cap], None for none.
        chunk_size: chunk length of the fast path [chunk_size].
        tie_word_embeddings: whether the unembedding is the embedding.
    """

    d_mlp: int = 0
    eps: float = 1e-6
    cell_eps: float = 1e-6
    gate_cap: float | None = 15.0
    logit_cap: float | None = 30.0
    chunk_size: int = 64
    tie_word_embeddings: bool = False

    @property
    def d_head(self) -> int:
        """The value head size (the state has one more column, the normaliser)."""
        return self.d_v - 1


def _round_up(x: float, multiple: int) -> int:
    return int(((x + multiple - 1) // multiple) * multiple)


def config_from_hf(config: dict[str, Any]) -> XLSTMConfig:
    """Our config from a Hugging Face xLSTM config dict."""
    if config.get("use_bias", False):
        raise ValueError("xLSTM: use_bias=True is not supported (no published checkpoint uses it)")
    d = config.get("hidden_size") or config["embedding_dim"]
    H = config["num_heads"]
    n_layers = config.get("num_hidden_layers") or config["num_blocks"]
    return XLSTMConfig(
        architecture="xlstm",
        n_layers=n_layers,
        d_model=d,
        d_vocab=config["vocab_size"],
        layer_types=["recurrent"] * n_layers,
        n_heads=H,
        d_k=int(d * config.get("qk_dim_factor", 0.5)) // H,
        d_v=int(d * config.get("v_dim_factor", 1.0)) // H + 1,
        d_mlp=_round_up(
            d * config.get("ffn_proj_factor", 2.667), config.get("ffn_round_up_to_multiple_of", 64)
        ),
        eps=config.get("norm_eps", 1e-6),
        cell_eps=config.get("eps", 1e-6),
        gate_cap=config.get("gate_soft_cap", 15.0),
        logit_cap=config.get("output_logit_soft_cap", 30.0),
        chunk_size=config.get("chunk_size", 64),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        hf_config=config,
    )


class LogitSoftCap(nn.Module):
    """logits -> cap tanh(logits / cap), in float32 (the reference's `output_logit_soft_cap`)."""

    def __init__(self, cap: float) -> None:
        super().__init__()
        self.cap = cap

    def forward(self, logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        """The capped logits."""
        return soft_cap(logits.float(), self.cap).to(logits.dtype)


def build_block(cfg: XLSTMConfig, layer: int) -> Block:
    """Layer `layer`: the mLSTM, then the SwiGLU feed-forward, each after an RMSNorm."""
    return Block(
        layer,
        ln1=RMSNorm(cfg.d_model, cfg.eps),
        attn=MLSTMMixer(
            layer,
            cfg.d_model,
            cfg.n_heads,
            cfg.d_k,
            cfg.d_head,
            gate_cap=cfg.gate_cap,
            eps=cfg.cell_eps,
            norm_eps=cfg.eps,
            chunk_size=cfg.chunk_size,
        ),
        ln2=RMSNorm(cfg.d_model, cfg.eps),
        mlp=GatedMLP(cfg.d_model, cfg.d_mlp),
    )


# our name (after "blocks.{l}.") -> Hugging Face name (after "backbone.blocks.{l}.")
_LAYER_MAP = {
    "ln1.w": "norm_mlstm.weight",
    "ln2.w": "norm_ffn.weight",
    "attn.norm_w": "mlstm_layer.multihead_norm.weight",
    "attn.W_out.weight": "mlstm_layer.out_proj.weight",
    "mlp.W_out.weight": "ffn.proj_down.weight",
}
_SINGLE_MAP = {
    "attn.W_q.weight": "mlstm_layer.q.weight",
    "attn.W_k.weight": "mlstm_layer.k.weight",
    "attn.W_v.weight": "mlstm_layer.v.weight",
    "attn.W_gate.weight": "mlstm_layer.ogate_preact.weight",
    "attn.W_i.weight": "mlstm_layer.igate_preact.weight",
    "attn.W_i.bias": "mlstm_layer.igate_preact.bias",
    "attn.W_f.weight": "mlstm_layer.fgate_preact.weight",
    "attn.W_f.bias": "mlstm_layer.fgate_preact.bias",
    "mlp.W_gate.weight": "ffn.proj_up_gate.weight",
    "mlp.W_in.weight": "ffn.proj_up.weight",
}


def _split_fused(sd: dict[str, Tensor], p: str, cfg: XLSTMConfig) -> dict[str, Tensor]:
    """The fused projections of one layer (`weight_mode="fused"`) split into ours."""
    qk, v = cfg.n_heads * cfg.d_k, cfg.n_heads * cfg.d_head
    q, k, vv, o = torch.split(sd[p + "mlstm_layer.qkv_opreact.weight"], [qk, qk, v, v])
    iw, fw = sd[p + "mlstm_layer.ifgate_preact.weight"].chunk(2)
    ib, fb = sd[p + "mlstm_layer.ifgate_preact.bias"].chunk(2)
    gate, up = sd[p + "ffn.proj_up_gate_z.weight"].chunk(2)
    return {
        "attn.W_q.weight": q,
        "attn.W_k.weight": k,
        "attn.W_v.weight": vv,
        "attn.W_gate.weight": o,
        "attn.W_i.weight": iw,
        "attn.W_i.bias": ib,
        "attn.W_f.weight": fw,
        "attn.W_f.bias": fb,
        "mlp.W_gate.weight": gate,
        "mlp.W_in.weight": up,
    }


def convert_state_dict(sd: dict[str, Tensor], cfg: XLSTMConfig) -> dict[str, Tensor]:
    """A Hugging Face xLSTM state dict in our names."""
    out = {
        "embed.weight": sd["backbone.embeddings.weight"],
        "ln_final.w": sd["backbone.out_norm.weight"],
    }
    out["unembed.weight"] = out["embed.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    fused = cfg.hf_config.get("weight_mode", "single") == "fused"
    for layer in range(cfg.n_layers):
        p, q = f"backbone.blocks.{layer}.", f"blocks.{layer}."
        for ours, theirs in _LAYER_MAP.items():
            out[q + ours] = sd[p + theirs]
        if fused:
            out.update({q + k: v for k, v in _split_fused(sd, p, cfg).items()})
        else:
            out.update({q + ours: sd[p + theirs] for ours, theirs in _SINGLE_MAP.items()})
    return out


def to_hf_state_dict(sd: dict[str, Tensor], cfg: XLSTMConfig) -> dict[str, Tensor]:
    """Our state dict in `xLSTMForCausalLM`'s names, in the config's `weight_mode` (the fused
    projections concatenated back)."""
    out = {"backbone.embeddings.weight": sd["embed.weight"]}
    out["backbone.out_norm.weight"] = sd["ln_final.w"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["unembed.weight"]
    fused = cfg.hf_config.get("weight_mode", "single") == "fused"
    for layer in range(cfg.n_layers):
        p, q = f"backbone.blocks.{layer}.", f"blocks.{layer}."
        for ours, theirs in _LAYER_MAP.items():
            out[p + theirs] = sd[q + ours]
        if not fused:
            out.update({p + theirs: sd[q + ours] for ours, theirs in _SINGLE_MAP.items()})
            continue
        a = q + "attn."
        out[p + "mlstm_layer.qkv_opreact.weight"] = torch.cat(
            [sd[a + n] for n in ("W_q.weight", "W_k.weight", "W_v.weight", "W_gate.weight")]
        )
        out[p + "mlstm_layer.ifgate_preact.weight"] = torch.cat(
            (sd[a + "W_i.weight"], sd[a + "W_f.weight"])
        )
        out[p + "mlstm_layer.ifgate_preact.bias"] = torch.cat(
            (sd[a + "W_i.bias"], sd[a + "W_f.bias"])
        )
        out[p + "ffn.proj_up_gate_z.weight"] = torch.cat(
            (sd[q + "mlp.W_gate.weight"], sd[q + "mlp.W_in.weight"])
        )
    return out


FAMILY = register_family(
    Family(
        architecture="xlstm",
        display="xLSTM",
        model_types=("xlstm",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        build_block=build_block,
        build_final_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.eps),
        build_logit_transform=lambda cfg: (
            None if cfg.logit_cap is None else LogitSoftCap(cfg.logit_cap)
        ),
        checkpoints=("NX-AI/xLSTM-7b (7B)",),
        layout="mLSTM in every layer (matrix memory with exponential input gates and a "
        "max-stabiliser, per-head LayerNorm, output gate), then a SwiGLU; soft-capped logits",
        bridge="not among TransformerLens 4.3's recurrent bridges (Gated DeltaNet, Mamba, RWKV-7): "
        "module hooks on the HF layers only, no state, write or decay hooks",
    )
)
