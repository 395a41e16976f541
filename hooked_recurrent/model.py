"""`HookedRecurrentModel`: one TransformerLens-style model class for Qwen3.5, Mamba-2 and RWKV-7."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens import ActivationCache, HookedRootModule

from hooked_recurrent.config import HookedRecurrentConfig
from hooked_recurrent.hook_points import RecurrentHookPoint, at_positions, unknown_hook_error
from hooked_recurrent.state import RecurrentState, RunContext
from hooked_recurrent.validation import (
    check_forward_input,
    check_generate_args,
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

#: TransformerLens `run_with_cache` options and their defaults; with any other value the cache is
#: taken by TransformerLens's own hooks
_TL_CACHE_DEFAULTS = {
    "device": None,
    "remove_batch_dim": False,
    "incl_bwd": False,
    "reset_hooks_end": True,
    "clear_contexts": False,
    "pos_slice": None,
}


def _resolve_alias(name: str) -> str:
    head, _, last = name.rpartition(".")
    if last in HOOK_ALIASES:
        return f"{head}.{HOOK_ALIASES[last]}" if head else HOOK_ALIASES[last]
    return name


class HookedRecurrentModel(HookedRootModule):
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
        self.to(cfg.dtype)
        self.setup()

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
        return model.to(device)

    @classmethod
    def from_hf_model(cls, hf_model: nn.Module, tokenizer: Any = None) -> HookedRecurrentModel:
        """Convert a `transformers` model in memory (the same conversion as `from_pretrained`)."""
        from hooked_recurrent.pretrained import convert_hf_model

        cfg, state_dict = convert_hf_model(hf_model)
        model = cls(cfg, tokenizer)
        model.load_state_dict(state_dict, strict=True)
        device = next(hf_model.parameters()).device
        return model.to(device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: str | list[str] | Int[Tensor, "batch pos"],
        state: RecurrentState | None = None,
        return_state: bool = False,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
    ) -> Any:
        """Run the model on tokens `[batch, pos]` (or text), optionally continuing from `state`.

        Returns logits `[batch, pos, d_vocab]` (or the next-token loss, or both), followed by the
        `RecurrentState` after the last token when `return_state=True`. Feeding a sequence in two
        pieces, passing the first call's state to the second, equals feeding it whole.
        """
        check_forward_input(self, input, state, return_type)
        tokens = self.to_tokens(input) if isinstance(input, (str, list)) else input
        if tokens.dim() != 2:
            raise ValueError(f"expected tokens of shape [batch, pos], got {tuple(tokens.shape)}")
        if state is not None and state.batch_size not in (0, tokens.shape[0]):
            raise ValueError(
                f"state has batch size {state.batch_size} but tokens have {tokens.shape[0]}"
            )
        offset = 0 if state is None else state.offset
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        run = RunContext(
            positions=positions,
            state_in=state,
            state_out=[{} for _ in self.blocks] if return_state else None,
        )
        with at_positions(positions):
            x = self.hook_embed(self.embed(tokens))
            if self.ln_embed is not None:
                x = self.ln_embed(x)
            for block in self.blocks:
                x = block(x, run)
            logits = self.unembed(self.ln_final(x))

        if return_type == "logits":
            out: Any = logits
        elif return_type in ("loss", "both"):
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)
            )
            out = loss if return_type == "loss" else (logits, loss)
        elif return_type is None:
            out = None
        else:
            raise ValueError(
                f"return_type must be 'logits', 'loss', 'both' or None, not {return_type!r}"
            )
        if return_state:
            return out, RecurrentState(offset + tokens.shape[1], run.state_out)
        return out

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
        return_cache_object: bool = True,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, Tensor]]:
        """Run the model and cache activations, as in TransformerLens.

        Without a `names_filter`, `hook_write` and `hook_state` are left out (they are
        `d_k x d_v` per token and head); name them in `names_filter` to cache them.
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
        if any(kwargs.get(k, v) != v for k, v in _TL_CACHE_DEFAULTS.items()):
            # TransformerLens's own caching hooks for its options (device, backward hooks, ...)
            tl_kwargs = {k: kwargs.pop(k) for k in _TL_CACHE_DEFAULTS if k in kwargs}
            out, cache = super().run_with_cache(
                *model_args, names_filter=names_filter, **tl_kwargs, **kwargs
            )
        else:
            for k in _TL_CACHE_DEFAULTS:
                kwargs.pop(k, None)
            keep = names_filter if callable(names_filter) else set(names_filter).__contains__
            points = [hp for name, hp in self.hook_dict.items() if keep(name)]
            cache = {}
            with contextlib.ExitStack() as stack:
                for hp in points:
                    stack.enter_context(hp.caching(cache))
                out = self(*model_args, **kwargs)
        if return_cache_object:
            cache = ActivationCache(cache, self)
        return out, cache

    # ------------------------------------------------------------------ tokens
    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer attached; pass token ids, or give one to "
                "from_hf_model(hf_model, tokenizer) / set model.tokenizer"
            )
        return self.tokenizer

    def to_tokens(self, input: str | list[str]) -> Int[Tensor, "batch pos"]:
        """Tokenise text to `[batch, pos]`; a list of texts is right-padded with the pad token."""
        check_text(input)
        tok = self._need_tokenizer()
        texts = [input] if isinstance(input, str) else list(input)
        ids = [tok.encode(t, add_special_tokens=False) for t in texts]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        out = torch.full((len(ids), width), pad, dtype=torch.long)
        for i, row in enumerate(ids):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out.to(self.embed.weight.device)

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        """Decode `[pos]` to a string or `[batch, pos]` to a list of strings."""
        tok = self._need_tokenizer()
        if isinstance(tokens, Tensor) and tokens.dim() == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        return tok.decode(tokens.tolist() if isinstance(tokens, Tensor) else tokens)

    def to_str_tokens(self, input: str | Tensor) -> list[str]:
        """The string of each token of a text or of a 1-D token tensor."""
        tok = self._need_tokenizer()
        ids = self.to_tokens(input)[0] if isinstance(input, str) else input.reshape(-1)
        return [tok.decode([i]) for i in ids.tolist()]

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input: str | list[str] | Int[Tensor, "batch pos"],
        max_new_tokens: int = 10,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        stop_at_eos: bool = True,
        fwd_hooks: Sequence[tuple[str | Callable, Callable]] = (),
        return_type: Literal["str", "tokens", "input"] = "input",
        verbose: bool | None = None,
        seed: int | None = None,
    ) -> str | list[str] | Tensor:
        """Generate, one recurrent step per new token, with every hook live.

        The prompt is run once; each new token is then one step from the carried
        `RecurrentState` (O(1) per token for recurrent layers; the attention layers of Qwen3.5 use
        a KV cache). Hooks in `fwd_hooks` fire on the prompt and then on every step with a position
        axis of length 1; `hook.positions` gives the absolute position, so a hook written against
        absolute positions acts as in `run_with_hooks` on the whole sequence.

        Batches must be of equal-length prompts (no padding inside the recurrence). Finished
        sequences (after `eos_token_id`) are padded with it.

        Returns:
            the full sequences (prompt + new tokens) as text if the input was text (or
            `return_type="str"`), else as tokens `[batch, pos]`.
        """
        check_generate_args(self, max_new_tokens, do_sample, temperature, top_k, top_p,
                            eos_token_id, return_type, seed)  # fmt: skip
        check_forward_input(self, input)
        tokens = self.to_tokens(input) if isinstance(input, (str, list)) else input
        if return_type == "input":
            return_type = "str" if isinstance(input, (str, list)) else "tokens"
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        gen = torch.Generator(device=tokens.device)
        if seed is not None:
            gen.manual_seed(seed)
        if verbose is None:
            verbose = max_new_tokens >= 64
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        out = tokens
        with self.hooks(fwd_hooks=list(fwd_hooks)):
            logits, state = self(tokens, return_state=True)
            for step in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
                nxt = _sample(logits[:, -1].float(), do_sample, temperature, top_k, top_p, gen)
                if eos_token_id is not None and stop_at_eos:
                    nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                    finished |= nxt == eos_token_id
                out = torch.cat((out, nxt[:, None]), dim=1)
                if step == max_new_tokens - 1:
                    break
                if stop_at_eos and eos_token_id is not None and bool(finished.all()):
                    break
                logits, state = self(nxt[:, None], state=state, return_state=True)
        if return_type == "str":
            text = self.to_string(out)
            return text[0] if isinstance(input, str) else text
        return out


def _sample(
    logits: Float[Tensor, "batch vocab"],
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    gen: torch.Generator,
) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-8)
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, idx = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]
