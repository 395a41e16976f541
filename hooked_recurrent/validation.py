"""Checks of the arguments of `HookedRecurrentModel`'s public methods, at the API boundary.

Each check raises a `TypeError` (wrong kind of value) or `ValueError` (right kind, wrong value)
that names the argument, the value and what is accepted, before any work, instead of an error
from deep inside torch. They are cheap: a token tensor is checked with one min/max reduction.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_tokens",
    "check_text",
    "check_forward_input",
    "check_state",
    "check_generate_args",
    "check_load_args",
    "model_fingerprint",
]

#: state keys every layer carries, per architecture and layer type (others may come with them,
#: e.g. the native state `S_native` after a state edit)
_STATE_KEYS = {
    ("qwen3_5", "recurrent"): {"S", "conv"},
    ("qwen3_5", "attention"): {"k", "v"},
    ("qwen3_5_moe", "recurrent"): {"S", "conv"},
    ("qwen3_5_moe", "attention"): {"k", "v"},
    ("qwen3_next", "recurrent"): {"S", "conv"},
    ("qwen3_next", "attention"): {"k", "v"},
    ("olmo_hybrid", "recurrent"): {"S", "conv"},
    ("olmo_hybrid", "attention"): {"k", "v"},
    ("mamba2", "recurrent"): {"S", "conv"},
    ("mamba", "recurrent"): {"S", "conv"},
    ("falcon_mamba", "recurrent"): {"S", "conv"},
    ("rwkv7", "recurrent"): {"S", "shift", "mlp_shift"},
    ("bamba", "recurrent"): {"S", "conv"},
    ("bamba", "attention"): {"k", "v"},
    ("nemotron_h", "recurrent"): {"S", "conv"},
    ("nemotron_h", "attention"): {"k", "v"},
    ("falcon_h1", "recurrent"): {"S", "conv", "k", "v"},  # Mamba-2 and attention in parallel
    ("granitemoehybrid", "recurrent"): {"S", "conv"},
    ("granitemoehybrid", "attention"): {"k", "v"},
    ("jamba", "recurrent"): {"S", "conv"},
    ("jamba", "attention"): {"k", "v"},
    ("zamba2", "recurrent"): {"S", "conv"},  # the hybrid layers also carry "k", "v"
    ("xlstm", "recurrent"): {"S", "m"},  # the stabilised state and the stabiliser m [b, head]
}

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_text(input: Any, name: str = "input") -> None:
    """A text or a non-empty list of non-empty texts (what `to_tokens` accepts)."""
    if isinstance(input, str):
        if not input:
            raise ValueError(f"{name} is an empty string; give at least one token of text")
        return
    if not isinstance(input, list | tuple):
        raise TypeError(
            f"{name} must be a str or a list of str, not {type(input).__name__}; token ids go "
            "straight to the model as an int64 tensor [batch, pos]"
        )
    if len(input) == 0:
        raise ValueError(f"{name} is an empty list; give at least one text")
    for i, t in enumerate(input):
        if not isinstance(t, str):
            hint = (
                "; for token ids pass torch.tensor([[...]]) of shape [batch, pos]"
                if _is_int(t)
                else ""
            )
            raise TypeError(
                f"{name}[{i}] is a {type(t).__name__} ({t!r:.40}); expected a list of str{hint}"
            )
        if not t:
            raise ValueError(f"{name}[{i}] is an empty string; every text needs a token")


def check_tokens(model: Any, tokens: Any, name: str = "input") -> None:
    """Token ids: an integer tensor `[batch, pos]`, batch and pos >= 1, ids in `[0, d_vocab)`."""
    if not isinstance(tokens, Tensor):
        raise TypeError(
            f"{name} must be text or an int64 tensor of token ids [batch, pos], not "
            f"{type(tokens).__name__}"
        )
    if tokens.dtype not in _INT_DTYPES:
        raise TypeError(
            f"{name} has dtype {tokens.dtype}; token ids must be an integer tensor (torch.long), "
            "not float or bool"
        )
    if tokens.dim() != 2:
        raise ValueError(f"expected tokens of shape [batch, pos], got {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(
            f"{name} has shape {tuple(tokens.shape)}: an empty input; batch and pos must be >= 1"
        )
    lo_t, hi_t = torch.aminmax(tokens)
    lo, hi = int(lo_t), int(hi_t)
    vocab = model.cfg.d_vocab
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{name} has token id {bad}; ids must be in [0, {vocab}) (the model's d_vocab)"
        )


def check_state(model: Any, state: Any, batch: int | None = None) -> None:
    """A `RecurrentState` of this model (layer count, keys and state shapes) and batch size."""
    from hooked_recurrent.state import RecurrentState

    if state is None:
        return
    if not isinstance(state, RecurrentState):
        raise TypeError(
            f"state must be a RecurrentState (from forward(..., return_state=True)), not "
            f"{type(state).__name__}"
        )
    cfg = model.cfg
    if not _is_int(state.offset) or state.offset < 0:
        raise ValueError(f"state.offset={state.offset!r}; expected an int >= 0")
    if len(state.layers) != cfg.n_layers:
        raise ValueError(
            f"state has {len(state.layers)} layers but the model has {cfg.n_layers}: a state from "
            "another model"
        )
    for layer, (kind, d) in enumerate(zip(cfg.layer_types, state.layers, strict=True)):
        want = _STATE_KEYS.get((cfg.architecture, kind))
        if want is not None and not want <= set(d):
            raise ValueError(
                f"state.layers[{layer}] has keys {sorted(d)} but a {cfg.architecture} {kind} layer "
                f"needs {sorted(want)}: a state from another model"
            )
        if kind == "recurrent" and "S" in d:
            shape = tuple(d["S"].shape[1:])
            if shape != (cfg.n_heads, cfg.d_k, cfg.d_v):
                raise ValueError(
                    f"state.layers[{layer}]['S'] has shape {tuple(d['S'].shape)}; this model needs "
                    f"[batch, {cfg.n_heads}, {cfg.d_k}, {cfg.d_v}]: a state from another model"
                )
    if batch is not None and state.batch_size not in (0, batch):
        raise ValueError(f"state has batch size {state.batch_size} but tokens have {batch}")


def check_forward_input(model: Any, input: Any, state: Any = None, return_type: Any = None) -> None:
    """What `forward` accepts: text, a list of texts, or token ids; an optional state; and a
    next-token loss only for inputs of at least 2 tokens."""
    if isinstance(input, str | list):
        check_text(input)
        batch = 1 if isinstance(input, str) else len(input)
    else:
        check_tokens(model, input)
        batch = input.shape[0]
        if return_type in ("loss", "both") and input.shape[1] < 2:
            raise ValueError(
                f"return_type={return_type!r} needs at least 2 tokens per row (the loss predicts "
                f"token t+1 from token t); input has shape {tuple(input.shape)}"
            )
    if return_type not in ("logits", "loss", "both", None):
        raise ValueError(
            f"return_type must be 'logits', 'loss', 'both' or None, not {return_type!r}"
        )
    check_state(model, state, batch)


def check_generate_args(
    model: Any,
    max_new_tokens: Any,
    do_sample: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    eos_token_id: Any,
    return_type: Any,
    seed: Any,
) -> None:
    """The sampling arguments of `generate`."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise _type_or_value(max_new_tokens, "max_new_tokens", "an int >= 0")
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample={do_sample!r}; expected True or False")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise _type_or_value(temperature, "temperature", "a finite number >= 0", number=True)
    vocab = model.cfg.d_vocab
    if top_k is not None and (not _is_int(top_k) or not 1 <= top_k <= vocab):
        raise _type_or_value(top_k, "top_k", f"None or an int in [1, {vocab}]")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1
    ):
        raise _type_or_value(top_p, "top_p", "None or a number in (0, 1]", number=True)
    if eos_token_id is not None and (not _is_int(eos_token_id) or not 0 <= eos_token_id < vocab):
        raise _type_or_value(eos_token_id, "eos_token_id", f"None or an int in [0, {vocab})")
    if return_type not in ("str", "tokens", "input"):
        raise ValueError(f"return_type={return_type!r}; expected 'str', 'tokens' or 'input'")
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed={seed!r}; expected None or an int")


