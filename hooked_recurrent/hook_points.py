"""Hook points with shape checks, absolute positions and lazily computed context.

`RecurrentHookPoint` is TransformerLens's `HookPoint` with three additions that recurrent models
need:

* a hook that returns a tensor of the wrong shape or dtype raises an error naming the hook;
* `hook.positions` gives the absolute positions of the tokens on the tensor's position axis, so a
  hook written against absolute positions acts the same in a full forward pass and in generation
  (where the position axis has length 1);
* `hook_write` points offer `hook.native_state(head=None)`: the state trajectory S_t computed with
  the native writes, for hooks that decide what to do from the state (WriteSAE substitution).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from collections.abc import Callable, Iterable, Iterator

from torch import Tensor
from transformer_lens.hook_points import HookPoint

__all__ = ["RecurrentHookPoint", "unknown_hook_error", "current_positions"]

_POSITIONS: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar(
    "hooked_recurrent_positions", default=None
)


@contextlib.contextmanager
def at_positions(positions: Tensor) -> Iterator[None]:
    """Within this block, every hook point reports `positions` as its absolute positions."""
    token = _POSITIONS.set(positions)
    try:
        yield
    finally:
        _POSITIONS.reset(token)


def current_positions() -> Tensor | None:
    """The absolute positions of the forward pass now running, or None outside one."""
    return _POSITIONS.get()


class RecurrentHookPoint(HookPoint):
    """A `HookPoint` that checks what its hooks return and knows the token positions it sees."""

    def __init__(self, matrix: bool = False) -> None:
        super().__init__()
        #: a `hook_write` / `hook_state` point: its mixer calls the backward hooks with the adjoint
        #: state (see `RecurrentMixer.recur`), so PyTorch's module backward hooks are not used
        self.matrix = matrix
        self._native_state: Callable[[int | None], Tensor] | None = None
        #: where `run_with_cache` collects this point's activation, or None (see `caching`)
        self._cache: dict[str, Tensor] | None = None

    @property
    def active(self) -> bool:
        """True when any forward hook (an edit or a cache) is attached, or the point is cached."""
        return bool(self._forward_hooks) or self._cache is not None

    @contextlib.contextmanager
    def caching(self, cache: dict[str, Tensor]) -> Iterator[None]:
        """Within this block, store what the point passes on (after any hooks) in `cache`.

        The same as a TransformerLens caching hook (`cache[name] = tensor.detach()`, added after
        the other hooks), without registering a PyTorch hook, so a cached forward pass costs no
        more Python per hook point than a plain one.
        """
        self._cache = cache
        try:
            yield
        finally:
            self._cache = None

    @property
    def positions(self) -> Tensor:
        """Absolute positions (LongTensor [pos]) of the tokens on this activation's position axis.

        In `model(tokens)` these are `0 .. pos-1` (plus the length of any `state=` prefix); in
        `generate` the position axis has length 1 and this gives the token's absolute position.
        """
        pos = _POSITIONS.get()
        if pos is None:
            raise RuntimeError(f"{self.name}: positions are only known while the hook fires")
        return pos

    def native_state(self, head: int | None = None) -> Tensor:
        """The state S_t with the native (unedited) writes, at this call's positions.

        Only available inside a hook on `hook_write`. Returns `[batch, pos, head, d_k, d_v]`, or
        `[batch, pos, d_k, d_v]` when `head` is given. Computed on first use, not before.
        """
        if self._native_state is None:
            raise RuntimeError(
                f"{self.name}: native_state() is only available inside a hook on a hook_write point"
            )
        return self._native_state(head)

    @contextlib.contextmanager
    def providing(self, native_state: Callable[[int | None], Tensor]) -> Iterator[None]:
        """Make `native_state` available to the hooks that fire inside this block."""
        self._native_state = native_state
        try:
            yield
        finally:
            self._native_state = None

    def __call__(self, x: Tensor) -> Tensor:
        if not self._forward_hooks and (self.matrix or not self._backward_hooks):
            if self._cache is not None:
                self._cache[self.name] = x.detach()
            return x
        if self.matrix:
            out = x
            for h in list(self._forward_hooks.values()):
                result = h(self, (x,), out)
                if result is not None:
                    out = result
                    self._check(x, out)
        else:
            out = super().__call__(x)  # TransformerLens's hooks, PyTorch's backward hooks
        self._check(x, out)
        if self._cache is not None:
            self._cache[self.name] = out.detach()
        return out

    def _check(self, x: Tensor, out: object) -> None:
        if not isinstance(out, Tensor):
            raise TypeError(f"hook on '{self.name}' returned {type(out).__name__}, not a Tensor")
        if out.shape != x.shape:
            raise ValueError(
                f"hook on '{self.name}' returned shape {tuple(out.shape)}; expected "
                f"{tuple(x.shape)} (the shape it was given)"
            )
        if out.dtype != x.dtype:
            raise ValueError(
                f"hook on '{self.name}' returned dtype {out.dtype}; expected {x.dtype}"
            )


def unknown_hook_error(name: str, known: Iterable[str]) -> KeyError:
    """A KeyError for an unknown hook name that lists the closest known names."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KeyError(f"unknown hook {name!r}{hint} (see model.hook_dict for all {len(known)})")
