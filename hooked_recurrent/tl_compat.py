"""What a TransformerLens user reaches for: weights, token helpers, `loss_fn`, a cache whose
analysis methods add up on every family, and activation patching of the recurrent state and write.

`TLCompatMixin` is mixed into `HookedRecurrentModel`; `HookedRecurrentCache` is what
`run_with_cache` returns (a `transformer_lens.ActivationCache`).

Conventions that differ from a TransformerLens `HookedTransformer` (see docs/migrating.md):

* Norms are not folded (as `from_pretrained_no_processing`): `apply_ln_to_stack` applies the norm
  of the target layer with its cached scale *and its weight*, i.e. what each component contributes
  to that norm's output. The norm's bias (RWKV-7's LayerNorm only) belongs to no component:
  `decompose_resid(apply_ln=True).sum(0) + model.ln_final.b == cache["ln_final.hook_normalized"]`,
  and on the RMS families (no bias) the sum is the normalized residual itself.
* The first residual component (`"embed"`) is `blocks.0.hook_resid_pre`: the embedding on Qwen3.5
  and Mamba-2, the embedding after RWKV-7's `ln0` on RWKV-7, so `embed + sum(attn_out + mlp_out)`
  is the final residual on every family.
* Per-head results are `hook_z[h] @ W_O[h]` for every mixer. On the recurrent mixers `hook_z` is
  what the output projection reads (after the read's norm and gate); on Qwen3.5's gated attention
  `hook_z` is the softmax output before the sigmoid gate, so the result there is
  `(z * sigmoid(gate))[h] @ W_O[h]`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice

from hooked_recurrent.config import NotApplicableError

__all__ = [
    "HookedRecurrentCache",
    "TLCompatMixin",
    "get_act_patch_state_by_head_pos",
    "get_act_patch_write_by_head_pos",
]

#: hook names of the mixers that TransformerLens's `get_act_name` places at `blocks.{l}.hook_X`
_MIXER_HOOKS = (
    "write",
    "state",
    "read",
    "beta",
    "decay",
    "dt",
    "a",
    "kappa",
    "gate",
    "out",
    "ssm_write",
    "ssm_state",
)


def _attn_result_input(cache: ActivationCache, model: Any, layer: int) -> Tensor:
    """What `W_O` of block `layer` reads, per head `[..., head, d_head]` (see the module doc)."""
    z = cache[f"blocks.{layer}.attn.hook_z"]
    if getattr(model.blocks[layer].attn, "gated", False):
        z = z * torch.sigmoid(cache[f"blocks.{layer}.attn.hook_gate"])
    return z


def _mixer_W_O(mixer: Any) -> Float[Tensor, "head d_head d_model"]:
    return mixer.W_O


class HookedRecurrentCache(ActivationCache):
    """`transformer_lens.ActivationCache` with the analysis methods made exact on these families.

    Everything of `ActivationCache` works (`accumulated_resid`, `logit_lens`, `logit_attrs`,
    `stack_neuron_results`, ...); the methods below are the ones whose TransformerLens version
    assumes a model these families are not (see the module docstring for the conventions).
    Shorthand keys also reach the recurrent hooks: `cache["write", 1]` is
    `cache["blocks.1.attn.hook_write"]`.
    """

    def __getitem__(self, key: Any) -> Tensor:
        """`cache[name]`, `cache["resid_pre", 0]`, `cache["scale", 1, "ln1"]`,
        `cache["write", 1]`."""
        try:
            return super().__getitem__(key)
        except KeyError:
            if isinstance(key, tuple) and key and key[0] in _MIXER_HOOKS and len(key) >= 2:
                layer = key[1] if key[1] >= 0 else self.model.cfg.n_layers + key[1]
                name = key[0].removeprefix("ssm_")
                return self.cache_dict[f"blocks.{layer}.attn.hook_{name}"]
            if isinstance(key, str):
                m = re.fullmatch(r"blocks\.(\d+)\.attn\.hook_ssm_(write|state)", key)
                if m:
                    return self.cache_dict[f"blocks.{m[1]}.attn.hook_{m[2]}"]
            raise

    def apply_ln_to_stack(
        self,
        residual_stack: Float[Tensor, "num_components *batch_and_pos_dims d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: Slice | Any = None,
        batch_slice: Slice | Any = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> Float[Tensor, "num_components *batch_and_pos_dims_out d_model"]:
        """Each component's contribution to the output of the norm before `layer` (`n_layers`:
        `ln_final`; `mlp_input`: `ln2`), with the norm's cached scale and its weight (not its
        bias). `recompute_ln=True` at the final layer applies `ln_final` to each component whole
        (the logit lens), as in TransformerLens.
        """
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        if recompute_ln and layer == self.model.cfg.n_layers:
            return super().apply_ln_to_stack(
                residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, True
            )
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        if not isinstance(batch_slice, Slice):
            batch_slice = Slice(batch_slice)
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if layer == self.model.cfg.n_layers:
            norm = self.model.ln_final
        else:
            block = self.model.blocks[layer]
            norm = block.ln2 if mlp_input else block.ln1
        if self.model.cfg.normalization_type == "LN":
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        scale = self._get_cached_ln_scale(layer, mlp_input, pos_slice, batch_slice)
        w = norm.w.to(residual_stack.dtype)
        if getattr(norm, "zero_centred", False):
            w = 1.0 + w
        return residual_stack / scale * w

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all",
        apply_ln: bool = False,
        pos_slice: Slice | Any = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Any:
        """The residual stream before `layer` as a stack of `embed` (`blocks.0.hook_resid_pre`:
        after RWKV-7's `ln0`), then each block's `attn_out` and `mlp_out`; sums to
        `resid_pre` of `layer` (the final residual by default). Arguments as in TransformerLens.
        """
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        n_layers = self.model.cfg.n_layers
        if layer is None or layer == -1:
            layer = n_layers
        incl_attn = mode != "mlp"
        incl_mlp = mode != "attn" and not self.model.cfg.attn_only
        comps: list[Tensor] = []
        labels: list[str] = []
        if incl_embeds:
            comps.append(self["blocks.0.hook_resid_pre"])
            labels.append("embed")
        for l in range(layer):
            if incl_attn:
                comps.append(self[("attn_out", l)])
                labels.append(f"{l}_attn_out")
            if incl_mlp:
                comps.append(self[("mlp_out", l)])
                labels.append(f"{l}_mlp_out")
        if mlp_input and incl_attn:
            comps.append(self[("attn_out", layer)])
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([pos_slice.apply(c, dim=-2) for c in comps], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Fill `blocks.{l}.attn.hook_result` `[..., head, d_model]` (each head's share of
        `hook_out`; `hook_z` must be cached, and on attention layers `hook_gate`)."""
        for l in range(self.model.cfg.n_layers):
            key = f"blocks.{l}.attn.hook_result"
            if key in self.cache_dict:
                continue
            z = _attn_result_input(self, self.model, l)
            W_O = _mixer_W_O(self.model.blocks[l].attn).to(z.dtype)
            self.cache_dict[key] = torch.einsum("...hd,hdm->...hm", z, W_O)

    def _ensure_head_results(self) -> bool:
        self.compute_head_results()
        return True

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Slice | Any = None,
        apply_ln: bool = False,
    ) -> Any:
        """Every head's output through `W_O` for the blocks before `layer`, `[component, ...,
        d_model]`, labelled `L{l}H{h}` (a recurrent mixer's heads are its state heads; the number
        of heads may differ between layers). `incl_remainder` adds the rest of the residual
        (embedding, MLPs, output biases), so the stack sums to `resid_pre` of `layer`.
        """
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        n_layers = self.model.cfg.n_layers
        if layer is None or layer == -1:
            layer = n_layers
        self.compute_head_results()
        comps: list[Tensor] = []
        labels: list[str] = []
        for l in range(layer):
            r = pos_slice.apply(self[f"blocks.{l}.attn.hook_result"], dim=-3)
            comps.append(r.movedim(-2, 0))
            labels.extend(f"L{l}H{h}" for h in range(r.shape[-2]))
        resid = (
            pos_slice.apply(self[f"blocks.{layer}.hook_resid_pre"], dim=-2)
            if layer < (n_layers)
            else pos_slice.apply(self[("resid_post", n_layers - 1)], dim=-2)
        )
        stack = torch.cat(comps, 0) if comps else resid.new_zeros(0, *resid.shape)
        if incl_remainder:
            stack = torch.cat([stack, (resid - stack.sum(0))[None]], 0)
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_activation(
        self,
        activation_name: str,
        layer: int = -1,
        sublayer_type: str | None = None,
        return_layers: bool = False,
    ) -> Any:
        """Stack an activation over the blocks before `layer` that have it (Qwen3.5's attention
        layer has no `read`, say, and is skipped); `return_layers=True` also returns their
        indices."""
        from transformer_lens.utilities import get_act_name

        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        comps, layers = [], []
        for l in range(layer):
            name = get_act_name(activation_name, l, sublayer_type)
            if name not in self.cache_dict and activation_name in _MIXER_HOOKS:
                name = f"blocks.{l}.attn.hook_{activation_name.removeprefix('ssm_')}"
            if name in self.cache_dict:
                comps.append(self.cache_dict[name])
                layers.append(l)
        if not comps:
            raise KeyError(f"no block before {layer} has {activation_name!r} in this cache")
        stack = torch.stack(comps, 0)
        return (stack, layers) if return_layers else stack