def _type_or_value(value: Any, name: str, accepted: str, number: bool = False) -> Exception:
    ok_type = isinstance(value, int | float) if number else _is_int(value)
    cls = ValueError if ok_type and not isinstance(value, bool) else TypeError
    return cls(f"{name}={value!r}; expected {accepted}")


def check_load_args(dtype: Any, device: Any) -> None:
    """`from_pretrained`'s dtype (a floating torch.dtype) and device (a valid torch device)."""
    if not isinstance(dtype, torch.dtype):
        hint = f" (e.g. torch.{dtype})" if isinstance(dtype, str) and hasattr(torch, dtype) else ""
        raise TypeError(f"dtype={dtype!r}; expected a torch.dtype{hint}, not a string")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype}; expected a floating dtype (float32, bfloat16, ...)")
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device={device!r}; expected a str or torch.device such as 'cpu'")
    try:
        torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is not a device ({e}); e.g. 'cpu', 'cuda:0'") from e


def model_fingerprint(model: Any) -> str:
    """A short hash of a model's weights: names, shapes and a fixed sample of the values.

    Values are rounded to bfloat16 first, so the same checkpoint loaded in float32 or bfloat16
    gets the same fingerprint. Cost: a few hundred elements per tensor.
    """
    h = hashlib.sha256(str(getattr(model.cfg, "architecture", "")).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)};".encode())
            if not t.is_floating_point() or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            sample = flat[::step][:256].to("cpu", torch.bfloat16).float()
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
