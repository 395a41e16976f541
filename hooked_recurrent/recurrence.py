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
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_recurrent.hook_points import RecurrentHookPoint

__all__ = ["Transition", "scan", "propagate", "RecurrentMixer"]


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

    def select(self, batch: Tensor, head: Tensor) -> Transition:
        """The transition restricted to pairs (batch[i], head[i]), as a batch of single heads."""

        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[batch, :, head].unsqueeze(2)

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
    return _propagate_edits(transition, q, [(touched, delta, None)], tuple(delta.shape))


#: (changed [batch, pos, head] bool, edited, native): the edit is edited - native where changed.
#: `native` is a tensor, None (edited is already the difference), or a function (batch index,
#: head index) -> the native values of those pairs, `[n, pos, d_k, d_v]`.
_Edit = tuple[Tensor, Tensor, "Tensor | Callable[[Tensor, Tensor], Tensor] | None"]


#: (batch index [n], head index [n], start position, E [n, 1, d_k, d_v]) -> (the reads of the
#: state E carried from `start` on with zero writes [n, T - start, 1, d_v], the final state):
#: a family's fast path run on a response, supplied to `recur` by mixers that have one
Response = Callable[[Tensor, Tensor, int, Tensor], tuple[Tensor, Tensor]]


def _propagate_edits(
    transition: Transition,
    q: Tensor,
    edits: list[_Edit],
    shape: tuple[int, ...],
    response: Response | None = None,
) -> tuple[Tensor, Tensor]:
    """`propagate` for edits given as (changed, edited, native) without a dense delta tensor.

    Only the (batch, head) pairs where `changed` is set are gathered, so the cost does not
    grow with the size of the untouched part of the batch. When every edit sits at one position
    t0 and the mixer supplies `response`, the rest of the response (zero writes from t0 + 1 on,
    starting from the edit) runs on the family's chunked fast path instead of a Python loop.
    """
    B, T, H, dk, dv = shape
    d_o = q.new_zeros(B, T, H, dv)
    E_T = q.new_zeros(B, H, dk, dv)
    touched = edits[0][0]
    for changed, _, _ in edits[1:]:
        touched = touched | changed
    pairs = touched.any(1).nonzero(as_tuple=False)  # [(b, h)]
    if len(pairs) == 0:
        return d_o, E_T
    bi, hi = pairs[:, 0], pairs[:, 1]
    t0 = int(touched[bi, :, hi].any(0).nonzero()[0])
    sub = transition.select(bi, hi)
    dsub = 0
    for changed, edited, native in edits:
        d = edited[bi, :, hi]
        if callable(native):
            d = d - native(bi, hi)
        elif native is not None:
            d = d - native[bi, :, hi]
        dsub = dsub + d.float() * changed[bi, :, hi][..., None, None]
    dsub = dsub.unsqueeze(2)  # [n, T, 1, dk, dv]
    qsub = q[bi, :, hi].unsqueeze(2)
    if response is not None and not bool(touched[bi, t0 + 1 :, hi].any()):
        E0 = dsub[:, t0]  # [n, 1, dk, dv]
        d_o[bi, t0, hi] = torch.einsum("bhkv,bhk->bhv", E0, qsub[:, t0])[:, 0]
        if t0 + 1 < T:
            o_rest, E_last = response(bi, hi, t0 + 1, E0)
            d_o[bi, t0 + 1 :, hi] = o_rest[:, :, 0].to(d_o.dtype)
            E_T[bi, hi] = E_last[:, 0].to(E_T.dtype)
        else:
            E_T[bi, hi] = E0[:, 0]
        return d_o, E_T
    E = torch.zeros_like(dsub[:, 0])
    outs = []
    for t in range(t0, T):
        E = sub.step(E, t) + dsub[:, t]
        outs.append(torch.einsum("bhkv,bhk->bhv", E, qsub[:, t]))
    d_o[bi, t0:, hi] = torch.stack(outs, 1)[:, :, 0]
    E_T[bi, hi] = E[:, 0]
    return d_o, E_T


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


