"""Memory reused between calls, for the whole package and `writesae`: one pool class.

Kept apart from the engine's mathematics (`recurrence`): this is where the package talks to the
allocator and the operating system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
import threading
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["MemoryPool", "write_buffer", "scratch"]


_HUGE_PAGE = 2 << 20
_libc_madvise: Callable[[int, int, int], int] | None | bool = None


def _empty_large(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """torch.empty(shape), on Linux CPU advised to use transparent huge pages when large.

    The writes of one layer hold d_k d_v floats per token and head and are freshly allocated on
    every call; the first touch of each 4 KiB page can then cost more than the multiplication that
    fills it. Huge pages (MADV_HUGEPAGE, honoured in the kernel's default "madvise" mode) take
    one fault per 2 MiB instead. Only this allocation is advised; where that is not possible this
    is plain torch.empty.
    """
    global _libc_madvise
    t = torch.empty(shape, dtype=like.dtype, device=like.device)
    nbytes = t.numel() * t.element_size()
    if like.device.type != "cpu" or nbytes < 4 * _HUGE_PAGE:
        return t
    if _libc_madvise is None:
        _libc_madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _libc_madvise = libc.madvise
            except (OSError, AttributeError):
                pass
    if callable(_libc_madvise):
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _libc_madvise(start, end - start, 14)  # MADV_HUGEPAGE; a failure is harmless
    return t


class MemoryPool(threading.local):
    """Named blocks of CPU memory kept from one call to the next (one set per thread).

    Memory taken fresh on every call goes back to the operating system in between, and touching
    it again page-faults once per page; for large tensors built on every call (the dense writes
    handed to `hook_write` hooks, the gathered rows and table gradients of a WriteSAE training
    step) that costs more than the arithmetic that fills them. A block is handed out again only
    when nothing else holds its storage (its use count is back to what it was when it was made),
    so a tensor that is still alive is never overwritten: one kept by a hook or a cache, one saved
    by autograd for a backward pass that has not run yet, or a gradient still held as a
    parameter's `.grad` or by the caller. The caller then gets new memory and the old block stays
    with its holder. Requests above `max_bytes`, off the CPU, or on a torch without
    `torch._C._storage_Use_Count` get plain fresh memory.

    Args:
        max_bytes: the largest block kept.
        huge_pages: advise large blocks to use transparent huge pages (Linux, see
            `_empty_large`).
    """

    def __init__(self, max_bytes: int, huge_pages: bool = False) -> None:
        self.max_bytes = max_bytes
        self.huge_pages = huge_pages
        self.blocks: dict[str, tuple[Tensor, int]] = {}

    def _empty(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if self.huge_pages:
            return _empty_large(shape, like)
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def get(self, shape: tuple[int, ...], like: Tensor, name: str = "") -> Tensor:
        """Uninitialised memory for a tensor of `shape` and `like`'s dtype and device, from the
        block called `name` when that block is free and large enough."""
        n = math.prod(shape)
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if (
            like.device.type != "cpu"
            or use_count is None
            or n * like.element_size() > self.max_bytes
        ):
            return self._empty(shape, like)
        block, idle = self.blocks.get(name, (None, -1))
        if (
            block is None
            or block.dtype != like.dtype
            or block.numel() < n
            or use_count(block.untyped_storage()._cdata) != idle
        ):
            block = self._empty((n,), like)
            self.blocks[name] = (block, use_count(block.untyped_storage()._cdata))
        return block[:n].view(shape)

    def clear(self) -> None:
        """Let go of this thread's blocks."""
        self.blocks.clear()


_write_pool = MemoryPool(256 << 20, huge_pages=True)

scratch = MemoryPool(64 << 20)
"""The pool of `writesae`'s factor loss: its gathered `[batch, 1 + k, d]` rows and its
`[n_atoms, d]` table gradients, kept between training steps; `writesae.train` clears it when it
returns."""


def write_buffer() -> MemoryPool:
    """This thread's pool for the dense writes handed to `hook_write` hooks (threads never share
    one); call `.get(shape, like)`."""
    return _write_pool
