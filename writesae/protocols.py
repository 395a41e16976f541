"""What `writesae` needs from the objects passed to it: a model, a hook point, an SAE.

These are structural types (`typing.Protocol`): any object with these members qualifies, such as
a `hooked_recurrent.HookedRecurrentModel`, a `transformer_lens.HookedRootModule` built the same
way, a `hooked_recurrent` hook point, or any SAE kind of `writesae.saes`. They state what an
evaluation or an intervention reads, so a reader does not have to chase `Any`. The ones marked
`runtime_checkable` can be checked with `isinstance`, which tests only for the members' names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from writesae.config import WriteSAEConfig

__all__ = [
    "ModelLike",
    "ConfiguredModelLike",
    "ReadoutModelLike",
    "HookLike",
    "PositionedHookLike",
    "CacheLike",
    "MixerLike",
    "TextModelLike",
    "UnembedLike",
    "SAELike",
    "RankOneSAELike",
]


@runtime_checkable
class HookLike(Protocol):
    """A hook point as a hook function sees it.

    `writesae`'s hooks also read, where the hook point has them, `positions` (absolute token
    positions of the pos axis) and `native_state(head)` (the state the unedited write would give).
    """

    name: str | None


@runtime_checkable
class PositionedHookLike(HookLike, Protocol):
    """A :class:`HookLike` that has ``positions`` (absolute token positions of the pos axis)."""

    positions: Tensor


@runtime_checkable
class CacheLike(Protocol):
    """Activations by hook name (a `HookedRecurrentCache`, a TransformerLens `ActivationCache`)."""

    def __getitem__(self, name: str) -> Tensor:
        """The activation of hook `name`."""
        ...


class MixerLike(Protocol):
    """A recurrent layer's mixer (`model.blocks[l].attn`), as the evaluations read it."""

    n_heads: int

    def head_output_weight(self, head: int) -> Float[Tensor, "d_model d_v"]:
        """The output projection of one head, ``W_O`` [d_model, d_v]."""
        ...

    def transition_from_cache(self, cache: CacheLike, head: int) -> Any:
        """One head's state transitions ``[batch, pos, ...]`` read from a run's cache."""
        ...


@runtime_checkable
class ModelLike(Protocol):
    """A hooked model: named hook points, hooked runs, and ``blocks[l].attn``, layer ``l``'s
    mixer (a `HookedRecurrentModel`, or a `HookedRootModule` built the same way)."""

    blocks: nn.ModuleList

    @property
    def hook_dict(self) -> Mapping[str, nn.Module]:
        """Every hook point by name."""
        ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any:
        """A forward pass with the given ``fwd_hooks`` attached for that pass only."""
        ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any:
        """A forward pass that also returns the activations of the hooks (a cache)."""
        ...

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The forward pass (its signature says whether the model takes a ``state``)."""
        ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """A forward pass (``nn.Module.__call__``)."""
        ...


@runtime_checkable
class TextModelLike(ModelLike, Protocol):
    """A :class:`ModelLike` with a tokenizer (possibly None), text conversion and generation
    (a `HookedRecurrentModel`): what reading texts, showing contexts and installing need."""

    tokenizer: Any

    def to_tokens(self, *args: Any, **kwargs: Any) -> Tensor:
        """Token ids of a text."""
        ...

    def to_string(self, *args: Any, **kwargs: Any) -> Any:
        """The text of token ids."""
        ...

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Sampled or greedy continuations of prompts."""
        ...


@runtime_checkable
class ConfiguredModelLike(ModelLike, Protocol):
    """A :class:`ModelLike` with a config: ``cfg`` carries ``d_k``, ``d_v``, ``n_heads``,
    ``n_layers`` and ``layer_types`` (and, for a `HookedRecurrentModel`, ``recurrent_layers``)."""

    cfg: Any


@runtime_checkable
class UnembedLike(Protocol):
    """An unembedding layer: ``weight`` [vocab, d_model]."""

    @property
    def weight(self) -> Tensor:
        """The unembedding matrix ``W_U`` [vocab, d_model]."""
        ...


@runtime_checkable
class ReadoutModelLike(ModelLike, Protocol):
    """A :class:`ModelLike` with an unembedding ``unembed`` (``unembed.weight`` [vocab,
    d_model]): what the closed-form and install evaluations read logits through."""

    @property
    def unembed(self) -> UnembedLike:
        """The unembedding (``weight`` [vocab, d_model])."""
        ...


@runtime_checkable
class SAELike(Protocol):
    """An SAE on one head's state or write matrices, as the interventions and evaluations use it.

    Every SAE kind of `writesae.saes` (subclasses of `BaseSAE`) has these members.
    """

    cfg: WriteSAEConfig
    b_enc: torch.nn.Parameter

    def encode(self, x: Float[Tensor, "... d_k d_v"]) -> Float[Tensor, "... n_atoms"]:
        """Sparse codes of state or write matrices."""
        ...

    def encode_factors(
        self, key: Float[Tensor, "... d_k"], value: Float[Tensor, "... d_v"]
    ) -> Float[Tensor, "... n_atoms"]:
        """Sparse codes of rank-1 inputs ``key value^T`` given by their factors."""
        ...

    def atom_matrices(self, idx: Int[Tensor, "..."]) -> Float[Tensor, "... d_k d_v"]:
        """Decoder atoms as ``d_k x d_v`` matrices."""
        ...

    def decode_sparse(
        self, values: Float[Tensor, "... m"], indices: Int[Tensor, "... m"], bias: bool = True
    ) -> Float[Tensor, "... d_k d_v"]:
        """Reconstruction from a short list of atoms and their codes."""
        ...


@runtime_checkable
class RankOneSAELike(SAELike, Protocol):
    """An :class:`SAELike` whose atoms are rank-1, ``u_i w_i^T`` (a `WriteSAE`): what the closed
    form needs."""

    @property
    def key_factors(self) -> Float[Tensor, "n_atoms d_k"]:
        """Key-side factors ``u_i`` (rows)."""
        ...

    @property
    def value_factors(self) -> Float[Tensor, "n_atoms d_v"]:
        """Value-side factors ``w_i`` (rows)."""
        ...
