"""`HookedRecurrentModel`: one TransformerLens-style model class for Qwen3.5, Mamba-2 and RWKV-7."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, cast

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule

from hooked_recurrent.config import HookedRecurrentConfig
from hooked_recurrent.generation import GenerationMixin
from hooked_recurrent.hook_points import RecurrentHookPoint, at_positions, unknown_hook_error
from hooked_recurrent.state import RecurrentState, RunContext
from hooked_recurrent.tl_compat import HookedRecurrentCache, TLCompatMixin
from hooked_recurrent.validation import (
    check_forward_input,
    check_load_args,
    check_text,
)

__all__ = ["HookedRecurrentModel", "MATRIX_HOOKS", "HOOK_ALIASES"]

logger = logging.getLogger(__name__)

#: hooks whose tensors are [batch, pos, head, d_k, d_v]: built only when hooked or cached by name
MATRIX_HOOKS = ("hook_write", "hook_state")
#: TransformerLens 4.x names accepted as aliases of ours
HOOK_ALIASES = {"hook_ssm_write": "hook_write", "hook_ssm_state": "hook_state"}

_told_about_matrix_hooks = False

#: guards the bookkeeping of which thread is running each model (see `_exclusive`)
_owner_lock = threading.Lock()


def _resolve_alias(name: str) -> str:
    head, _, last = name.rpartition(".")
    if last in HOOK_ALIASES:
        return f"{head}.{HOOK_ALIASES[last]}" if head else HOOK_ALIASES[last]
    return name


class HookedRecurrentModel(GenerationMixin, TLCompatMixin, HookedRootModule):
    """A recurrent or hybrid language model with TransformerLens hooks on its write, state and read.

    Build one with `from_pretrained` (a Hub id, a local Hugging Face checkpoint folder, or the name
    of a model shipped with the package) or `from_hf_model` (a `transformers` model in memory).

    Example:
        >>> model = HookedRecurrentModel.from_pretrained("tiny-qwen3.5-shakespeare")
        >>> logits, cache = model.run_with_cache("To be, or not to be",
        ...     names_filter=lambda n: n.endswith("hook_write"))
    """

    def __init__(self, cfg: HookedRecurrentConfig, tokenizer: Any = None) -> None:
        super().__init__()
        from hooked_recurrent.pretrained import get_family

        self.cfg = cfg
        self.tokenizer = tokenizer
        family = get_family(cfg.architecture)
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.hook_embed = RecurrentHookPoint()
        self.ln_embed = family.build_embed_norm(cfg)  # RWKV-7's ln0; None elsewhere
        self.blocks = nn.ModuleList(family.build_block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = family.build_final_norm(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        if getattr(cfg, "tie_word_embeddings", False):
            self.unembed.weight = self.embed.weight  # one parameter, as in the checkpoint
        self.logit_transform = family.build_logit_transform(cfg)  # xLSTM's soft cap; else None
        self.to(cfg.dtype)
        self.setup()
        self._owner: int | None = None  # the thread running the model now (see `_exclusive`)
        self._owner_depth = 0

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One thread at a time: hooks are attached to the model, so a run from a second thread
        while the first is inside `forward`, `hooks()`, `run_with_hooks`, `run_with_cache` or
        `generate` would see the first thread's hooks. That second run raises instead."""
        me = threading.get_ident()
        with _owner_lock:
            owner = getattr(self, "_owner", None)
            if owner is not None and owner != me:
                raise RuntimeError(
                    "this HookedRecurrentModel is running in another thread; its hooks belong to "
                    "that run, so a concurrent run would see them. Use one model per thread "
                    "(copy.deepcopy(model)) or hold a lock around each run"
                )
            self._owner = me
            self._owner_depth = getattr(self, "_owner_depth", 0) + 1
        try:
            yield
        finally:
            with _owner_lock:
                self._owner_depth -= 1
                if self._owner_depth == 0:
                    self._owner = None

    @contextlib.contextmanager
    def hooks(self, *args: Any, **kwargs: Any) -> Iterator[HookedRecurrentModel]:
        """TransformerLens's `hooks()` context, held by this thread alone (see `_exclusive`)."""
        with self._exclusive(), super().hooks(*args, **kwargs) as model:
            yield model

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> HookedRecurrentModel:
        """Load a model: a name from `list_pretrained()`, a local checkpoint folder, or a Hub id.

        Supported checkpoints: Qwen3.5 (`Qwen3_5ForConditionalGeneration` or `Qwen3_5ForCausalLM`),
        Mamba-2 (`Mamba2ForCausalLM` or the original `mamba_ssm` layout) and RWKV-7 (fla-hub
        folders or BlinkDL `.pth` files).
        """
        from hooked_recurrent.pretrained import load_pretrained

        check_load_args(dtype, device)
        cfg, state_dict, tokenizer = load_pretrained(name_or_path, dtype=dtype)
        model = cls(cfg, tokenizer)
        model.load_state_dict(state_dict, strict=True)
        return model.to(device).eval()  # no dropout anywhere; eval mode for TL's analysis tools

    @classmethod
    def from_hf_model(cls, hf_model: nn.Module, tokenizer: Any = None) -> HookedRecurrentModel:
        """Convert a `transformers` model in memory (the same conversion as `from_pretrained`)."""
        from hooked_recurrent.pretrained import convert_hf_model

        cfg, state_dict = convert_hf_model(hf_model)
        model = cls(cfg, tokenizer)
        model.load_state_dict(state_dict, strict=True)
        device = next(hf_model.parameters()).device
        return model.to(device).eval()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: str | list[str] | Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
        state: RecurrentState | None = None,
        return_state: bool = False,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        *,
        attention_mask: Shaped[Tensor, "batch mask_pos"] | None = None,
        loss_per_token: bool = False,
        padding_side: Literal["right", "left"] = "right",
        prepend_bos: bool | None = None,
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
    ) -> Any:
        """Run the model on tokens `[batch, pos]` (or text), optionally continuing from `state`.

        As in TransformerLens, `stop_at_layer=l` returns the residual before block `l` (`resid_pre`
        of `l`) instead of logits, and `start_at_layer=l` takes that residual `[batch, pos,
        d_model]` as `input` and runs blocks `l` onward. `prepend_bos` applies to text input.

        Returns logits `[batch, pos, d_vocab]` (or the next-token loss, or both), followed by the
        `RecurrentState` after the last token when `return_state=True`. Feeding a sequence in two
        pieces, passing the first call's state to the second, equals feeding it whole.

        Args:
            input: a text, a list of texts (padded on `padding_side`; the attention mask is built
                for them), or token ids `[batch, pos]`.
            attention_mask: `[batch, pos]` (1 = real token, 0 = padding) for this call's tokens, or
                `[batch, offset + pos]` over the state's tokens too, as in Hugging Face (its first
                `offset` columns must then be the state's mask). A padded position leaves every
                recurrent state, convolution / token-shift buffer and attention key as if it were
                absent, so each row equals its real tokens run alone (see "Padding and batches" in
                the docs). The mask is remembered in the returned state.
            return_type: "logits", "loss" (mean next-token loss over the targets whose position
                and predicting position are both real), "both" (logits, loss) or None.
            loss_per_token: return the loss per target `[batch, pos - 1]` instead of its mean
                (TransformerLens semantics); entries whose target or predicting position is padded
                are 0.
            padding_side: where a list of texts is padded ("right", TransformerLens's default, or
                "left").
        """
        if start_at_layer is None:  # else `input` is a residual, checked in _forward
            check_forward_input(self, input, state, return_type)
        with self._exclusive():
            return self._forward(
                input,
                state,
                return_state,
                return_type,
                attention_mask,
                loss_per_token,
                padding_side,
                prepend_bos,
                stop_at_layer,
                start_at_layer,
            )

    def _forward(
        self,
        input: str | list[str] | Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
        state: RecurrentState | None,
        return_state: bool,
        return_type: str | None,
        attention_mask: Shaped[Tensor, "batch mask_pos"] | None,
        loss_per_token: bool,
        padding_side: Literal["right", "left"],
        prepend_bos: bool | None = None,
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
    ) -> Any:
        if isinstance(input, (str, list)):
            tokens, text_mask = self.to_tokens(
                input, prepend_bos=prepend_bos, padding_side=padding_side, return_mask=True
            )
            if attention_mask is None and not isinstance(input, str):
                attention_mask = text_mask
        else:
            tokens = input
        if start_at_layer is not None:
            self._check_start(tokens, return_type, start_at_layer)
        elif tokens.dim() != 2:
            raise ValueError(f"expected tokens of shape [batch, pos], got {tuple(tokens.shape)}")
        if state is not None and state.batch_size not in (0, tokens.shape[0]):
            raise ValueError(
                f"state has batch size {state.batch_size} but tokens have {tokens.shape[0]}"
            )
        run = self._run_context(tokens, state, attention_mask, return_state)
        offset, positions, mask = (0 if state is None else state.offset), run.positions, run.mask
        n = len(self.blocks)
        first = 0 if start_at_layer is None else start_at_layer + n * (start_at_layer < 0)
        last = n if stop_at_layer is None else stop_at_layer + n * (stop_at_layer < 0)
        with at_positions(positions):
            if start_at_layer is None:
                x = self.hook_embed(self.embed(tokens))
                if self.ln_embed is not None:
                    x = self.ln_embed(x)
            else:
                x = tokens
            if first == 0:  # the embedding, for blocks that read it (Zamba2's shared blocks)
                run.shared["embed"] = x
            for block in self.blocks[first:last]:
                x = block(x, run)
            if stop_at_layer is not None:
                return (
                    (x, RecurrentState(offset + x.shape[1], run.state_out)) if return_state else x
                )
            logits = self.unembed(self.ln_final(x))
            if self.logit_transform is not None:
                logits = self.logit_transform(logits)

        if return_type == "logits":
            out: Any = logits
        elif return_type in ("loss", "both"):
            loss = _next_token_loss(logits, tokens, mask, loss_per_token)
            out = loss if return_type == "loss" else (logits, loss)
        elif return_type is None:
            out = None
        else:
            raise ValueError(
                f"return_type must be 'logits', 'loss', 'both' or None, not {return_type!r}"
            )
        if return_state:
            return out, RecurrentState(offset + tokens.shape[1], run.state_out, run.key_mask)
        return out

    def _check_start(self, residual: Tensor, return_type: str | None, start_at_layer: int) -> None:
        """`start_at_layer` needs a residual `[batch, pos, d_model]`, no loss, and a layer whose
        blocks need nothing from the earlier ones but the residual."""
        if return_type in ("loss", "both"):
            raise ValueError("start_at_layer takes a residual, so there are no tokens for a loss")
        if residual.dim() != 3:
            raise ValueError("start_at_layer needs the residual [batch, pos, d_model] as input")
        if start_at_layer % len(self.blocks) == 0:
            return
        if self.cfg.architecture == "rwkv7":
            raise ValueError(
                "RWKV-7's blocks after the first also read block 0's value (v_first), which "
                "the residual does not carry: start_at_layer must be 0 on RWKV-7 (patch "
                "blocks.{l}.hook_resid_pre with run_with_hooks instead)"
            )
        if self.cfg.architecture == "zamba2":
            raise ValueError(
                "Zamba2's shared transformer blocks also read the token embeddings, which the "
                "residual does not carry: start_at_layer must be 0 on Zamba2 (patch "
                "blocks.{l}.hook_resid_pre with run_with_hooks instead)"
            )

    def _run_context(
        self,
        tokens: Tensor,
        state: RecurrentState | None,
        attention_mask: Tensor | None,
        return_state: bool,
    ) -> RunContext:
        """The context of one call: absolute positions, this call's mask and, with padding now or
        before, the attention layers' key mask and the rows' RoPE positions."""
        offset = 0 if state is None else state.offset
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        mask = self._call_mask(attention_mask, tokens, state)
        run = RunContext(
            positions=positions,
            state_in=state,
            state_out=[{} for _ in self.blocks] if return_state else None,
            mask=mask,
        )
        past_mask = None if state is None else state.mask
        if mask is not None or past_mask is not None:
            B, T = tokens.shape[:2]
            cur = mask if mask is not None else tokens.new_ones(B, T, dtype=torch.bool)
            past = past_mask if past_mask is not None else cur.new_ones(B, offset)
            run.key_mask = torch.cat((past.to(cur.device), cur), dim=1)
            n_real = past.long().sum(-1, keepdim=True).to(cur.device)
            run.row_positions = (n_real + cur.long().cumsum(-1) - 1).clamp_min(0)
        return run

    @staticmethod
    def _call_mask(
        attention_mask: Tensor | None, tokens: Tensor, state: RecurrentState | None
    ) -> Tensor | None:
        """This call's mask `[batch, pos]` as bool, or None when every token is real."""
        if attention_mask is None:
            return None
        B, T = tokens.shape
        offset = 0 if state is None else state.offset
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
            raise ValueError(
                f"attention_mask must be [batch, pos] = [{B}, {T}] (or [{B}, {offset + T}] with "
                f"the state's tokens), got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(tokens.device).bool()
        if mask.shape[1] == offset + T and offset:
            past = state.mask
            seen = mask[:, :offset]
            if (past is None and not bool(seen.all())) or (
                past is not None and not torch.equal(seen, past.to(seen.device))
            ):
                raise ValueError(
                    "the first `offset` columns of attention_mask differ from the mask of the "
                    "tokens in `state`"
                )
            mask = mask[:, offset:]
        elif mask.shape[1] != T:
            raise ValueError(
                f"attention_mask has {mask.shape[1]} positions; expected {T} (this call's tokens)"
                + (f" or {offset + T} (with the state's tokens)" if offset else "")
            )
        return None if bool(mask.all()) else mask

    # ------------------------------------------------------------------ hooks
    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Literal["fwd", "bwd"]):
        resolved = _resolve_alias(name)
        if resolved not in self.hook_dict:
            raise unknown_hook_error(name, self.hook_dict)
        super()._enable_hook_with_name(resolved, hook, dir)

    def _check_names(self, names: Sequence[str]) -> list[str]:
        out = []
        for n in names:
            resolved = _resolve_alias(n)
            if resolved not in self.hook_dict:
                raise unknown_hook_error(n, self.hook_dict)
            out.append(resolved)
        return out

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: str | Sequence[str] | Callable[[str], bool] | None = None,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice: Any = None,
        return_cache_object: bool = True,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, Tensor]]:
        """Run the model and cache activations, as in TransformerLens.

        Without a `names_filter`, `hook_write` and `hook_state` are left out (they are
        `d_k x d_v` per token and head); name them in `names_filter` to cache them. The cache holds
        what each point passed on, after any hooks; for `hook_state` that is the state the
        recurrence actually used (an assigned state and everything that follows from it).

        `incl_bwd=True` calls `backward()` on the output (a scalar: `return_type="loss"`) and caches
        the gradient of every cached activation as `name + "_grad"`; at `hook_write` and
        `hook_state` that is the adjoint state dL/dS_t. `device`, `remove_batch_dim` and
        `pos_slice` act on the cached tensors as in TransformerLens (the position axis is the
        second of every activation, the query axis of attention scores and patterns).
        """
        global _told_about_matrix_hooks
        if names_filter is None:
            if not _told_about_matrix_hooks:
                logger.warning(
                    "run_with_cache(): hook_write and hook_state are not cached by default (they "
                    "hold a d_k x d_v matrix per token and head); name them in names_filter, e.g. "
                    "names_filter=lambda n: n.endswith(('hook_write', 'hook_state')) or ..."
                )
                _told_about_matrix_hooks = True

            def names_filter(n: str) -> bool:
                return not n.endswith(MATRIX_HOOKS)

        elif isinstance(names_filter, str):
            names_filter = self._check_names([names_filter])
        elif not callable(names_filter):
            names_filter = self._check_names(list(names_filter))
        keep = names_filter if callable(names_filter) else set(names_filter).__contains__
        names = [name for name in self.hook_dict if keep(name)]
        cache: dict[str, Tensor] = {}

        def save_grad(grad: Tensor, hook: RecurrentHookPoint) -> None:
            cache[hook.name + "_grad"] = grad.detach()

        bwd_hooks = [(name, save_grad) for name in names] if incl_bwd else []
        with (
            self.hooks(
                bwd_hooks=bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts
            ),
            contextlib.ExitStack() as stack,
        ):
            for name in names:
                hp = cast(RecurrentHookPoint, self.hook_dict[name])
                stack.enter_context(hp.caching(cache))
            out: Any = self(*model_args, **kwargs)
            stack.close()
            if incl_bwd:
                out.backward()
        if device is not None or remove_batch_dim or pos_slice is not None:
            cache = {
                k: _cache_view(k, v, device, remove_batch_dim, pos_slice) for k, v in cache.items()
            }
        if return_cache_object:
            return out, HookedRecurrentCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    # ------------------------------------------------------------------ tokens
    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer attached; pass token ids, or give one to "
                "from_hf_model(hf_model, tokenizer) / set model.tokenizer"
            )
        return self.tokenizer

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["right", "left"] = "right",
        *,
        return_mask: bool = False,
    ) -> Int[Tensor, "batch pos"] | tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Tokenise text to `[batch, pos]`; a list of texts is padded with the pad token.

        Args:
            input: a text or a list of texts.
            prepend_bos: put the tokenizer's BOS token in front of every text (default
                `cfg.default_prepend_bos`, False; no special tokens are added otherwise).
            padding_side: pad shorter texts on the "right" (TransformerLens's default) or the
                "left" (what `generate` does).
            return_mask: also return the attention mask `[batch, pos]` (1 = real token, 0 =
                padding), to pass to `forward` / `run_with_hooks` / `run_with_cache` / `generate`.
                (Given a list of texts, those build it themselves.)

        Returns:
            the tokens, or (tokens, attention_mask) with `return_mask=True`.
        """
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
        check_text(input)
        tok = self._need_tokenizer()
        texts = [input] if isinstance(input, str) else list(input)
        ids = [tok.encode(t, add_special_tokens=False) for t in texts]
        if prepend_bos if prepend_bos is not None else self.cfg.default_prepend_bos:
            if tok.bos_token_id is None:
                raise ValueError("prepend_bos=True, but the tokenizer has no BOS token")
            ids = [[tok.bos_token_id, *row] for row in ids]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        out = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            cols = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
            out[i, cols] = torch.tensor(row, dtype=torch.long)
            mask[i, cols] = 1
        device = self.embed.weight.device
        return (out.to(device), mask.to(device)) if return_mask else out.to(device)

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        """Decode `[pos]` to a string or `[batch, pos]` to a list of strings."""
        tok = self._need_tokenizer()
        if isinstance(tokens, Tensor) and tokens.dim() == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        return tok.decode(tokens.tolist() if isinstance(tokens, Tensor) else tokens)

    def to_str_tokens(
        self, input: str | list[str] | Tensor | list[int], prepend_bos: bool | None = None
    ) -> list[str] | list[list[str]]:
        """The string of each token of a text, of tokens `[pos]` or `[1, pos]`, or of a list of
        ids; a list of texts or tokens `[batch, pos]` gives one list per sequence."""
        self._need_tokenizer()
        if isinstance(input, list) and input and isinstance(input[0], str):
            return [self._str_tokens(t, prepend_bos) for t in input]
        if isinstance(input, Tensor) and input.dim() == 2 and input.shape[0] > 1:
            return [self._str_tokens(row, prepend_bos) for row in input]
        # (a list of texts was handled above)
        return self._str_tokens(input, prepend_bos)  # type: ignore[arg-type]

    def _str_tokens(self, input: str | Tensor | list[int], prepend_bos: bool | None) -> list[str]:
        """The string of each token of one text or one sequence of ids."""
        tok = self._need_tokenizer()
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos)[0]
        else:
            ids = torch.as_tensor(input)
            if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):
                raise ValueError(f"expected tokens [pos] or [batch, pos], got {tuple(ids.shape)}")
            ids = ids.reshape(-1)
        return [tok.decode([i]) for i in ids.tolist()]


def _cache_view(
    name: str, t: Tensor, device: Any, remove_batch_dim: bool, pos_slice: Any
) -> Tensor:
    """A cached tensor after TransformerLens's `device`, `remove_batch_dim` and `pos_slice`."""
    from transformer_lens.utilities import Slice

    if pos_slice is not None:
        pos_dim = 2 if name.removesuffix("_grad").endswith(("attn_scores", "pattern")) else 1
        t = Slice.unwrap(pos_slice).apply(t, dim=pos_dim)
    if remove_batch_dim:
        if t.shape[0] != 1:
            raise ValueError(f"remove_batch_dim=True needs batch size 1; {name} has {t.shape[0]}")
        t = t[0]
    return t if device is None else t.to(device)


def _next_token_loss(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: Tensor | None,
    per_token: bool,
) -> Tensor:
    """Next-token cross-entropy: the mean over the real targets, or per target `[batch, pos-1]`.

    A target counts when it and the position predicting it are both real (TransformerLens's
    `lm_cross_entropy_loss` with an attention mask); per-token entries that do not count are 0.
    """
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    if mask is None and not per_token:
        return torch.nn.functional.cross_entropy(flat, tokens[:, 1:].reshape(-1))
    nll = torch.nn.functional.cross_entropy(flat, tokens[:, 1:].reshape(-1), reduction="none")
    nll = nll.view(tokens.shape[0], -1)
    if mask is not None:
        counts = mask[:, :-1] & mask[:, 1:]
        nll = nll * counts
    if per_token:
        return nll
    return nll.sum() / counts.sum()
