"""What the evaluations share: the SAE's cell, its codes on a clean run, KL, repeated states."""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor

from writesae.activations import write_factor_hooks, write_factors
from writesae.protocols import ModelLike, SAELike

__all__ = ["check_model", "sae_layer", "kl", "sae_codes"]


def check_model(model: ModelLike, sae: object, allow_other_model: bool) -> None:
    """`sae.check_model` for an SAE and a model with a config (not for bare directions or the
    read-out stubs of the tests, which have neither a config nor a fingerprint)."""
    check = getattr(sae, "check_model", None)
    if check is not None and getattr(model, "cfg", None) is not None:
        check(model, allow_other_model=allow_other_model)


def sae_layer(sae: SAELike) -> int:
    """The layer of the SAE's hook (``blocks.{layer}.attn.hook_...``)."""
    return int(sae.cfg.hook_prefix.split(".")[1])


def kl(p_log: Float[Tensor, "... vocab"], q_log: Float[Tensor, "... vocab"]) -> Tensor:
    """KL(p || q) from log-probabilities, over the last axis."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def sae_codes(
    model: ModelLike, sae: SAELike, tokens: Int[Tensor, "batch pos"], layer: int, head: int
) -> Float[Tensor, "batch pos n_atoms"]:
    """SAE codes of the clean run, from the SAE's own input kind: the head's state, or its write
    from the write's factors (:func:`writesae.activations.write_factors`)."""
    dtype = sae.b_enc.dtype
    if sae.cfg.input_kind == "state":
        name = f"blocks.{layer}.attn.hook_state"
        _, cache = model.run_with_cache(tokens, names_filter=[name])
        return sae.encode(cache[name][:, :, head].to(dtype))
    _, cache = model.run_with_cache(tokens, names_filter=write_factor_hooks(model, layer))
    key, value = write_factors(model, cache, layer, head)
    return sae.encode_factors(key.to(dtype), value)
