"""RWKV-7 "Goose": config, weight conversion, block builder, BlinkDL `.pth` loading, tokenizer.

Two checkpoint layouts are read:

* fla-hub folders (`config.json` with model_type "rwkv7", `model.safetensors` in
  flash-linear-attention names: `model.layers.{i}.attn.r_proj.weight`, `...w_lora.lora.0.weight`);
* BlinkDL `.pth` files (`RWKV-x070-*.pth`: `blocks.{i}.att.receptance.weight`, `...att.w1`),
  converted to fla names first by `blinkdl_to_fla` (the mapping of fla's
  `utils/convert_from_rwkv7.py`), so one weight map (`_LAYER_MAP`) serves both.

BlinkDL files come with the RWKV "World" tokenizer (`rwkv_vocab_v20230424`, shipped by the `rwkv`
package) when their vocabulary has its 65536 entries.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hooked_recurrent.components.block import Block
from hooked_recurrent.components.norms import LayerNorm
from hooked_recurrent.components.rwkv7 import ChannelMix, TimeMix
from hooked_recurrent.config import HookedRecurrentConfig
from hooked_recurrent.pretrained import Family, register_family

__all__ = [
    "RWKV7Config",
    "WorldTokenizer",
    "blinkdl_to_fla",
    "to_fla_state_dict",
    "random_blinkdl_state_dict",
    "FAMILY",
]

logger = logging.getLogger(__name__)

WORLD_VOCAB_SIZE = 65536


@dataclass
class RWKV7Config(HookedRecurrentConfig):
    """RWKV-7 fields beyond the shared ones (fla `RWKV7Config` name in brackets).

    `n_heads` = hidden_size / head_dim and `d_k = d_v = head_dim`.

    Attributes:
        d_mlp: channel-mix width [intermediate_size].
        d_decay_lora, d_a_lora, d_v_lora, d_gate_lora: LoRA ranks [decay_low_rank_dim,
            a_low_rank_dim, v_low_rank_dim, gate_low_rank_dim]; read from the weight shapes.
        norm_eps: LayerNorm epsilon; GroupNorm uses head_dim * norm_eps [norm_eps].
        fuse_norm: fla's fused norms; changes the removal-key normalisation (see
            `kappa_normalize`) [fuse_norm]. BlinkDL checkpoints: False.
        embed_norm: LayerNorm right after the embedding (BlinkDL ln0) [norm_first].
        tie_word_embeddings: whether the unembedding is the embedding.
        chunk_size: chunk length of the fast recurrence.
    """

    d_mlp: int = 0
    d_decay_lora: int = 64
    d_a_lora: int = 64
    d_v_lora: int = 32
    d_gate_lora: int = 128
    norm_eps: float = 1e-5
    fuse_norm: bool = False
    embed_norm: bool = True
    tie_word_embeddings: bool = False
    chunk_size: int = 16


def config_from_hf(config: dict[str, Any]) -> RWKV7Config:
    """Our config from an fla-hub RWKV-7 config dict."""
    if config.get("attn"):
        raise NotImplementedError("RWKV-7 with hybrid attention layers (fla config 'attn')")
    if config.get("hidden_act", "sqrelu") != "sqrelu":
        raise NotImplementedError(f"RWKV-7 channel mix with hidden_act={config['hidden_act']!r}")
    C, L = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or C // config["num_heads"]
    value_dim = config.get("value_dim")
    if value_dim is not None and any(d != C for d in value_dim):
        raise NotImplementedError(f"RWKV-7 with value_dim {value_dim} != hidden_size {C}")
    d_mlp = config.get("intermediate_size")
    if d_mlp is None:
        d_mlp = 32 * ((int(C * (config.get("hidden_ratio") or 4)) + 31) // 32)
    return RWKV7Config(
        architecture="rwkv7",
        n_layers=L,
        d_model=C,
        d_vocab=config["vocab_size"],
        layer_types=["recurrent"] * L,
        n_heads=C // head_dim,
        d_k=head_dim,
        d_v=head_dim,
        d_mlp=d_mlp,
        d_decay_lora=config.get("decay_low_rank_dim", 64),
        d_a_lora=config.get("a_low_rank_dim", 64),
        d_v_lora=config.get("v_low_rank_dim", 32),
        d_gate_lora=config.get("gate_low_rank_dim", 128),
        norm_eps=config.get("norm_eps", 1e-5),
        fuse_norm=bool(config.get("fuse_norm", True)),
        embed_norm=bool(config.get("norm_first", True)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        hf_config=config,
    )


def build_block(cfg: RWKV7Config, layer: int) -> Block:
    """The block of layer `layer`: time mix then channel mix."""
    attn = TimeMix(
        layer,
        cfg.d_model,
        cfg.n_heads,
        cfg.d_k,
        cfg.d_decay_lora,
        cfg.d_a_lora,
        cfg.d_v_lora,
        cfg.d_gate_lora,
        cfg.norm_eps,
        cfg.fuse_norm,
        cfg.chunk_size,
    )
    return Block(
        layer,
        ln1=LayerNorm(cfg.d_model, cfg.norm_eps),
        attn=attn,
        ln2=LayerNorm(cfg.d_model, cfg.norm_eps),
        mlp=ChannelMix(layer, cfg.d_model, cfg.d_mlp),
    )


# our name (after "blocks.{l}.") -> (fla name after "model.layers.{l}.", how it is stored there):
# "T" transposed (fla LoRA Linears hold W^T; we keep BlinkDL's x @ W orientation), "flat" any
# [1, 1, C] shape, "" as is
_LAYER_MAP = {
    "ln1.w": ("attn_norm.weight", ""),
    "ln1.b": ("attn_norm.bias", ""),
    "ln2.w": ("ffn_norm.weight", ""),
    "ln2.b": ("ffn_norm.bias", ""),
    **{f"attn.x_{c}": (f"attn.x_{c}", "flat") for c in "rwkvag"},
    **{
        f"attn.{c}{i}": (f"attn.{c}_lora.lora.{j}", t)
        for c in "wav"
        for i, j, t in (("0", "2.bias", "flat"), ("1", "0.weight", "T"), ("2", "2.weight", "T"))
    },
    "attn.g1": ("attn.g_lora.lora.0.weight", "T"),
    "attn.g2": ("attn.g_lora.lora.2.weight", "T"),
    "attn.k_k": ("attn.k_k", "flat"),
    "attn.k_a": ("attn.k_a", "flat"),
    "attn.r_k": ("attn.r_k", ""),
    "attn.W_r.weight": ("attn.r_proj.weight", ""),
    "attn.W_k.weight": ("attn.k_proj.weight", ""),
    "attn.W_v.weight": ("attn.v_proj.weight", ""),
    "attn.W_out.weight": ("attn.o_proj.weight", ""),
    "attn.ln_x_w": ("attn.g_norm.weight", ""),
    "attn.ln_x_b": ("attn.g_norm.bias", ""),
    "mlp.x_k": ("ffn.x_k", "flat"),
    "mlp.W_in.weight": ("ffn.key.weight", ""),
    "mlp.W_out.weight": ("ffn.value.weight", ""),
}
_MODEL_MAP = {
    "embed.weight": "model.embeddings.weight",
    "ln_embed.w": "model.layers.0.pre_norm.weight",
    "ln_embed.b": "model.layers.0.pre_norm.bias",
    "ln_final.w": "model.norm.weight",
    "ln_final.b": "model.norm.bias",
    "unembed.weight": "lm_head.weight",
}


def _layer_names(cfg: RWKV7Config, layer: int) -> dict[str, tuple[str, str]]:
    """The weight map of one layer (layer 0 has no value-residual LoRA)."""
    return {k: v for k, v in _LAYER_MAP.items() if layer > 0 or not re.fullmatch("attn.v[012]", k)}


def config_from_weights(sd: dict[str, Tensor], cfg: RWKV7Config) -> RWKV7Config:
    """A copy of `cfg` with the LoRA ranks and the channel-mix width read from the weights'
    shapes (fla configs may leave them out or give other values)."""
    p = "model.layers"
    shapes: dict[str, Any] = {
        "d_decay_lora": sd[f"{p}.0.attn.w_lora.lora.0.weight"].shape[0],
        "d_a_lora": sd[f"{p}.0.attn.a_lora.lora.0.weight"].shape[0],
        "d_gate_lora": sd[f"{p}.0.attn.g_lora.lora.0.weight"].shape[0],
        "d_mlp": sd[f"{p}.0.ffn.key.weight"].shape[0],
    }
    if cfg.n_layers > 1:
        shapes["d_v_lora"] = sd[f"{p}.1.attn.v_lora.lora.0.weight"].shape[0]
    for name, value in shapes.items():
        if getattr(cfg, name) != value:
            logger.info(
                "RWKV-7: %s = %d from the weights (config said %d)", name, value, getattr(cfg, name)
            )
    return dataclasses.replace(cfg, **shapes)


def convert_state_dict(sd: dict[str, Tensor], cfg: RWKV7Config) -> dict[str, Tensor]:
    """fla-named state dict -> ours (`cfg` as `config_from_weights` gives it)."""
    p = "model.layers"
    C = cfg.d_model
    out: dict[str, Tensor] = {}
    for ours, theirs in _MODEL_MAP.items():
        if ours.startswith("ln_embed") and not cfg.embed_norm:
            continue
        if theirs not in sd:
            if ours == "unembed.weight" and cfg.tie_word_embeddings:
                out[ours] = sd["model.embeddings.weight"]
                continue
            if theirs.endswith(".bias"):  # norm_bias=False checkpoints
                out[ours] = torch.zeros(C)
                continue
            raise KeyError(f"RWKV-7 checkpoint lacks {theirs}")
        out[ours] = sd[theirs]
    for layer in range(cfg.n_layers):
        for ours, (theirs, how) in _layer_names(cfg, layer).items():
            key = f"{p}.{layer}.{theirs}"
            if key not in sd:
                if key.endswith("norm.bias"):
                    out[f"blocks.{layer}.{ours}"] = torch.zeros(C)
                    continue
                raise KeyError(f"RWKV-7 checkpoint lacks {key}")
            t = sd[key]
            t = t.t() if how == "T" else t.reshape(-1) if how == "flat" else t
            if ours == "attn.r_k":
                t = t.reshape(cfg.n_heads, cfg.d_k)
            out[f"blocks.{layer}.{ours}"] = t.contiguous()
    return out


def to_fla_state_dict(sd: dict[str, Tensor], cfg: RWKV7Config) -> dict[str, Tensor]:
    """Our state dict in fla names and shapes (for saving an fla-hub style checkpoint)."""
    out = {theirs: sd[ours] for ours, theirs in _MODEL_MAP.items() if ours in sd}
    C = cfg.d_model
    for layer in range(cfg.n_layers):
        for ours, (theirs, how) in _layer_names(cfg, layer).items():
            t = sd[f"blocks.{layer}.{ours}"]
            if how == "T":
                t = t.t()
            elif theirs.startswith("attn.x_"):
                t = t.reshape(1, 1, C)
            out[f"model.layers.{layer}.{theirs}"] = t.contiguous()
    return out


# --------------------------------------------------------------------------- BlinkDL .pth files
_BLINK_PART = {
    "att": "attn",
    "ffn": "ffn",
    "ln0": "pre_norm",
    "ln1": "attn_norm",
    "ln2": "ffn_norm",
}
_BLINK_PROJ = {
    "receptance": "r_proj",
    "key": "k_proj",
    "value": "v_proj",
    "output": "o_proj",
    "ln_x": "g_norm",
}
_BLINK_TOP = {
    "emb.weight": "model.embeddings.weight",
    "ln_out.weight": "model.norm.weight",
    "ln_out.bias": "model.norm.bias",
    "head.weight": "lm_head.weight",
}


def is_blinkdl_rwkv7(sd: dict[str, Tensor]) -> bool:
    """Whether a state dict is a BlinkDL RWKV-7 (x070) checkpoint."""
    return all(f"blocks.0.att.{n}" in sd for n in ("r_k", "k_a", "k_k", "x_r", "w1"))


def blinkdl_to_fla(sd: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A BlinkDL RWKV-7 state dict -> (fla `config.json` dict, fla-named state dict).

    The mapping of fla's `utils/convert_from_rwkv7.py`: LoRA `{w,a,v,g}{0,1,2}` become
    `{c}_lora.lora.{2.bias, 0.weight (transposed), 2.weight (transposed)}`, [1, 1, C] vectors are
    squeezed (except the attention lerps `x_*`, which fla keeps as [1, 1, C]), `blocks.0.att.v*`
    (unused in layer 0) is dropped. The config has `fuse_norm: false` (BlinkDL normalises the
    removal key with F.normalize).
    """
    C = sd["emb.weight"].shape[1]
    H, N = sd["blocks.0.att.r_k"].shape
    L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        if name in _BLINK_TOP:
            out[_BLINK_TOP[name]] = t
            continue
        parts = name.split(".")
        if parts[0] != "blocks" or re.fullmatch(r"blocks\.0\.att\.v[012]", name):
            if parts[0] != "blocks":
                logger.info("RWKV-7 .pth: ignoring %s", name)
            continue
        parts[0], parts[2] = "model.layers", _BLINK_PART[parts[2]]
        leaf = parts[3]
        if re.fullmatch("[wvag][012]", leaf):
            c, i = leaf[0], leaf[1]
            parts[3] = f"{c}_lora.lora." + {"0": "2.bias", "1": "0.weight", "2": "2.weight"}[i]
            t = t.t() if i in "12" else t.reshape(-1)
        elif parts[2] == "attn" and leaf in _BLINK_PROJ:
            parts[3] = _BLINK_PROJ[leaf]
        elif t.dim() == 3 and not (parts[2] == "attn" and leaf.startswith("x_")):
            t = t.reshape(-1)
        out[".".join(parts)] = t.contiguous()
    if "blocks.0.att.g1" not in sd:
        raise KeyError("not an RWKV-7 checkpoint: blocks.0.att.g1 missing")
    config = {
        "model_type": "rwkv7",
        "architectures": ["RWKV7ForCausalLM"],
        "hidden_size": C,
        "num_hidden_layers": L,
        "head_dim": N,
        "num_heads": H,
        "vocab_size": sd["emb.weight"].shape[0],
        "intermediate_size": sd["blocks.0.ffn.key.weight"].shape[0],
        "hidden_ratio": sd["blocks.0.ffn.key.weight"].shape[0] / C,
        "decay_low_rank_dim": sd["blocks.0.att.w1"].shape[1],
        "a_low_rank_dim": sd["blocks.0.att.a1"].shape[1],
        "v_low_rank_dim": sd["blocks.1.att.v1"].shape[1] if L > 1 else 32,
        "gate_low_rank_dim": sd["blocks.0.att.g1"].shape[1],
        "hidden_act": "sqrelu",
        "norm_first": "blocks.0.ln0.weight" in sd,
        "norm_bias": True,
        "norm_eps": 1e-5,
        "fuse_norm": False,
        "tie_word_embeddings": False,
        "value_dim": [C] * L,
    }
    return config, out