def _hooked_write(
    hook: RecurrentHookPoint, write_k: Tensor, write_v: Tensor, block_elems: int = 1 << 20
) -> tuple[Tensor, _Edit | None]:
    """Run `hook` on the writes k v^T; return (writes to use, the edit or None).

    The writes are built once, for the hook. What the hook changed is found block by block (of
    batch x positions): against the writes it was given when it returned a new tensor, or, when it
    edited them in place, against k v^T rebuilt from the factors, so no second full-size tensor
    is allocated. (Float multiplication is deterministic, so the rebuilt values are bit-identical
    to the ones the hook was given.)
    """
    shape = (*write_k.shape, write_v.shape[-1])
    if torch.is_grad_enabled() and (write_k.requires_grad or write_v.requires_grad):
        native = write_k[..., :, None] * write_v[..., None, :]  # out= does not support autograd
    else:
        native = torch.mul(
            write_k[..., :, None], write_v[..., None, :], out=_empty_large(shape, write_k)
        )
    version = native._version
    edited = hook(native)
    if edited is native and native._version == version:
        return native, None
    B, T, H, dk, dv = edited.shape
    flat = edited.reshape(B * T, H, dk, dv)
    kk, vv = write_k.reshape(B * T, H, dk), write_v.reshape(B * T, H, dv)
    intact = None if edited is native else native.reshape(B * T, H, dk, dv)
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

    def native_pairs(bi: Tensor, hi: Tensor) -> Tensor:
        return write_k[bi, :, hi, :, None] * write_v[bi, :, hi, None, :]

    return edited, (changed, edited, native_pairs)


def _hooked(
    hook: RecurrentHookPoint, native: Tensor, rebuild: Callable[[], Tensor]
) -> tuple[Tensor, _Edit | None]:
    """Run `hook` on `native`; return (tensor to use, the edit or None if nothing changed).

    A hook may return a new tensor or edit its input in place (TransformerLens hooks often do).
    In place is detected from the tensor's version counter; the native values are then rebuilt
    with `rebuild` to find what changed. A hook that only reads (a cache) costs nothing more.
    """
    version = native._version
    edited = hook(native)
    if edited is native:
        if native._version == version:
            return native, None
        native = rebuild()
    changed = edited.ne(native).flatten(3).any(-1)  # [b, T, h]
    if not bool(changed.any()):
        return edited, None
    return edited, (changed, edited, native)


def _dense(edits: list[_Edit], shape: tuple[int, ...]) -> Tensor:
    """The edits as one dense difference tensor `[batch, pos, head, d_k, d_v]`."""
    delta = None
    for changed, edited, native in edits:
        if callable(native):
            B, T, H = changed.shape
            bi, hi = torch.meshgrid(torch.arange(B), torch.arange(H), indexing="ij")
            nat = native(bi.reshape(-1), hi.reshape(-1)).view(B, H, T, *shape[3:]).transpose(1, 2)
            d = edited - nat
        elif native is not None:
            d = edited - native
        else:
            d = edited
        d = d.float() * changed[..., None, None]
        delta = d if delta is None else delta + d
    return delta


FastPath = Callable[[], tuple[Tensor, Tensor]]


def any_nonzero(x: Tensor) -> bool:
    """Whether any entry is non-zero (or NaN); two reductions, no tensor of x's size allocated."""
    return bool(x.amax() != 0) or bool(x.amin() != 0)


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
        edits: list[_Edit] = []
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

        if want_state:

            def native_states() -> Tensor:
                return self.state_trajectory(transition, q, write_k, write_v, S0, writes=writes)

            _, edit = _hooked(self.hook_state, native_states(), native_states)
            if edit is not None:
                edits.append(edit)

        o, S_T = fast_path()
        if edits:
            shape = (*q.shape[:3], q.shape[-1], write_v.shape[-1])
            if type(self).propagate_edits is RecurrentMixer.propagate_edits:
                d_o, E_T = _propagate_edits(transition, q.float(), edits, shape, response)
            else:  # the family's own (e.g. chunked) propagation takes the dense difference
                d_o, E_T = self.propagate_edits(transition, q.float(), _dense(edits, shape))
            o = o + d_o.to(o.dtype)
            S_T = S_T + E_T
        return o, S_T
