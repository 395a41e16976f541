"""Data parallelism for `train`, `sweep` and `extract` on `torch.distributed`.

Launched by ``torchrun --nproc_per_node N`` (which sets ``RANK``, ``WORLD_SIZE`` and the rendezvous
variables), :func:`init` joins the process group: NCCL when CUDA is available, gloo otherwise.
Without those variables, or with ``WORLD_SIZE=1``, every function here is the single-process
identity, so the training code calls them unconditionally.

The scheme (data parallelism with replicated optimiser state):

* every rank builds the same SAE from the same seed and sees the same stream of *global* batches
  (the source is deterministic given its seed); rank ``r`` of ``W`` computes the loss of rows
  ``[r B/W, (r+1) B/W)`` of each global batch of ``B`` samples (:func:`local`);
* :func:`average_grads` all-reduces the gradients and divides by ``W``; as every rank's loss is a
  mean over ``B/W`` samples, the average is the gradient of the mean over all ``B`` samples, the
  single-process gradient up to floating-point summation order;
* dead-atom statistics are global (:func:`any_rank`); resampling draws from the global batch with
  the global per-sample errors (:func:`gather`), with a generator every rank seeds the same way;
* only rank 0 writes files (:func:`is_main`); the others wait at a :func:`barrier`.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "init",
    "active",
    "rank",
    "world_size",
    "is_main",
    "local",
    "local_rows",
    "average_grads",
    "any_rank",
    "agree",
    "gather",
    "gather_varlen",
    "barrier",
    "gather_objects",
    "mean_over_ranks",
]


def init() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (once).

    Returns True when running with more than one process. Backend: NCCL when CUDA is available
    (each rank on GPU ``LOCAL_RANK``), else gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        atexit.register(_shutdown)
    return dist.get_world_size() > 1


def _shutdown() -> None:
    """At interpreter exit: wait for the other ranks (at most a minute), then leave the group.

    A process that exits while its peers still talk to it over gloo can abort in the transport's
    threads ("terminate called without an active exception") after all its work is done.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        else:
            dist.barrier()
    except RuntimeError:
        pass  # a peer failed or left first: nothing left to wait for
    dist.destroy_process_group()


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0, the one process that writes files."""
    return rank() == 0


def local_rows(n: int) -> slice:
    """This rank's rows of a global batch of ``n`` samples (``n`` must divide evenly)."""
    w = world_size()
    if n % w:
        raise ValueError(
            f"a global batch of {n} samples does not split over {w} processes; choose a batch "
            f"size divisible by {w}"
        )
    r = rank()
    return slice(r * n // w, (r + 1) * n // w)


def local(b: Any) -> Any:
    """This rank's slice of a global batch: a tensor, or a tuple of tensors such as
    ``WriteFactors`` (the batch itself in one process)."""
    if not active():
        return b
    if isinstance(b, tuple):
        rows = local_rows(b[0].shape[0])
        return type(b)(*(t[rows] for t in b))
    return b[local_rows(b.shape[0])]


def _comm(t: Tensor) -> Tensor:
    """``t`` on the device the backend communicates from (CUDA for NCCL, else CPU)."""
    return t.cuda() if dist.get_backend() == "nccl" else t


@torch.no_grad()
def average_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the ranks (one all-reduce of one flat buffer)."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = _comm(torch.cat([p.grad.reshape(-1) for p in params]))
    dist.all_reduce(flat)
    flat = flat.to(params[0].grad.device) / world_size()
    i = 0
    for p in params:
        p.grad.copy_(flat[i : i + p.numel()].view_as(p.grad))
        i += p.numel()


def any_rank(mask: Tensor) -> Tensor:
    """Element-wise OR of a bool tensor over the ranks."""
    if not active():
        return mask
    t = _comm(mask.to(torch.int32))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.to(mask.device).bool()


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag true on some rank becomes true on all (e.g. a signal one rank received)."""
    if not active():
        return tuple(bool(f) for f in flags)
    t = _comm(torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(x) for x in t.tolist())


def gather(t: Tensor) -> Tensor:
    """Concatenate the ranks' equally shaped tensors along dim 0, in rank order."""
    if not active():
        return t
    c = _comm(t.contiguous())
    parts = [torch.empty_like(c) for _ in range(world_size())]
    dist.all_gather(parts, c)
    return torch.cat(parts).to(t.device)


def gather_varlen(t: Tensor) -> list[Tensor]:
    """Every rank's tensor (same trailing shape, any length along dim 0), in rank order."""
    if not active():
        return [t]
    n = torch.tensor([t.shape[0]], dtype=torch.int64)
    counts = gather(n).tolist()
    pad = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype)
    pad[: t.shape[0]] = t
    full = gather(pad[None])
    return [full[i, :c] for i, c in enumerate(counts)]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if active():
        dist.barrier()


def mean_over_ranks(values: list[Tensor | float]) -> list[float]:
    """The mean over the ranks of each scalar (the values themselves in one process)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if active():
        t = _comm(t)
        dist.all_reduce(t)
        t = t.cpu() / world_size()
    return t.tolist()