class WorldTokenizer:
    """The RWKV "World" tokenizer (`rwkv_vocab_v20230424`, a byte trie), with the attributes
    `HookedRecurrentModel.to_tokens` / `to_string` use. Token 0 is end-of-text (and padding)."""

    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = None
    vocab_size = WORLD_VOCAB_SIZE

    def __init__(self, vocab_file: str | Path | None = None) -> None:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

        if vocab_file is None:
            import rwkv

            vocab_file = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
        self._trie = TRIE_TOKENIZER(str(vocab_file))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (greedy longest match in the World vocabulary)."""
        return self._trie.encode(text)

    def decode(self, ids: list[int] | int) -> str:
        """Text of a token id or a list of ids (invalid UTF-8 replaced)."""
        ids = [ids] if isinstance(ids, int) else ids
        raw = b"".join(self._trie.idx2token.get(i, b"") for i in ids)
        return raw.decode("utf-8", errors="replace")


def world_tokenizer() -> WorldTokenizer | None:
    """The World tokenizer, or None (with a warning) when the `rwkv` package is not installed."""
    try:
        return WorldTokenizer()
    except ImportError:
        logger.warning("the rwkv package is not installed: loading RWKV-7 without its tokenizer")
        return None


def load_file(path: Path) -> tuple[dict[str, Any], dict[str, Tensor], Any] | None:
    """A BlinkDL RWKV-7 `.pth` -> (fla config dict, fla state dict, tokenizer), else None."""
    if path.suffix not in (".pth", ".pt"):
        return None
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(sd, dict) or not is_blinkdl_rwkv7(sd):
        return None
    config, fla = blinkdl_to_fla(sd)
    tok = world_tokenizer() if config["vocab_size"] == WORLD_VOCAB_SIZE else None
    return config, fla, tok


def random_blinkdl_state_dict(
    C: int, L: int, vocab: int, Dw: int, Da: int, Dv: int, Dg: int, ffn: int, seed: int = 0
) -> dict[str, Tensor]:
    """Random weights in BlinkDL `.pth` names and shapes (head size 64), scaled so every term of
    RWKV-7 matters: for tests and benchmarks against the `rwkv` package without downloads.

    Decays spread over the whole range (w0 ~ N(0, 2)), in-context rates and value-residual mixes
    away from 0 and 1, LoRA matrices non-zero, norms not identity.
    """
    g = torch.Generator().manual_seed(seed)

    def rn(*shape: int, s: float = 1.0, m: float = 0.0) -> Tensor:
        return m + s * torch.randn(*shape, generator=g)

    def ru(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g)

    H = C // 64
    sd = {
        "emb.weight": rn(vocab, C),
        "blocks.0.ln0.weight": rn(C, s=0.2, m=1.0),
        "blocks.0.ln0.bias": rn(C, s=0.1),
        "ln_out.weight": rn(C, s=0.2, m=1.0),
        "ln_out.bias": rn(C, s=0.1),
        "head.weight": rn(vocab, C, s=C**-0.5),
    }
    for i in range(L):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"] = rn(C, s=0.2, m=1.0)
            sd[b + ln + ".bias"] = rn(C, s=0.1)
        a = b + "att."
        for c in "rwkvag":
            sd[a + "x_" + c] = ru(1, 1, C)
        for c, D, s0 in (("w", Dw, 2.0), ("a", Da, 1.0), ("v", Dv, 1.0)):
            sd[a + c + "0"] = rn(1, 1, C, s=s0)
            sd[a + c + "1"] = rn(C, D, s=C**-0.5)
            sd[a + c + "2"] = rn(D, C, s=D**-0.5)
        sd[a + "g1"] = rn(C, Dg, s=C**-0.5)
        sd[a + "g2"] = rn(Dg, C, s=Dg**-0.5)
        sd[a + "k_k"] = rn(1, 1, C, s=0.3, m=0.8)
        sd[a + "k_a"] = rn(1, 1, C, s=0.3, m=1.0)
        sd[a + "r_k"] = rn(H, 64, s=0.1)
        for p in ("receptance", "key", "value", "output"):
            sd[a + p + ".weight"] = rn(C, C, s=C**-0.5)
        sd[a + "ln_x.weight"] = rn(C, s=0.2, m=1.0)
        sd[a + "ln_x.bias"] = rn(C, s=0.1)
        f = b + "ffn."
        sd[f + "x_k"] = ru(1, 1, C)
        sd[f + "key.weight"] = rn(ffn, C, s=C**-0.5)
        sd[f + "value.weight"] = rn(C, ffn, s=ffn**-0.5)
    return sd


FAMILY = register_family(
    Family(
        architecture="rwkv7",
        display="RWKV-7",
        model_types=("rwkv7", "rwkv7_fla"),
        config_from_hf=config_from_hf,
        convert_state_dict=convert_state_dict,
        config_from_weights=config_from_weights,
        build_block=build_block,
        build_final_norm=lambda cfg: LayerNorm(cfg.d_model, cfg.norm_eps),
        build_embed_norm=lambda cfg: (
            LayerNorm(cfg.d_model, cfg.norm_eps) if cfg.embed_norm else None
        ),
        detect=lambda config: "RWKV7ForCausalLM" in (config.get("architectures") or []),
        load_file=load_file,
        default_tokenizer=lambda config: (
            world_tokenizer() if config.get("vocab_size") == WORLD_VOCAB_SIZE else None
        ),
        checkpoints=(
            "RWKV/RWKV7-Goose-World3-1.5B-HF (1.5B)",
            "BlinkDL RWKV-x070 .pth files (the rwkv package's format)",
        ),
        layout="every block: LayerNorm + time mix (the recurrence), LayerNorm + channel mix",
        bridge="TransformerBridge wraps fla's RWKV-7 layer (needs fla and Triton; it could not "
        "run on CPU): block hooks only",
    )
)


# --------------------------------------------------------------------------- new models
def random_model(
    vocab_size: int,
    hidden_size: int,
    num_hidden_layers: int,
    head_dim: int = 64,
    lora_dim: int = 32,
    seed: int = 0,
):
    """A freshly initialised RWKV-7 `HookedRecurrentModel` (for training small models).

    LoRA down-projections get small random weights and up-projections zeros (so each LoRA starts
    at its bias), token-shift mixes and the bonus start at zero, norms at identity.
    """
    from hooked_recurrent.model import HookedRecurrentModel

    C = hidden_size
    cfg = RWKV7Config(
        architecture="rwkv7",
        n_layers=num_hidden_layers,
        d_model=C,
        d_vocab=vocab_size,
        layer_types=["recurrent"] * num_hidden_layers,
        n_heads=C // head_dim,
        d_k=head_dim,
        d_v=head_dim,
        d_mlp=4 * C,
        d_decay_lora=lora_dim,
        d_a_lora=lora_dim,
        d_v_lora=lora_dim,
        d_gate_lora=lora_dim,
        fuse_norm=False,
        embed_norm=True,
        tie_word_embeddings=False,
    )
    cfg.hf_config = fla_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = HookedRecurrentModel(cfg)
    with torch.no_grad():
        model.embed.weight.uniform_(-0.1, 0.1, generator=gen)
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("w1", "a1", "v1", "g1"):
                p.normal_(0.0, 0.1, generator=gen)
            elif leaf in ("w2", "a2", "v2"):
                p.zero_()
            elif leaf == "g2":
                p.normal_(0.0, 0.1, generator=gen)
            elif leaf == "w0":
                p.fill_(-1.0)  # decay exp(-0.6065 sigmoid(-1)) ~ 0.85: memory from the start
    return model


def fla_config(cfg: RWKV7Config) -> dict[str, Any]:
    """The fla-hub `config.json` of a model with this config."""
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "vocab_size": cfg.d_vocab,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": cfg.d_k,
        "num_heads": cfg.n_heads,
        "decay_low_rank_dim": cfg.d_decay_lora,
        "a_low_rank_dim": cfg.d_a_lora,
        "v_low_rank_dim": cfg.d_v_lora,
        "gate_low_rank_dim": cfg.d_gate_lora,
        "intermediate_size": cfg.d_mlp,
        "hidden_act": "sqrelu",
        "norm_first": cfg.embed_norm,
        "norm_bias": True,
        "norm_eps": cfg.norm_eps,
        "fuse_norm": cfg.fuse_norm,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "value_dim": [cfg.d_model] * cfg.n_layers,
        "attn": None,
        "torch_dtype": "float32",
    }


def save_fla(model: Any, out: Path | str) -> None:
    """Write `model` as an fla-hub folder (config.json + model.safetensors) that
    `from_pretrained` reads back."""
    import json

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    (out / "config.json").write_text(json.dumps(fla_config(model.cfg), indent=2))
    save_file(to_fla_state_dict(sd, model.cfg), str(out / "model.safetensors"))
