"""Generation: one recurrent step per new token from the carried `RecurrentState`, with every
hook live (`HookedRecurrentModel.generate`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor
from tqdm.auto import tqdm

from hooked_recurrent.validation import check_forward_input, check_generate_args

__all__ = ["GenerationMixin"]


class GenerationMixin:
    """`generate` for `HookedRecurrentModel` (which supplies `__call__`, `hooks`, `to_tokens`,
    `to_string`, `_call_mask` and `tokenizer`)."""

    tokenizer: Any
    hooks: Callable[..., Any]
    to_tokens: Callable[..., Any]
    to_string: Callable[..., Any]
    _call_mask: Callable[..., Any]
    __call__: Callable[..., Any]

    @torch.no_grad()
    def generate(
        self,
        input: str | list[str] | Int[Tensor, "batch pos"],
        max_new_tokens: int = 10,
        *,
        attention_mask: Shaped[Tensor, "batch mask_pos"] | None = None,
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
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
    ) -> str | list[str] | Tensor:
        """Generate, one recurrent step per new token, with every hook live.

        The prompt is run once; each new token is then one step from the carried
        `RecurrentState` (O(1) per token for recurrent layers; the attention layers of Qwen3.5 use
        a KV cache). Hooks in `fwd_hooks` fire on the prompt and then on every step with a position
        axis of length 1; `hook.positions` gives the absolute position (the column), so a hook
        written against absolute positions acts as in `run_with_hooks` on the whole sequence.

        Prompts of different lengths: a list of texts is padded on the LEFT, with an attention
        mask, so every row's new tokens follow its last real token, and each row's continuation
        equals generating its prompt alone. Token prompts may come with their own
        `attention_mask` (any padding side); it is extended with ones for the new tokens, and each
        row continues from its last real token. Finished sequences (after `eos_token_id`) are
        padded with it.

        Sampling (`do_sample=True`) draws from torch's global random number generator, so
        `torch.manual_seed` makes it reproducible and successive calls differ; with `seed=` it
        uses a private generator seeded with it instead (the same result every call).

        Unlike TransformerLens (`do_sample=True`), decoding is greedy by default, so that a
        generation is reproducible and comparable across hook edits; pass `do_sample=True` (and
        `seed`) to sample. `freq_penalty` subtracts `freq_penalty * count` from the logit of each
        token already in the sequence, as in TransformerLens. `use_past_kv_cache=False` re-runs the
        whole sequence at every step instead of carrying the state (same tokens, slower).

        Returns:
            the full sequences (prompt + new tokens) as text if the input was text (or
            `return_type="str"`; padding is left out of the text), else as tokens `[batch, pos]`
            (padding included, as in the prompt).
        """
        check_generate_args(self, max_new_tokens, do_sample, temperature, top_k, top_p,
                            eos_token_id, return_type, seed)  # fmt: skip
        check_forward_input(self, input)
        if isinstance(input, (str, list)):
            tokens, text_mask = self.to_tokens(
                input, prepend_bos=prepend_bos, padding_side="left", return_mask=True
            )
            if attention_mask is None and not isinstance(input, str):
                attention_mask = text_mask
        else:
            tokens = input
        if return_type == "input":
            return_type = "str" if isinstance(input, (str, list)) else "tokens"
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        gen = None  # torch's global generator
        if seed is not None:
            gen = torch.Generator(device=tokens.device).manual_seed(seed)
        if verbose is None:
            verbose = max_new_tokens >= 64
        mask = self._call_mask(attention_mask, tokens, None)
        with self.hooks(fwd_hooks=list(fwd_hooks)):
            out = self._decode(
                tokens, mask, max_new_tokens, _Sampler(do_sample, temperature, top_k, top_p, gen),
                eos_token_id if stop_at_eos else None, freq_penalty, use_past_kv_cache, verbose,
            )  # fmt: skip
        if return_type == "str":
            return self._texts(out, mask, single=isinstance(input, str))
        return out

    def _decode(
        self,
        tokens: Int[Tensor, "batch pos"],
        mask: Tensor | None,
        max_new_tokens: int,
        sampler: _Sampler,
        eos_token_id: int | None,
        freq_penalty: float,
        use_past_kv_cache: bool,
        verbose: bool,
    ) -> Int[Tensor, "batch new_pos"]:
        """The prompt, then one step per new token (or the whole sequence again without the
        carried state); rows that reached `eos_token_id` are padded with it."""
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        out = tokens
        logits, state = self(tokens, return_state=True, attention_mask=mask)
        if mask is not None:  # each row goes on from its last real token
            cols = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
            last = (mask * cols).argmax(-1)
            logits = logits[torch.arange(len(last), device=last.device), last][:, None]
        for step in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
            last = logits[:, -1].float()
            if freq_penalty:
                counts = torch.zeros_like(last).scatter_add_(
                    1, out, torch.ones_like(out, dtype=last.dtype)
                )
                last = last - freq_penalty * counts
            nxt = sampler(last)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            out = torch.cat((out, nxt[:, None]), dim=1)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            if use_past_kv_cache:
                logits, state = self(nxt[:, None], state=state, return_state=True)
            else:
                logits = self(out, attention_mask=_extend(mask, out))
        return out

    def _texts(self, out: Tensor, mask: Tensor | None, single: bool) -> str | list[str]:
        """The generated sequences as text, padding left out."""
        if mask is None:
            text = self.to_string(out)
        else:
            keep = _extend(mask, out)
            text = [self.to_string(row[k]) for row, k in zip(out, keep, strict=True)]
        return text[0] if single else text


def _extend(mask: Tensor | None, out: Tensor) -> Tensor | None:
    """The prompt's mask extended with ones over the generated tokens (None stays None)."""
    if mask is None:
        return None
    return torch.cat((mask, mask.new_ones(len(out), out.shape[1] - mask.shape[1])), 1)


@dataclass
class _Sampler:
    """Picks the next token from the last logits `[batch, vocab]`: greedy, or a draw after
    temperature, top-k and top-p (nucleus) filtering, from `gen` (None: torch's global one)."""

    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    gen: torch.Generator | None

    def __call__(self, logits: Float[Tensor, "batch vocab"]) -> Int[Tensor, " batch"]:
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits / max(self.temperature, 1e-8)
        if self.top_k is not None:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None:
            sorted_logits, idx = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > self.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
        return torch.multinomial(logits.softmax(-1), 1, generator=self.gen)[:, 0]
