"""Qwen3-Next: Qwen3.5's Gated DeltaNet and gated attention with a sparse MoE, fused projections.

The model is Qwen3.5-MoE's (`qwen3_5.py` builds it) except for two things. Its Gated DeltaNet
projections are fused per key-head group: `in_proj_qkvz` holds, for each of the `n_key_heads`
groups in turn, that group's q rows (d_k), k rows (d_k), the v rows of its `n_heads / n_key_heads`
value heads and their z rows; `in_proj_ba` holds, per group, the b rows then the a rows of its
value heads. They are split into Qwen3.5's `W_qkv` (all q, all k, all v), `W_z`, `W_b`, `W_a` when
the weights are loaded, so the forward pass is Qwen3.5's. And the MLP of block l is the MoE when
(l + 1) is a multiple of `decoder_sparse_step` and l is not in `mlp_only_layers`, else dense.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hooked_recurrent.pretrained import Family, register_family
from hooked_recurrent.pretrained.qwen3_5 import (
    GDN_MAP,
    Qwen35Config,
    build_block,
    build_final_norm,
    config_from_hf,
    convert_state_dict,
    need,
    read_gdn,
    to_hf_state_dict,
    write_gdn,
)

__all__ = ["read_fused_gdn", "write_fused_gdn", "convert_state_dict_next", "to_hf_state_dict_next"]


def _group_sizes(cfg: Qwen35Config) -> tuple[list[int], list[int]]:
    """Rows per key-head group of in_proj_qkvz ([q, k, v, z]) and of in_proj_ba ([b, a])."""
    r = cfg.n_heads // cfg.n_key_heads
    return [cfg.d_k, cfg.d_k, r * cfg.d_v, r * cfg.d_v], [r, r]


def read_fused_gdn(sd: dict[str, Tensor], pre: str, cfg: Qwen35Config) -> dict[str, Tensor]:
    """Qwen3-Next's Gated DeltaNet weights, the fused projections split into Qwen3.5's."""
    qkvz = need(sd, f"{pre}linear_attn.in_proj_qkvz.weight")
    ba = need(sd, f"{pre}linear_attn.in_proj_ba.weight")
    sizes_qkvz, sizes_ba = _group_sizes(cfg)
    d_model = qkvz.shape[-1]
    if qkvz.shape[0] != cfg.n_key_heads * sum(sizes_qkvz) or ba.shape[0] != 2 * cfg.n_heads:
        raise ValueError(
            f"{pre}linear_attn: in_proj_qkvz {tuple(qkvz.shape)} / in_proj_ba {tuple(ba.shape)} "
            f"do not fit {cfg.n_key_heads} key heads x {cfg.d_k} and {cfg.n_heads} value heads "
            f"x {cfg.d_v}"
        )
    q, k, v, z = qkvz.view(cfg.n_key_heads, -1, d_model).split(sizes_qkvz, dim=1)
    b, a = ba.view(cfg.n_key_heads, -1, d_model).split(sizes_ba, dim=1)
    split = {
        "linear_attn.in_proj_qkv.weight": torch.cat([t.reshape(-1, d_model) for t in (q, k, v)]),
        "linear_attn.in_proj_z.weight": z.reshape(-1, d_model),
        "linear_attn.in_proj_b.weight": b.reshape(-1, d_model),
        "linear_attn.in_proj_a.weight": a.reshape(-1, d_model),
    }
    rest = {pre + n: need(sd, pre + n) for n in GDN_MAP.values() if ".in_proj_" not in n}
    return read_gdn({**rest, **{pre + k: t for k, t in split.items()}}, pre, cfg)


def write_fused_gdn(sd: dict[str, Tensor], pre: str, cfg: Qwen35Config) -> dict[str, Tensor]:
    """Inverse of `read_fused_gdn`: Qwen3.5's projections fused per key-head group."""
    out = write_gdn(sd, pre, cfg)
    Hk, dk = cfg.n_key_heads, cfg.d_k
    w_qkv = out.pop("linear_attn.in_proj_qkv.weight")
    d_model = w_qkv.shape[-1]
    q, k, v = w_qkv.split([Hk * dk, Hk * dk, cfg.n_heads * cfg.d_v])
    z = out.pop("linear_attn.in_proj_z.weight")
    groups = [t.reshape(Hk, -1, d_model) for t in (q, k, v, z)]
    out["linear_attn.in_proj_qkvz.weight"] = torch.cat(groups, 1).reshape(-1, d_model)
    ba = [out.pop(f"linear_attn.in_proj_{n}.weight").reshape(Hk, -1, d_model) for n in "ba"]
    out["linear_attn.in_proj_ba.weight"] = torch.cat(ba, 1).reshape(-1, d_model)
    return out


def convert_state_dict_next(sd: dict[str, Tensor], cfg: Qwen35Config) -> dict[str, Tensor]:
    """A Hugging Face Qwen3-Next state dict in our names (fused projections split)."""
    return convert_state_dict(sd, cfg, read_mixer=read_fused_gdn)


def to_hf_state_dict_next(sd: dict[str, Tensor], cfg: Qwen35Config) -> dict[str, Tensor]:
    """Our state dict in `Qwen3NextForCausalLM` names (projections fused again)."""
    return to_hf_state_dict(sd, cfg, write_mixer=write_fused_gdn)


FAMILY = register_family(
    Family(
        architecture="qwen3_next",
        display="Qwen3-Next",
        model_types=("qwen3_next",),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict_next,
        build_block=build_block,
        build_final_norm=build_final_norm,
        ignored_prefixes=("mtp.",),
        checkpoints=(
            "Qwen/Qwen3-Next-80B-A3B-Instruct (80B, 3B active)",
            "Qwen/Qwen3-Next-80B-A3B-Thinking (80B, 3B active)",
        ),
        layout="3 Gated DeltaNet blocks then 1 gated-attention block, repeated; MoE MLPs with a "
        "sigmoid-gated shared expert (dense MLPs in `mlp_only_layers`)",
        bridge="TransformerBridge (GatedDeltaNetBridge): interior Gated DeltaNet hooks on a "
        "prefill without a cache only, the state only with eager_scan, none live in generation",
    )
)
