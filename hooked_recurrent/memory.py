"""Memory reused between calls: the dense writes handed to `hook_write` hooks.

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

__all__ = ["write_buffer"]


_HUGE_PAGE = 2 << 20
_libc_madvise: Callable[[int, int, int], int] | None | bool = None


def _empty_large(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """torch.empty(shape), on Linux CPU advised to use transparent huge pages when large.

    The writes of one layer are large (d_k d_v floats per token and head, 128 MiB at batch 4 x 256
    tokens for 8 heads of 64 x 64) and freshly allocated on every call; on a virtual machine the
    first touch of each 4 KiB page then costs more than the multiplication that fills it. Huge
    pages (MADV_HUGEPAGE, honoured in the kernel's default "madvise" mode) cut that 512-fold.
    Only this allocation is advised; where that is not possible this is plain torch.empty.
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


class _WriteBuffer:
    """One reusable block of memory for the dense writes handed to `hook_write` hooks (CPU only).

    Building `[batch, pos, head, d_k, d_v]` writes into fresh memory costs more in page faults than
    the multiplication itself, so the memory is kept between calls. It is reused only when nothing
    outside holds on to it: a hook that keeps the writes (a cache, or a returned view) makes the
    storage's reference count stay up, and the next call then takes new memory and leaves the old
    block to its holder. Blocks above `max_bytes` are never kept.
    """

    max_bytes = 256 << 20

    def __init__(self) -> None:
        self.block: Tensor | None = None
        self.idle_count = 0

    @staticmethod
    def _use_count(t: Tensor) -> int:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def get(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Uninitialised memory for a tensor of `shape` and `like`'s dtype and device."""
        n = math.prod(shape)
        if (
            like.device.type != "cpu"
            or n * like.element_size() > self.max_bytes
            or not hasattr(torch._C, "_storage_Use_Count")
        ):
            return _empty_large(shape, like)
        b = self.block
        if (
            b is None
            or b.dtype != like.dtype
            or b.numel() < n
            or self._use_count(b) != self.idle_count
        ):
            self.block = b = _empty_large((n,), like)
            self.idle_count = self._use_count(b)
        return b[:n].view(shape)


_buffers = threading.local()


def write_buffer() -> _WriteBuffer:
    """This thread's write buffer (threads never share one)."""
    buf = getattr(_buffers, "write", None)
    if buf is None:
        buf = _buffers.write = _WriteBuffer()
    return buf
