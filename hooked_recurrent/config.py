"""Model configuration: the fields every family shares (`HookedRecurrentConfig`); each family
subclasses it in its own `hooked_recurrent.pretrained` module (e.g. `Qwen35Config`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["HookedRecurrentConfig", "NotApplicableError"]


class NotApplicableError(AttributeError):
    """A TransformerLens attribute with no meaning for this model; the message says what to use.

    An `AttributeError`, so `getattr(obj, name, default)` and `hasattr` treat it as absent.
    """


@dataclass
class HookedRecurrentConfig:
    """What every `HookedRecurrentModel` knows about itself.

    Attributes:
        architecture: the family: `"qwen3_5"`, `"mamba2"` or `"rwkv7"`.
        n_layers: number of blocks.
        d_model: width of the residual stream.
        d_vocab: rows of the unembedding (logits width).
        layer_types: per block, `"recurrent"` (a matrix-state mixer) or `"attention"`.
        n_heads: number of state heads of a recurrent mixer (Qwen3.5: `linear_num_value_heads`).
        d_k: key side of one head's state (rows of S).
        d_v: value side of one head's state (columns of S).
        dtype: parameter dtype.
        model_name: the name or path the model was loaded from.
        hf_config: the source configuration, as a plain dict (for round trips and provenance).
    """

    architecture: str
    n_layers: int
    d_model: int
    d_vocab: int
    layer_types: list[str]
    n_heads: int
    d_k: int
    d_v: int
    dtype: torch.dtype = torch.float32
    model_name: str = ""
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (JSON-serialisable)."""
        d = asdict(self)
        d["dtype"] = str(self.dtype)
        return d

    @property
    def recurrent_layers(self) -> list[int]:
        """Indices of the blocks whose mixer has a matrix state."""
        return [i for i, t in enumerate(self.layer_types) if t == "recurrent"]

    # ------------------------------------------------------------------ TransformerLens fields
    # Read-only views of the fields TransformerLens's tools (ActivationCache, patching, utilities)
    # and users read; derived from the family and the source config, so nothing is duplicated.
    @property
    def attention_layers(self) -> list[int]:
        """Indices of the blocks whose mixer is softmax attention (Qwen3.5's full-attention)."""
        return [i for i, t in enumerate(self.layer_types) if t == "attention"]

    @property
    def d_head(self) -> int:
        """Width of one head's output (what `W_O` reads): the attention head size on Qwen3.5
        (`head_dim`), the state head's value side `d_v` on Mamba-2 and RWKV-7."""
        if self.architecture == "qwen3_5" and "head_dim" in self.hf_config:
            return int(self.hf_config["head_dim"])
        return self.d_v

    @property
    def n_key_value_heads(self) -> int | None:
        """Key/value heads of the softmax-attention layers (GQA), None when there are none."""
        if self.architecture == "qwen3_5":
            return int(self.hf_config.get("num_key_value_heads", self.n_heads))
        return None

    @property
    def n_ctx(self) -> int:
        """The trained context length (Qwen3.5's `max_position_embeddings`).

        Mamba-2 and RWKV-7 have no context window (the state carries any length): they raise
        `NotApplicableError`."""
        if "max_position_embeddings" in self.hf_config:
            return int(self.hf_config["max_position_embeddings"])
        raise NotApplicableError(
            f"{self.architecture} has no context window: its recurrent state carries any number "
            "of tokens (use RecurrentState to continue a sequence)"
        )

    @property
    def device(self) -> torch.device:
        """Where the parameters are; kept current by `model.to(...)`."""
        return getattr(self, "_device", torch.device("cpu"))

    @property
    def d_mlp(self) -> int | None:
        """Hidden width of the MLPs; None on Mamba-1/2 (no MLPs: `attn_only` is True)."""
        if self.attn_only:
            return None
        return int(self.hf_config["intermediate_size"])

    @property
    def attn_only(self) -> bool:
        """True when blocks have no MLP (Mamba-1, Falcon-Mamba, Mamba-2): TransformerLens then
        skips `mlp_out`."""
        return self.architecture in ("mamba", "falcon_mamba", "mamba2")

    @property
    def gated_mlp(self) -> bool:
        """True for Qwen3.5's SwiGLU MLP (it has `W_gate`)."""
        return self.architecture == "qwen3_5"

    @property
    def act_fn(self) -> str | None:
        """The MLP activation: "silu" (Qwen3.5, gated), "relu_squared" (RWKV-7), None (Mamba-2)."""
        return {"qwen3_5": "silu", "rwkv7": "relu_squared"}.get(self.architecture)

    @property
    def normalization_type(self) -> str:
        """ "RMS" (Qwen3.5, Mamba-2) or "LN" (RWKV-7), with weights (not folded, see the docs)."""
        return "LN" if self.architecture == "rwkv7" else "RMS"

    @property
    def final_rms(self) -> bool:
        """Whether the final norm is an RMSNorm."""
        return self.normalization_type == "RMS"

    @property
    def positional_embedding_type(self) -> str:
        """ "rotary" (Qwen3.5's attention layers) or "none" (position lives in the recurrence)."""
        return "rotary" if self.architecture == "qwen3_5" else "none"

    @property
    def default_prepend_bos(self) -> bool:
        """False: none of the families was trained with a BOS token in front (as Qwen in TL)."""
        return False

    @property
    def tokenizer_name(self) -> str:
        """The name or path the tokenizer was loaded from (the model's)."""
        return self.model_name

    @property
    def original_architecture(self) -> str:
        """The family, as TransformerLens names this field."""
        return self.architecture

    @property
    def d_vocab_out(self) -> int:
        """Width of the logits (= `d_vocab`)."""
        return self.d_vocab

    @property
    def n_devices(self) -> int:
        """1: the model is not split across devices."""
        return 1

    @property
    def use_attn_result(self) -> bool:
        """False: per-head results are computed from `hook_z` by `ActivationCache`."""
        return False


class SwiGLU:
    """Mixin for the configs of families whose MLPs (and experts) are SwiGLU: TransformerLens's
    `gated_mlp` is True and `act_fn` is "silu". List it before the config base class."""

    @property
    def gated_mlp(self) -> bool:
        """True: the MLPs (and experts) are SwiGLU."""
        return True

    @property
    def act_fn(self) -> str:
        """ "silu", the SwiGLU's activation."""
        return "silu"
