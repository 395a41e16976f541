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

import ctypes
import ctypes.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_recurrent.hook_points import RecurrentHookPoint

__all__ = ["Transition", "Edits", "scan", "propagate", "propagate_sparse", "RecurrentMixer"]


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
        d = self.decay[:, t]
        out = S * (d[..., None, None] if d.dim() == 2 else d[..., None])
        if self.erase_a is not None:
            read = torch.einsum("bhk,bhkv->bhv", self.erase_b[:, t], S)
            out = out + self.erase_a[:, t, :, :, None] * read[:, :, None, :]
        return out

    def select(self, batch: Tensor, head: Tensor, positions: slice = slice(None)) -> Transition:
        """The transition restricted to pairs (batch[i], head[i]) and `positions`, as a batch of
        single heads."""

        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[batch, positions, head].unsqueeze(2)

        return Transition(pick(self.decay), pick(self.erase_a), pick(self.erase_b))


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

    @classmethod
    def cat(cls, parts: list[Edits]) -> Edits:
        """The edits of all `parts` together."""
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("b", "t", "h", "delta")))

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
    no tensor of the states' full size is made. From t0 to the last edited position t1 the
    response is stepped (E_t = A_t(E_{t-1}) + delta_t); after t1 the writes are zero, so when the
    mixer supplies `response` the rest runs on the family's chunked fast path. A mixer with a
    chunked propagation of dense edits (`dense_response`) uses it when the edits span more than
    `_STEP_SPAN` positions.
    """
    B, T, H, dk, dv = shape
    d_o = q.new_zeros(B, T, H, dv)
    E_T = q.new_zeros(B, H, dk, dv)
    if len(edits) == 0:
        return d_o, E_T
    pairs, inv = torch.unique(edits.b * H + edits.h, return_inverse=True)
    bi, hi = pairs // H, pairs % H
    t0, t1 = int(edits.t.min()), int(edits.t.max())
    if dense_response is not None and t1 - t0 >= _STEP_SPAN:
        rows = edits.t - t0
        local = edits.delta.new_zeros(len(pairs), T - t0, 1, dk, dv)
        local.index_put_((inv, rows), edits.delta[:, None], accumulate=True)
        o, E = dense_response(
            transition.select(bi, hi, slice(t0, None)), q[bi, t0:, hi, None], local
        )
        d_o[bi, t0:, hi] = o[:, :, 0].to(d_o.dtype)
        E_T[bi, hi] = E[:, 0].to(E_T.dtype)
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
    d_o[bi, t0:stop, hi] = torch.stack(outs, 1)
    if stop < T:
        o_rest, E = response(bi, hi, stop, E)
        d_o[bi, stop:, hi] = o_rest[:, :, 0].to(d_o.dtype)
    E_T[bi, hi] = E[:, 0].to(E_T.dtype)
    return d_o, E_T


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


_write_buffer = _WriteBuffer()


def _hooked_write(
    hook: RecurrentHookPoint, write_k: Tensor, write_v: Tensor, block_elems: int = 1 << 18
) -> tuple[Tensor, Edits | None]:
    """Run `hook` on the writes k v^T; return (writes to use, the edits or None).

    The writes are built once, for the hook. What the hook changed is found block by block (of
    batch x positions): against the writes it was given when it returned a new tensor, or, when it
    edited them in place (or returned a view of them), against k v^T rebuilt from the factors, so
    no second full-size tensor is allocated. (Float multiplication is deterministic, so the rebuilt
    values are bit-identical to the ones the hook was given.)
    """
    shape = (*write_k.shape, write_v.shape[-1])
    if torch.is_grad_enabled() and (write_k.requires_grad or write_v.requires_grad):
        native = write_k[..., :, None] * write_v[..., None, :]  # out= does not support autograd
    else:
        native = torch.mul(
            write_k[..., :, None], write_v[..., None, :], out=_write_buffer.get(shape, write_k)
        )
    version = native._version
    edited = hook(native)
    if edited is native and native._version == version:
        return native, None
    B, T, H, dk, dv = edited.shape
    flat = edited.reshape(B * T, H, dk, dv)
    kk, vv = write_k.reshape(B * T, H, dk), write_v.reshape(B * T, H, dv)
    shared = edited.untyped_storage().data_ptr() == native.untyped_storage().data_ptr()
    intact = None if shared or native._version != version else native.reshape(B * T, H, dk, dv)
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
        return edited, None

    def native_at(index: tuple[Tensor, ...]) -> Tensor:
        return write_k[index][..., :, None] * write_v[index][..., None, :]

    return edited, Edits.found(changed, edited, native_at)


def _hooked(
    hook: RecurrentHookPoint, native: Tensor, rebuild: Callable[[], Tensor]
) -> tuple[Tensor, Edits | None]:
    """Run `hook` on `native`; return (tensor to use, the edits or None if nothing changed).

    A hook may return a new tensor or edit its input in place (TransformerLens hooks often do).
    In place (or a returned view of the input) is detected from the version counter and the
    storage; the native values are then rebuilt with `rebuild` to find what changed. A hook that
    only reads (a cache) costs nothing more.
    """
    version = native._version
    edited = hook(native)
    if edited is native and native._version == version:
        return native, None
    if native._version != version or (
        edited.untyped_storage().data_ptr() == native.untyped_storage().data_ptr()
    ):
        native = rebuild()
    changed = edited.ne(native).flatten(3).any(-1)  # [b, T, h]
    if not bool(changed.any()):
        return edited, None
    return edited, Edits.found(changed, edited, native.__getitem__)


FastPath = Callable[[], tuple[Tensor, Tensor]]


class RecurrentMixer(torch.nn.Module):
    """Base of every recurrent mixer: owns `hook_write` and `hook_state` and runs the recurrence.

    `recur` materialises the write and the state only when they are hooked.

    Without hooks on the write or the state this is just the family's fast (chunked) path. With a
    hook on `hook_write` the writes are built, handed to the hook, and any change is pushed through
    the transitions (`propagate`). With a hook on `hook_state` the state trajectory is computed with
    the reference scan, handed to the hook, and any change is propagated the same way: the state fed
    to step t+1 is the edited one. Edits are taken relative to the tensor the hook was given, so
    several edited positions compose as additive changes. The outputs are always the fast path's
    plus the propagated response, so positions before the first edit are bit-for-bit unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hook_write = RecurrentHookPoint()  # [batch, pos, head, d_k, d_v]
        self.hook_state = RecurrentHookPoint()  # [batch, pos, head, d_k, d_v]

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
        """S_t at every position, for `hook_state` and `native_state`: the reference `scan`.

        A family may override this with a faster form of the same recurrence (RWKV-7: chunked).
        """
        return scan(transition, q, write_k, write_v, S0, writes=writes, keep_states=True)[2]

    def recur(
        self,
        fast_path: FastPath,
        transition: Transition,
        q: Float[Tensor, "batch pos head d_k"],
        write_k: Float[Tensor, "batch pos head d_k"],
        write_v: Float[Tensor, "batch pos head d_v"],
        S0: Float[Tensor, "batch head d_k d_v"] | None,
        response: Response | None = None,
    ) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"]]:
        """Run the recurrence: the fast path, plus the exact response to any edit made at
        `hook_write` or `hook_state`. Returns the reads `[batch, pos, head, d_v]` and the final
        state `[batch, head, d_k, d_v]`.
        """
        want_write, want_state = self.hook_write.active, self.hook_state.active
        if q.shape[1] == 1:  # one decoding step: the plain recurrence is the fast path
            S0_ = S0

            def fast_path() -> tuple[Tensor, Tensor]:
                return scan(transition, q, write_k, write_v, S0_)[:2]

        if not (want_write or want_state):
            return fast_path()

        writes = None
        edits: list[Edits] = []
        if want_write:
            memo: dict = {}

            def native_state(head: int | None = None) -> Tensor:
                if head not in memo:
                    if head is None:
                        memo[None] = self.state_trajectory(transition, q, write_k, write_v, S0)
                    else:
                        sel = slice(head, head + 1)
                        sub = Transition(
                            transition.decay[:, :, sel],
                            None if transition.erase_a is None else transition.erase_a[:, :, sel],
                            None if transition.erase_b is None else transition.erase_b[:, :, sel],
                        )
                        s0 = None if S0 is None else S0[:, sel]
                        memo[head] = self.state_trajectory(
                            sub,
                            q[:, :, sel],
                            write_k[:, :, sel],
                            write_v[:, :, sel],
                            s0,
                        )[:, :, 0]
                return memo[head]

            with self.hook_write.providing(native_state=native_state):
                edited, edit = _hooked_write(self.hook_write, write_k, write_v)
            if edit is not None:
                writes = edited
                edits.append(edit)
            del edited  # the write buffer is free again once nothing holds it

        if want_state:

            def native_states() -> Tensor:
                return self.state_trajectory(transition, q, write_k, write_v, S0, writes=writes)

            _, edit = _hooked(self.hook_state, native_states(), native_states)
            if edit is not None:
                edits.append(edit)
        writes = None  # drop the reference: the write buffer is reusable once nothing holds it

        o, S_T = fast_path()
        if edits:
            shape = (*q.shape[:3], q.shape[-1], write_v.shape[-1])
            dense = None
            if type(self).propagate_edits is not RecurrentMixer.propagate_edits:
                dense = self.propagate_edits  # the family's own (e.g. chunked) propagation
            d_o, E_T = propagate_sparse(
                transition, q.float(), Edits.cat(edits), shape, response, dense
            )
            o = o + d_o.to(o.dtype)
            S_T = S_T + E_T
        return o, S_T