class _Stacked:
    """A read-only attribute: the weight `name` of every softmax-attention layer (`stack` is
    "_attention_stack") or every MLP ("_mlp_stack"), stacked by the model's method `stack`."""

    def __init__(self, stack: str, name: str) -> None:
        self.stack, self.name = stack, name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Stacked: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Tensor: ...
    def __get__(self, obj: object, owner: type | None = None) -> _Stacked | Tensor:
        return self if obj is None else getattr(obj, self.stack)(self.name)

    def __set__(self, obj: object, value: object) -> None:
        raise AttributeError(f"{self.name} is read-only (it stacks the layers' weights)")


class TLCompatMixin:
    """TransformerLens's `HookedTransformer` attributes that `HookedRecurrentModel` adds.

    Weights in TransformerLens layout (`[d_in, d_out]`, heads first), token helpers and `loss_fn`.
    The stacked attention weights `W_Q`, `W_K`, `W_V`, `W_O` stack the layers listed in
    `cfg.attention_layers` on Qwen3.5 (its softmax-attention layers); on Mamba-2 and RWKV-7,
    whose every layer is a recurrent mixer, `W_O` stacks every layer's output projection and
    `W_Q`/`W_K`/`W_V` raise `NotApplicableError`.
    """

    cfg: Any
    blocks: Any
    tokenizer: Any

    def __getattr__(self, name: str) -> Any:
        # a property (or _Stacked) that raises AttributeError (NotApplicableError) sends Python to
        # nn.Module.__getattr__, whose generic message would hide ours: raise ours again
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            prop = getattr(type(self), name, None)
            if isinstance(prop, property) and prop.fget is not None:
                prop.fget(self)
            if isinstance(prop, _Stacked):
                prop.__get__(self, type(self))
            raise

    # ------------------------------------------------------------------ dtype / device
    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        out = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        w = self.embed.weight  # type: ignore[attr-defined]
        self.cfg.dtype = w.dtype
        self.cfg._device = w.device
        return out

    # ------------------------------------------------------------------ weights
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The token embedding."""
        return self.embed.weight  # type: ignore[attr-defined]

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding: `logits = ln_final(resid) @ W_U + b_U`, then the family's
        `logit_transform` where it has one (xLSTM's soft cap)."""
        return self.unembed.weight.T  # type: ignore[attr-defined]

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """The unembedding bias (zeros: none of the families has one)."""
        w = self.unembed.weight  # type: ignore[attr-defined]
        return torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)

    @property
    def W_pos(self) -> Tensor:
        """Not applicable: no family has learned positional embeddings."""
        raise NotApplicableError(
            "these models have no positional embedding matrix: Qwen3.5 rotates q and k in its "
            "attention layers (hook_rot_q / hook_rot_k), and Mamba-2 and RWKV-7 carry position "
            "in the recurrent state"
        )

    def _attention_stack(self, which: str) -> Tensor:
        if not self.cfg.attention_layers:
            raise NotApplicableError(
                f"{self.cfg.architecture} has no softmax attention, so no {which}; the recurrent "
                f"mixers' projections are at model.blocks[l].attn (see the hook reference); "
                "W_O (every layer's output projection) is model.W_O"
            )
        return torch.stack([getattr(self.blocks[l].attn, which) for l in self.cfg.attention_layers])

    W_Q = _Stacked("_attention_stack", "W_Q")
    """Query weights of the softmax-attention layers (`cfg.attention_layers`), before q-norm and
    RoPE (Qwen3.5's gate rows are in `W_gate_attn`): `[attn_layer, head, d_model, d_head]`."""
    W_K = _Stacked("_attention_stack", "W_K")
    """Key weights of the softmax-attention layers, repeated over query heads (GQA):
    `[attn_layer, head, d_model, d_head]`."""
    W_V = _Stacked("_attention_stack", "W_V")
    """Value weights of the softmax-attention layers, repeated over query heads (GQA):
    `[attn_layer, head, d_model, d_head]`."""

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        """Output projections per head: of the attention layers on Qwen3.5, of every layer
        (the recurrent mixers') on Mamba-2 and RWKV-7."""
        if self.cfg.attention_layers:
            return self._attention_stack("W_O")
        return torch.stack([_mixer_W_O(b.attn) for b in self.blocks])

    def _mlp_stack(self, name: str) -> Tensor:
        if self.cfg.attn_only:
            raise NotApplicableError(f"{self.cfg.architecture} blocks have no MLP, so no {name}")
        if any(not hasattr(b.mlp, name) for b in self.blocks):
            raise NotApplicableError(
                f"{self.cfg.architecture} has sparse MoE MLPs: the experts' {name} are "
                f"model.blocks[l].mlp.experts.{name} [expert, out, in], per layer"
            )
        return torch.stack([getattr(b.mlp, name).weight.T for b in self.blocks])

    W_in = _Stacked("_mlp_stack", "W_in")
    """MLP input weights (Qwen3.5: the linear branch; RWKV-7: the key projection):
    `[layer, d_model, d_mlp]`."""

    @property
    def W_gate(self) -> Float[Tensor, "layer d_model d_mlp"]:
        """MLP gate weights (Qwen3.5's SwiGLU only)."""
        if not self.cfg.gated_mlp:
            raise NotApplicableError(f"{self.cfg.architecture} has no gated MLP, so no W_gate")
        return self._mlp_stack("W_gate")

    W_out = _Stacked("_mlp_stack", "W_out")
    """MLP output weights: `[layer, d_mlp, d_model]`."""

    @property
    def W_gate_attn(self) -> Float[Tensor, "attn_layer head d_model d_head"]:
        """Qwen3.5 gated attention's output-gate weights (out = W_O(z * sigmoid(x W_gate_attn)))."""
        if (
            not self.cfg.attention_layers
            or not self.blocks[self.cfg.attention_layers[0]].attn.gated
        ):
            raise NotApplicableError("only Qwen-family attention layers have an output gate")
        return self._attention_stack("W_gate")

    # ------------------------------------------------------------------ tokens
    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (raises if it is not)."""
        ids = self._need_tokenizer().encode(string, add_special_tokens=False)  # type: ignore[attr-defined]
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one: {ids}")
        return int(ids[0])

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id."""
        return self._need_tokenizer().decode([int(int_token)])  # type: ignore[attr-defined]

    def get_token_position(
        self,
        single_token: str | int,
        input: str | Int[Tensor, " pos"] | Int[Tensor, "1 pos"],
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
    ) -> int:
        """Position of `single_token` (a string of one token, or an id) in `input` (text or
        tokens `[pos]` / `[1, pos]`): its first occurrence, or its last with `mode="last"`."""
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos)  # type: ignore[attr-defined]
        else:
            tokens = input
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(
                    f"get_token_position needs one sequence, got {tuple(tokens.shape)}"
                )
            tokens = tokens[0]
        tok = self.to_single_token(single_token) if isinstance(single_token, str) else single_token
        where = (tokens == tok).nonzero()[:, 0]
        if len(where) == 0:
            raise ValueError(f"token {single_token!r} ({tok}) is not in the input")
        return int(where[0] if mode == "first" else where[-1])

    def tokens_to_residual_directions(
        self, tokens: str | int | Int[Tensor, "..."]
    ) -> Float[Tensor, "... d_model"]:
        """The unembedding column of each token (`W_U[:, token]`), for direct logit attribution
        on a stack that went through `apply_ln_to_stack`."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        return self.W_U[:, tokens.to(self.W_U.device)].movedim(0, -1)

    # ------------------------------------------------------------------ loss
    def loss_fn(
        self,
        logits: Float[Tensor, "batch pos d_vocab"],
        tokens: Int[Tensor, "batch pos"],
        per_token: bool = False,
    ) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
        """Next-token cross-entropy of `logits` against `tokens` (mean, or `[batch, pos - 1]`)."""
        log_probs = logits[:, :-1].float().log_softmax(-1)
        loss = -log_probs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]
        return loss if per_token else loss.mean()


def _patch_state_like(
    hook: str,
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: ActivationCache,
    patching_metric: Callable[[Tensor], Tensor],
    layers: Sequence[int] | None = None,
) -> Float[Tensor, "layer pos head"]:
    n_layers, n_pos = model.cfg.n_layers, corrupted_tokens.shape[-1]
    out = torch.full((n_layers, n_pos, model.cfg.n_heads), float("nan"))
    for l in model.cfg.recurrent_layers if layers is None else layers:
        name = f"blocks.{l}.attn.{hook}"
        try:
            clean = clean_cache[name]
        except KeyError:
            raise KeyError(
                f"{name} is not in the clean cache: run_with_cache(..., names_filter=lambda n: "
                f"n.endswith('{hook}')) caches it"
            ) from None
        for pos in range(n_pos):
            for head in range(clean.shape[2]):

                def patch(
                    x: Tensor, hook: Any, pos: int = pos, head: int = head, clean: Tensor = clean
                ) -> Tensor:
                    x[:, pos, head] = clean[:, pos, head].to(x.dtype)
                    return x

                with torch.no_grad():
                    logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(name, patch)])
                out[l, pos, head] = float(patching_metric(logits))
    return out


def get_act_patch_state_by_head_pos(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: ActivationCache,
    patching_metric: Callable[[Tensor], Tensor],
    layers: Sequence[int] | None = None,
) -> Float[Tensor, "layer pos head"]:
    """Patch the clean `hook_state` S_t into the corrupted run, one (layer, position, head) at a
    time (state assignment: the recurrence continues from the clean state), and return the metric
    `[n_layers, pos, n_heads]`, NaN for layers without a state (Qwen3.5's attention layers).

    The calling convention of `transformer_lens.patching.get_act_patch_attn_head_out_by_pos`;
    `clean_cache` must hold `hook_state` (name it in `names_filter`); `layers` limits the sweep
    (default: every recurrent layer; the others stay NaN).
    """
    return _patch_state_like(
        "hook_state", model, corrupted_tokens, clean_cache, patching_metric, layers
    )


def get_act_patch_write_by_head_pos(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: ActivationCache,
    patching_metric: Callable[[Tensor], Tensor],
    layers: Sequence[int] | None = None,
) -> Float[Tensor, "layer pos head"]:
    """As `get_act_patch_state_by_head_pos`, patching the write `hook_write` (the clean write is
    added to the corrupted recurrence at that position; later states follow from it)."""
    return _patch_state_like(
        "hook_write", model, corrupted_tokens, clean_cache, patching_metric, layers
    )
