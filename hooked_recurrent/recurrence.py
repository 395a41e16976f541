"""The one recurrence behind every recurrent mixer, its reference scan and exact edit propagation.

Every family runs, per head, the same linear recurrence on a matrix state (key side first):

    S_t = A_t(S_{t-1}) + W_t,      W_t = k_t v_t^T         S_t in R^{d_k x d_v}
    o_t = S_t^T q_t                                         (the read comes after token t's write)

with a transition that is diagonal plus rank-1 on the key side and never depends on S:

    A_t(S) = diag(d_t) S + a_t (b_t^T S)

| family                | d_t (decay)                  | a_t                 | b_t      |
|-----------------------|------------------------------|---------------------|----------|
| Qwen3.5 Gated DeltaNet| alpha_t (scalar per head)    | -alpha_t beta_t k_t | k_t      |
| Mamba-2               | exp(dt_t A_h) (scalar)       | none                | none     |
| RWKV-7                | exp(w_t) (per key channel)   | -(a_t * kappa_t)    | kappa_t  |

Because A_t does not depend on S, an edit dW_t of the write (or dS_t of the state) changes every
later state by a linear response, E_s = A_s(E_{s-1}) + dW_s, and the read by E_s^T q_s. That is how
edits made at `hook_write` / `hook_state` reach later tokens without re-running the layer.

The step-by-step `scan` here is the slow, obviously correct reference; each family's chunked fast
path is tested against it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_recurrent.hook_points import RecurrentHookPoint, at_positions, current_positions
from hooked_recurrent.state import RunContext

__all__ = [
    "Transition",
    "Edits",
    "scan",
    "chunked_states",
    "adjoint_states",
    "propagate",
    "propagate_sparse",
    "RecurrentMixer",
]


@dataclass
class Transition:
    """A_t(S) = diag(decay_t) S + erase_a_t (erase_b_t^T S), for every position t.

    Attributes:
        decay: `[batch, pos, head]` (one per head) or `[batch, pos, head, d_k]` (per key channel).
        erase_a: `[batch, pos, head, d_k]` or None when the family has no removal term.
        erase_b: `[batch, pos, head, d_k]` or None.
    """

    decay: Tensor
    erase_a: Tensor | None = None
    erase_b: Tensor | None = None

    def step(self, S: Float[Tensor, "batch head d_k d_v"], t: int) -> Tensor:
        """A_t(S) for one position t."""
        ea = None if self.erase_a is None else self.erase_a[:, t]
        eb = None if self.erase_b is None else self.erase_b[:, t]
        return _apply(S, self.decay[:, t], ea, eb)

    def select(self, batch: Tensor, head: Tensor, positions: slice = slice(None)) -> Transition:
        """The transition restricted to pairs (batch[i], head[i]) and `positions`, as a batch of
        single heads."""

        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[batch, positions, head].unsqueeze(2)

        return Transition(pick(self.decay), pick(self.erase_a), pick(self.erase_b))

    def heads(self, sel: slice) -> Transition:
        """The transition of the heads in `sel` only."""
        return self.map(lambda x: x[:, :, sel])

    def map(self, f: Callable[[Tensor], Tensor]) -> Transition:
        """`f` applied to every tensor of the transition (all are `[batch, pos, head, ...]`)."""
        return Transition(
            f(self.decay),
            None if self.erase_a is None else f(self.erase_a),
            None if self.erase_b is None else f(self.erase_b),
        )

    def masked(self, keep: Float[Tensor, "batch pos head"]) -> Transition:
        """keep_t A_t: the transition zeroed where `keep` is 0 (a state assigned there forgets
        everything before it)."""
        d = self.decay * (keep if self.decay.dim() == 3 else keep[..., None])
        ea = None if self.erase_a is None else self.erase_a * keep[..., None]
        return Transition(d, ea, self.erase_b)

    def adjoint(self) -> Transition:
        """A_t^*, the adjoint under <X, Y> = tr(X^T Y): diag(decay) + erase_b erase_a^T."""
        return Transition(self.decay, self.erase_b, self.erase_a)


def _apply(S: Tensor, d: Tensor, ea: Tensor | None, eb: Tensor | None) -> Tensor:
    """diag(d) S + ea (eb^T S) for S `[..., d_k, d_v]`, d `[...]` or `[..., d_k]`."""
    out = S * (d[..., None, None] if d.dim() == S.dim() - 2 else d[..., None])
    if ea is not None:
        read = torch.einsum("...k,...kv->...v", eb, S)
        out = out + ea[..., :, None] * read[..., None, :]
    return out


def scan(
    transition: Transition,
    q: Float[Tensor, "batch pos head d_k"],
    write_k: Float[Tensor, "batch pos head d_k"] | None,
    write_v: Float[Tensor, "batch pos head d_v"] | None,
    S0: Float[Tensor, "batch head d_k d_v"] | None = None,
    writes: Float[Tensor, "batch pos head d_k d_v"] | None = None,
    keep_states: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Step-by-step reference: S_t = A_t(S_{t-1}) + W_t, o_t = S_t^T q_t.

    The write is `write_k write_v^T` unless dense `writes` are given. Runs in float32.

    Returns:
        (o [batch, pos, head, d_v], S_T [batch, head, d_k, d_v], states [batch, pos, head, d_k, d_v]
        or None).
    """
    B, T, H, dk = q.shape
    dv = writes.shape[-1] if writes is not None else write_v.shape[-1]
    S = (
        torch.zeros(B, H, dk, dv, dtype=torch.float32, device=q.device)
        if S0 is None
        else S0.float()
    )
    outs, states = [], []
    for t in range(T):
        S = transition.step(S, t)
        if writes is not None:
            S = S + writes[:, t]
        else:
            S = S + write_k[:, t, :, :, None] * write_v[:, t, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
        if keep_states:
            states.append(S)
    o = torch.stack(outs, 1) if outs else q.new_zeros(B, 0, H, dv)
    return o, S, (torch.stack(states, 1) if keep_states else None)


def chunked_states(
    transition: Transition,
    write_k: Float[Tensor, "batch pos head d_k"] | None,
    write_v: Float[Tensor, "batch pos head d_v"] | None,
    S0: Float[Tensor, "batch head d_k d_v"] | None = None,
    writes: Float[Tensor, "batch pos head d_k d_v"] | None = None,
    chunk: int | None = None,
) -> Float[Tensor, "batch pos head d_k d_v"]:
    """Every state S_t of S_t = A_t(S_{t-1}) + W_t, in chunks of about sqrt(T) positions.

    The same recurrence as `scan(keep_states=True)` for any transition, with about 3 sqrt(T)
    sequential steps instead of T: positions are grouped into n chunks of C, and

    1. in every chunk at once, C steps from a zero state give the chunk's own contribution N_c,
       and the same steps applied to the identity give the chunk's transition M_c (a scalar or
       per-channel decay when there is no removal term, else a d_k x d_k matrix);
    2. n steps S_{c+1} = M_c S_c + N_c give the state at every chunk start;
    3. C steps from the chunk starts, in every chunk at once, give every state.

    Only products and sums of the transitions: no division by a decay, so a zero transition (a
    state assigned at t, see `Transition.masked`) is exact. Differentiable; float32.
    """
    B, T, H = transition.decay.shape[:3]
    K = transition.decay.shape[3] if transition.decay.dim() == 4 else None
    if writes is not None:
        K, V = writes.shape[-2:]
    else:
        K, V = write_k.shape[-1], write_v.shape[-1]
    dev = transition.decay.device
    if T == 0:
        return torch.zeros(B, 0, H, K, V, device=dev)
    C = chunk or max(1, math.isqrt(T - 1) + 1)
    n = -(-T // C)
    pad = n * C - T

    def split(x: Tensor | None, fill: float = 0.0) -> Tensor | None:
        """[B, T, H, ...] -> [B, n, C, H, ...] (float32), padded with `fill`."""
        if x is None:
            return None
        x = x.float()
        if pad:
            x = torch.cat((x, x.new_full((B, pad, *x.shape[2:]), fill)), 1)
        return x.view(B, n, C, *x.shape[2:])

    d, ea, eb = split(transition.decay, 1.0), split(transition.erase_a), split(transition.erase_b)
    W, k, v = split(writes), split(write_k), split(write_v)

    def write(i: int) -> Tensor:
        if W is not None:
            return W[:, :, i]
        return k[:, :, i, :, :, None] * v[:, :, i, :, None, :]

    def step(S: Tensor, i: int) -> Tensor:
        return _apply(
            S, d[:, :, i], None if ea is None else ea[:, :, i], None if eb is None else eb[:, :, i]
        )

    # 1. each chunk from zero, and its transition
    local = torch.zeros(B, n, H, K, V, device=dev)
    if ea is None:
        M = d.prod(2)  # [B, n, H] or [B, n, H, K]
    else:
        M = torch.eye(K, device=dev).expand(B, n, H, K, K)
    for i in range(C):
        local = step(local, i) + write(i)
        if ea is not None:
            M = step(M, i)
    # 2. the chunk starts
    S = torch.zeros(B, H, K, V, device=dev) if S0 is None else S0.float()
    starts = []
    for c in range(n):
        starts.append(S)
        if ea is None:
            S = _apply(S, M[:, c], None, None) + local[:, c]
        else:
            S = M[:, c] @ S + local[:, c]
    # 3. every state
    S = torch.stack(starts, 1)
    out = []
    for i in range(C):
        S = step(S, i) + write(i)
        out.append(S)
    return torch.stack(out, 2).reshape(B, n * C, H, K, V)[:, :T]


def adjoint_states(
    transition: Transition,
    q: Float[Tensor, "batch pos head d_k"],
    grad_read: Float[Tensor, "batch pos head d_v"],
    grad_final: Float[Tensor, "batch head d_k d_v"] | None = None,
) -> Float[Tensor, "batch pos head d_k d_v"]:
    """The adjoint states Lambda_t = dL/dS_t of a loss L of the reads o_t = S_t^T q_t.

    With g_t = dL/do_t and G = dL/dS_T (the final state, if it is used),

        Lambda_{T-1} = q_{T-1} g_{T-1}^T + G,    Lambda_t = q_t g_t^T + A_{t+1}^*(Lambda_{t+1}),

    the same kind of recurrence run backwards in time with rank-1 writes q_t g_t^T and the adjoint
    transitions, so it runs on `chunked_states` (no loop over tokens). A transition zeroed by
    `Transition.masked` (an assigned state) stops the adjoint there, as it stops the state.
    """

    def backwards(x: Tensor, first: Tensor) -> Tensor:
        """y[tau] = x[T - tau] for tau >= 1, y[0] = first."""
        return torch.cat((first, x[:, 1:].flip(1)), 1)

    adj = transition.adjoint()
    ident = adj.map(lambda x: x[:, :1])
    rev = Transition(
        backwards(adj.decay, torch.ones_like(ident.decay)),
        None if adj.erase_a is None else backwards(adj.erase_a, torch.zeros_like(ident.erase_a)),
        None if adj.erase_b is None else backwards(adj.erase_b, torch.zeros_like(ident.erase_b)),
    )
    lam = chunked_states(rev, q.flip(1), grad_read.flip(1), grad_final)
    return lam.flip(1)


@dataclass
class Edits:
    """Additive state edits at a few (batch, pos, head) triples.

    The state of head `h[i]` of batch row `b[i]` gains `delta[i]` (`[d_k, d_v]`, float32) at
    position `t[i]`; a triple may appear more than once (the changes add up).
    """

    b: Tensor
    t: Tensor
    h: Tensor
    delta: Tensor

    @classmethod
    def found(
        cls, changed: Tensor, edited: Tensor, native: Callable[[tuple[Tensor, ...]], Tensor]
    ) -> Edits:
        """edited - native where `changed` `[batch, pos, head]` is set; `native(index)` gives the
        native values at `index` (three index tensors), so nothing of full size is rebuilt."""
        index = changed.nonzero(as_tuple=True)
        return cls(*index, edited[index].float() - native(index).float())

    def __len__(self) -> int:
        return len(self.t)


#: (batch index [n], head index [n], start position, E [n, 1, d_k, d_v]) -> (the reads of the
#: state E carried from `start` on with zero writes [n, T - start, 1, d_v], the final state):
#: a family's fast path run on a response, supplied to `recur` by mixers that have one
Response = Callable[[Tensor, Tensor, int, Tensor], tuple[Tensor, Tensor]]


def zero_write_response(
    rule: Callable[..., tuple[Tensor, Tensor]], inputs: tuple[Tensor, ...], zeroed: set[int]
) -> Response:
    """The `Response` of a family whose chunked rule is `rule(*inputs, S0)` -> (o, S_T).

    `inputs` are the rule's per-position tensors `[batch, pos, head, ...]`; those at the indices
    in `zeroed` carry the write and are replaced by zeros: an edit's response is the same
    recurrence with no writes, started from the edited state, for the edited (batch, head) pairs.
    """

    def response(bi: Tensor, hi: Tensor, start: int, E0: Tensor) -> tuple[Tensor, Tensor]:
        args = [
            x.new_zeros(len(bi), x.shape[1] - start, 1, *x.shape[3:])
            if i in zeroed
            else x[bi, start:, hi].unsqueeze(2)
            for i, x in enumerate(inputs)
        ]
        return rule(*args, E0)

    return response


#: (the transition of a batch of single heads, their reads, their dense edits [n, T, 1, d_k, d_v])
#: -> (dO [n, T, 1, d_v], E_T [n, 1, d_k, d_v]): a family's chunked propagation of many edits
DenseResponse = Callable[[Transition, Tensor, Tensor], tuple[Tensor, Tensor]]


def propagate(
    transition: Transition,
    q: Float[Tensor, "batch pos head d_k"],
    delta: Float[Tensor, "batch pos head d_k d_v"],
) -> tuple[Tensor, Tensor]:
    """Exact response of the layer to additive state edits `delta` (zero where nothing changed).

    E_t = A_t(E_{t-1}) + delta_t, E_{-1} = 0; returns (dO [batch, pos, head, d_v] with dO_t =
    E_t^T q_t, E_T [batch, head, d_k, d_v]). Only the (batch, head) pairs with an edit are stepped,
    and only from the first edited position on, so a rank-1 edit at one position of one head costs
    O((T - t) d_k d_v).
    """
    touched = delta.ne(0).flatten(3).any(-1)  # [b, T, h]
    edits = Edits.found(touched, delta, lambda index: delta.new_zeros(()))
    return propagate_sparse(transition, q, edits, tuple(delta.shape))


def propagate_sparse(
    transition: Transition,
    q: Float[Tensor, "batch pos head d_k"],
    edits: Edits,
    shape: tuple[int, ...],
    response: Response | None = None,
    dense_response: DenseResponse | None = None,
) -> tuple[Tensor, Tensor]:
    """`propagate` for sparse `edits` in a layer whose states have `shape`
    `[batch, pos, head, d_k, d_v]`.

    Only the (batch, head) pairs with an edit run, only from the first edited position t0 on, and
    no tensor of the states' full size is made. When the edits span at most `_STEP_SPAN`
    positions, the response is stepped from t0 to the last edited position t1 (E_t = A_t(E_{t-1})
    + delta_t); after t1 the writes are zero, so when the mixer supplies `response` the rest runs
    on the family's chunked fast path. Longer spans run densely: on the family's `dense_response`
    when it has one, else on `chunked_states`.
    """
    B, T, H, dk, dv = shape
    d_o = q.new_zeros(B, T, H, dv)
    E_T = q.new_zeros(B, H, dk, dv)
    if len(edits) == 0:
        return d_o, E_T
    pairs, inv = torch.unique(edits.b * H + edits.h, return_inverse=True)
    bi, hi = pairs // H, pairs % H
    t0, t1 = int(edits.t.min()), int(edits.t.max())
    if t1 - t0 >= _STEP_SPAN:
        rows = edits.t - t0
        local = edits.delta.new_zeros(len(pairs), T - t0, 1, dk, dv)
        local = local.index_put((inv, rows), edits.delta[:, None], accumulate=True)
        sub = transition.select(bi, hi, slice(t0, None))
        qsub = q[bi, t0:, hi, None]
        if dense_response is not None:
            o, E_last = dense_response(sub, qsub, local)
        else:
            E = chunked_states(sub, None, None, writes=local)
            o, E_last = torch.einsum("ntokv,ntok->ntov", E, qsub), E[:, -1]
        d_o = _scatter_pairs(d_o, bi, hi, t0, o[:, :, 0])
        E_T = E_T.index_put((bi, hi), E_last[:, 0].to(E_T.dtype))
        return d_o, E_T

    stop = t1 + 1 if response is not None else T  # step through [t0, stop)
    sub = transition.select(bi, hi, slice(t0, stop))
    qsub = q[bi, t0:stop, hi]  # [n, stop - t0, d_k]
    order = torch.argsort(edits.t, stable=True)
    at, counts = torch.unique_consecutive(edits.t[order], return_counts=True)
    adds = {
        int(t): (inv[o], edits.delta[o].unsqueeze(1))
        for t, o in zip(at.tolist(), torch.split(order, counts.tolist()), strict=True)
    }
    E = q.new_zeros(len(pairs), 1, dk, dv)
    outs = []
    for t in range(t0, stop):
        if t > t0:
            E = sub.step(E, t - t0)
        if t in adds:
            E = E.index_add(0, *adds[t])
        outs.append(torch.einsum("nhkv,nk->nv", E, qsub[:, t - t0]))
    d_o = _scatter_pairs(d_o, bi, hi, t0, torch.stack(outs, 1), stop)
    if stop < T:
        o_rest, E = response(bi, hi, stop, E)
        d_o = _scatter_pairs(d_o, bi, hi, stop, o_rest[:, :, 0].to(d_o.dtype))
    E_T = E_T.index_put((bi, hi), E[:, 0].to(E_T.dtype))
    return d_o, E_T


def _scatter_pairs(
    d_o: Tensor, bi: Tensor, hi: Tensor, start: int, o: Tensor, stop: int | None = None
) -> Tensor:
    """d_o with d_o[bi[i], start:stop, hi[i]] = o[i] (out of place, so autograd follows)."""
    stop = d_o.shape[1] if stop is None else stop
    t = torch.arange(start, stop, device=d_o.device)
    return d_o.index_put((bi[:, None], t[None, :], hi[:, None]), o.to(d_o.dtype))


#: edits spanning more positions than this go to a family's dense chunked propagation, if any
_STEP_SPAN = 16


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
    if _libc_madvise:
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


def _write_buffer() -> _WriteBuffer:
    """This thread's write buffer (threads never share one)."""
    buf = getattr(_buffers, "write", None)
    if buf is None:
        buf = _buffers.write = _WriteBuffer()
    return buf


def _version(t: Tensor) -> int | None:
    """t's version counter, or None where none is kept (inference tensors)."""
    return None if t.is_inference() else t._version


def _unchanged(
    hook: RecurrentHookPoint, native: Tensor, edited: Tensor, version: int | None
) -> bool:
    """True when the hook certainly left `native` as it was: it returned the same tensor, its
    version counter did not move, and no forward hook ran (only a cache) - a hook may write through
    `.data` or a NumPy view, which the version counter does not see."""
    return (
        edited is native
        and version is not None
        and _version(native) == version
        and not hook._forward_hooks
    )


def _hooked_write(
    hook: RecurrentHookPoint, write_k: Tensor, write_v: Tensor, block_elems: int = 1 << 18
) -> tuple[Tensor, Edits | None, Tensor | None]:
    """Run `hook` on the writes k v^T; return (writes to use, the edits or None, the changed
    `[batch, pos, head]` mask or None).

    The writes are built once, for the hook. What the hook changed is found block by block (of
    batch x positions): against the writes it was given when it returned a new tensor, or, when it
    edited them in place (or returned a view of them, or returned them with the version counter
    unmoved: a write through `.data` or a NumPy view), against k v^T rebuilt from the factors, so
    no second full-size tensor is allocated. (Float multiplication is deterministic, so the rebuilt
    values are bit-identical to the ones the hook was given.)
    """
    shape = (*write_k.shape, write_v.shape[-1])
    if (torch.is_grad_enabled() and (write_k.requires_grad or write_v.requires_grad)) or (
        torch.is_inference_mode_enabled()
    ):
        native = write_k[..., :, None] * write_v[..., None, :]  # out= does not support autograd
    else:
        native = torch.mul(
            write_k[..., :, None], write_v[..., None, :], out=_write_buffer().get(shape, write_k)
        )
    version = _version(native)
    edited = hook(native)
    if _unchanged(hook, native, edited, version):
        return native, None, None
    B, T, H, dk, dv = edited.shape
    flat = edited.reshape(B * T, H, dk, dv)
    kk, vv = write_k.reshape(B * T, H, dk), write_v.reshape(B * T, H, dv)
    shared = edited.untyped_storage().data_ptr() == native.untyped_storage().data_ptr()
    intact = None if shared or _version(native) != version else native.reshape(B * T, H, dk, dv)
    step = max(1, block_elems // (H * dk * dv))
    changed = torch.zeros(B * T, H, dtype=torch.bool, device=edited.device)
    buf = None if intact is not None else flat.new_empty(min(step, B * T), H, dk, dv)
    with torch.no_grad():
        for s in range(0, B * T, step):
            e = slice(s, s + step)
            if intact is not None:
                ref = intact[e]
            else:
                ref = torch.mul(kk[e, :, :, None], vv[e, :, None, :], out=buf[: len(flat[e])])
            if not torch.equal(flat[e], ref):  # most blocks are untouched: a fast all-equal test
                changed[e] = flat[e].ne(ref).flatten(2).any(-1)
    changed = changed.view(B, T, H)
    if not bool(changed.any()):
        return edited, None, None

    def native_at(index: tuple[Tensor, ...]) -> Tensor:
        return write_k[index][..., :, None] * write_v[index][..., None, :]

    return edited, Edits.found(changed, edited, native_at), changed


def _hooked_state(
    hook: RecurrentHookPoint, native: Tensor, rebuild: Callable[[], Tensor]
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Run `hook` on the states; return (tensor returned, the assigned `[batch, pos, head]` mask
    or None, the states as they were before the hook).

    Wherever the returned tensor differs from what the hook was given, the state is assigned.
    In-place edits (also through `.data` or a NumPy view, which the version counter does not see)
    are found against the states rebuilt with `rebuild`; a cache alone costs nothing more.
    """
    version = _version(native)
    edited = hook(native)
    if _unchanged(hook, native, edited, version):
        return native, None, native
    if (
        edited is native
        or _version(native) != version
        or version is None
        or edited.untyped_storage().data_ptr() == native.untyped_storage().data_ptr()
    ):
        native = rebuild()
    with torch.no_grad():
        changed = edited.ne(native).flatten(3).any(-1)  # [b, T, h]
    if not bool(changed.any()):
        return edited, None, native
    return edited, changed, native


def _assign(
    transition: Transition,
    q: Tensor,
    writes: Tensor,
    S0: Tensor | None,
    X: Tensor,
    native: Tensor,
    assigned: Tensor,
    o: Tensor,
    S_T: Tensor,
    everything: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reads, final state and states of a layer whose state is assigned to X where `assigned`
    `[batch, pos, head]` is set: S_t = X_t there, S_t = A_t(S_{t-1}) + W_t elsewhere.

    Only the (batch, head) pairs with an assignment are recomputed, from the first assigned
    position t0 on (the states before t0 are `native`'s), by `chunked_states` with the transition
    zeroed where a state is assigned and X in place of the write there. Their reads are S_t^T q_t
    computed from those states, so a state assigned to zero reads exactly zero. With `everything`
    (the incoming state S0 differs from the one `native` started from: an earlier call assigned
    states) every pair is recomputed from position 0.
    """
    if everything:
        B, T, H = assigned.shape
        bi, hi = (
            x.reshape(-1)
            for x in torch.meshgrid(
                torch.arange(B, device=o.device), torch.arange(H, device=o.device), indexing="ij"
            )
        )
        t0 = 0
    else:
        bi, hi = assigned.any(1).nonzero(as_tuple=True)
        t0 = int(assigned.any(-1).any(0).nonzero()[0])
    keep = (~assigned[bi, t0:, hi]).float()[..., None]  # [n, T - t0, 1]
    mixed = torch.where(
        assigned[bi, t0:, hi][..., None, None], X[bi, t0:, hi].float(), writes[bi, t0:, hi].float()
    )
    if t0 > 0:
        start = native[bi, t0 - 1, hi].float()
    else:
        start = None if S0 is None else S0[bi, hi].float()
    sub = transition.select(bi, hi, slice(t0, None)).masked(keep)
    S = chunked_states(
        sub, None, None, None if start is None else start[:, None], mixed[:, :, None]
    )
    reads = torch.einsum("ntokv,ntok->ntv", S, q[bi, t0:, hi, None])
    # each pair's positions before its own first assignment keep the fast path's bits
    t = torch.arange(t0, q.shape[1], device=q.device)
    first = assigned[bi, t0:, hi].float().argmax(1) + t0  # [n]
    if everything:
        first = torch.zeros_like(first)
    after = t[None, :] >= first[:, None]  # [n, T - t0]
    rows, cols = after.nonzero(as_tuple=True)
    index = (bi[rows], t[cols], hi[rows])
    o = o.index_put(index, reads[rows, cols].to(o.dtype))
    S_T = S_T.index_put((bi, hi), S[:, -1, 0].to(S_T.dtype))
    used = native.detach().index_put(index, S[rows, cols, 0].detach())
    return o, S_T, used


FastPath = Callable[[], tuple[Tensor, Tensor]]


@dataclass
class _TapInfo:
    """What the backward of a hooked recurrence needs (all detached)."""

    mixer: RecurrentMixer
    transition: Transition  # with assigned positions zeroed
    q: Tensor
    positions: Tensor | None
    write_changed: Tensor | None  # [b, T, h] where the write hook changed the write
    assigned: Tensor | None  # [b, T, h] where the state hook assigned the state
    d_v: int


class _AdjointTap(torch.autograd.Function):
    """Identity on the reads and the final state; its backward computes the adjoint states
    Lambda_t = dL/dS_t (`adjoint_states`), hands them to the backward hooks of `hook_state` and
    (zero where a state was assigned) of `hook_write`, and gives the dense carriers of the hooks'
    returned tensors the gradient at the entries the sparse propagation did not cover."""

    @staticmethod
    def forward(ctx, info, o, S_T, carrier_w, carrier_s):  # noqa: D102
        ctx.info = info
        ctx.set_materialize_grads(False)
        return o.view_as(o), S_T.view_as(S_T)

    @staticmethod
    def backward(ctx, g_o, g_S):  # noqa: D102
        info: _TapInfo = ctx.info
        q = info.q
        B, T, H, _ = q.shape
        g_read = q.new_zeros(B, T, H, info.d_v) if g_o is None else g_o.float()
        with torch.no_grad():
            lam = adjoint_states(info.transition, q, g_read, None if g_S is None else g_S.float())
            w_grad = lam
            if info.assigned is not None:
                w_grad = lam.masked_fill(info.assigned[..., None, None], 0.0)
        mixer = info.mixer
        with at_positions(info.positions) if info.positions is not None else _nullcontext():
            _call_backward_hooks(mixer.hook_state, lam)
            _call_backward_hooks(mixer.hook_write, w_grad)
        grad_w = grad_s = None
        if ctx.needs_input_grad[3]:
            grad_w = w_grad
            if info.write_changed is not None:  # the sparse propagation carries those entries
                grad_w = w_grad.masked_fill(info.write_changed[..., None, None], 0.0)
        if ctx.needs_input_grad[4]:
            grad_s = lam
            if info.assigned is not None:
                grad_s = lam.masked_fill(info.assigned[..., None, None], 0.0)
        return None, g_o, g_S, grad_w, grad_s


@contextlib.contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def _call_backward_hooks(hp: RecurrentHookPoint, grad: Tensor) -> None:
    """Call the backward hooks of a matrix hook point with `grad`, as PyTorch calls a module's."""
    for h in list(hp._backward_hooks.values()):
        if h(hp, (grad,), (grad,)) is not None:
            raise RuntimeError(
                f"a backward hook on '{hp.name}' returned a tensor: backward hooks on hook_write "
                "and hook_state may read the gradient (the adjoint state) but not replace it"
            )


class RecurrentMixer(torch.nn.Module):
    """Base of every recurrent mixer: owns `hook_write` and `hook_state` and runs the recurrence.

    `recur` materialises the write and the state only when they are hooked.

    Without hooks on the write or the state this is just the family's fast (chunked) path. With a
    hook on `hook_write` the writes are built, handed to the hook, and any change is pushed through
    the transitions (`propagate_sparse`): the returned writes are the layer's inputs. With a hook
    on `hook_state` the state trajectory (with the edited writes) is computed, handed to the hook,
    and wherever the returned tensor differs from it the state is assigned: the state at t is the
    returned value and later states follow from it. The outputs are always the fast path's plus
    the propagated response, so positions before the first edit are bit-for-bit unchanged.

    Gradients: the reads are exact functions of every entry of the returned tensors; backward
    hooks on `hook_state` get dL/dS_t at every position and those on `hook_write` get dL/dW_t (the
    same, zero where the state was assigned), computed by `adjoint_states`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hook_write = RecurrentHookPoint(matrix=True)  # [batch, pos, head, d_k, d_v]
        self.hook_state = RecurrentHookPoint(matrix=True)  # [batch, pos, head, d_k, d_v]

    #: name of the hook holding the write strength (beta, dt), or None when it is 1 (RWKV-7)
    write_strength_hook: str | None = None

    def propagate_edits(
        self,
        transition: Transition,
        q: Float[Tensor, "batch pos head d_k"],
        delta: Float[Tensor, "batch pos head d_k d_v"],
    ) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"]]:
        """The layer's exact response to additive state edits: `propagate`, step by step.

        A family may override this with a faster form of the same recurrence (RWKV-7: chunked).
        """
        return propagate(transition, q, delta)

    def state_trajectory(
        self,
        transition: Transition,
        q: Float[Tensor, "batch pos head d_k"],
        write_k: Float[Tensor, "batch pos head d_k"] | None,
        write_v: Float[Tensor, "batch pos head d_v"] | None,
        S0: Float[Tensor, "batch head d_k d_v"] | None,
        writes: Float[Tensor, "batch pos head d_k d_v"] | None = None,
    ) -> Float[Tensor, "batch pos head d_k d_v"]:
        """S_t at every position, for `hook_state` and `native_state`: `chunked_states`.

        A family may override this with a faster form of the same recurrence (RWKV-7: chunked).
        """
        return chunked_states(transition, write_k, write_v, S0, writes=writes)

    def recur(
        self,
        fast_path: FastPath,
        transition: Transition,
        q: Float[Tensor, "batch pos head d_k"],
        write_k: Float[Tensor, "batch pos head d_k"],
        write_v: Float[Tensor, "batch pos head d_v"],
        S0: Float[Tensor, "batch head d_k d_v"] | None,
        response: Response | None = None,
        run: RunContext | None = None,
    ) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"]]:
        """Run the recurrence: the fast path, plus the exact response to any edit made at
        `hook_write` or `hook_state`. Returns the reads `[batch, pos, head, d_v]` and the final
        state `[batch, head, d_k, d_v]`.

        With a hook on `hook_state`, the final state of the trajectory the hook was given (no
        state edits) is saved to `run` as `S_native`, and a later call that continues from that
        state (generation) hands its hook the same trajectory, so `generate` with a state hook
        equals one forward pass over the whole sequence with it.
        """
        hw, hs = self.hook_write, self.hook_state
        grad = torch.is_grad_enabled()
        backward_hooks = grad and bool(hw._backward_hooks or hs._backward_hooks)
        if q.shape[1] == 1:  # one decoding step: the plain recurrence is the fast path

            def fast_path() -> tuple[Tensor, Tensor]:
                return scan(transition, q, write_k, write_v, S0)[:2]

        if not (hw.active or hs.active or backward_hooks):
            return fast_path()

        writes = None  # the edited writes, when the write hook changed any
        w_edits = w_changed = assigned = carrier_w = carrier_s = None
        if hw.active:
            with hw.providing(
                native_state=self._native_states(transition, q, write_k, write_v, S0)
            ):
                edited, w_edits, w_changed = _hooked_write(hw, write_k, write_v)
            if w_edits is not None:
                writes = edited
            if grad and edited.requires_grad:
                # zero in value; carries the gradient of the entries the edits do not cover
                carrier_w = edited - write_k[..., :, None] * write_v[..., None, :]
            del edited  # the write buffer is free again once nothing holds it

        if hs.active:
            past = None if run is None else run.layer_in(self.layer)
            S0_native = S0 if past is None else past.get("S_native", S0)

            def states() -> Tensor:
                return self.state_trajectory(
                    transition, q, write_k, write_v, S0_native, writes=writes
                )

            X, assigned, native = _hooked_state(hs, states(), states)
            if run is not None:
                run.save(self.layer, S_native=native[:, -1].detach())
            if assigned is None and S0_native is not S0:  # earlier calls assigned states
                assigned = torch.zeros(native.shape[:3], dtype=torch.bool, device=native.device)
            if grad and X.requires_grad:
                carrier_s = X - native  # zero where nothing was assigned; carries the gradient

        o, S_T = fast_path()
        shape = (*q.shape[:3], q.shape[-1], write_v.shape[-1])
        qf = q.float()
        if w_edits is not None:
            dense = None
            if type(self).propagate_edits is not RecurrentMixer.propagate_edits:
                dense = self.propagate_edits  # the family's own (e.g. chunked) propagation
            d_o, E_T = propagate_sparse(transition, qf, w_edits, shape, response, dense)
            o, S_T = o + d_o.to(o.dtype), S_T + E_T
        if assigned is not None:
            if writes is None:
                writes = write_k[..., :, None] * write_v[..., None, :]
            o, S_T, used = _assign(
                transition, qf, writes, S0, X, native, assigned, o, S_T, S0_native is not S0
            )
            if hs._cache is not None:
                hs._cache[hs.name] = used.detach()
        writes = X = native = None  # the write buffer is free again once nothing holds it

        if grad and (backward_hooks or carrier_w is not None or carrier_s is not None):
            tr = transition if assigned is None else transition.masked((~assigned).float())
            info = _TapInfo(
                self,
                tr.map(Tensor.detach),
                qf.detach(),
                current_positions(),
                w_changed,
                assigned,
                write_v.shape[-1],
            )
            o, S_T = _AdjointTap.apply(info, o, S_T, carrier_w, carrier_s)
        return o, S_T

    def _native_states(
        self,
        transition: Transition,
        q: Tensor,
        write_k: Tensor,
        write_v: Tensor,
        S0: Tensor | None,
    ) -> Callable[[int | None], Tensor]:
        """`hook.native_state(head)` for hooks on `hook_write`: the native trajectory, computed on
        first use (of one head, or of all)."""
        memo: dict[int | None, Tensor] = {}

        def native_state(head: int | None = None) -> Tensor:
            if head not in memo:
                if head is None:
                    memo[None] = self.state_trajectory(transition, q, write_k, write_v, S0)
                else:
                    sel = slice(head, head + 1)
                    memo[head] = self.state_trajectory(
                        transition.heads(sel),
                        q[:, :, sel],
                        write_k[:, :, sel],
                        write_v[:, :, sel],
                        None if S0 is None else S0[:, sel],
                    )[:, :, 0]
            return memo[head]

        return native_state
