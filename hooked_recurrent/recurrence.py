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
| Mamba-1               | exp(dt_t A) (per state entry)| none                | none     |
| xLSTM mLSTM           | f_t exp(m_{t-1} - m_t) (scalar)| none              | none     |

For Mamba-1 `diag(d_t) S` is read as the elementwise product d_t * S: its decay has one entry per
state entry (`[d_k, d_v]` per head). That map is linear, independent of S and its own adjoint, so
every function here (scan, chunked states, adjoint states, propagation) handles it as it handles
the other decays.

Because A_t does not depend on S, an edit dW_t of the write (or dS_t of the state) changes every
later state by a linear response, E_s = A_s(E_{s-1}) + dW_s, and the read by E_s^T q_s. That is how
edits made at `hook_write` / `hook_state` reach later tokens without re-running the layer.

The step-by-step `scan` here is the slow, obviously correct reference; each family's chunked fast
path is tested against it. `chunked_states` computes every state of any of these recurrences in
about 3 sqrt(T) sequential steps, and `adjoint_states` the gradients dL/dS_t with it. Running hooks
on the write and the state and applying their edits is `hooked_recurrent.mixer`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "Transition",
    "Edits",
    "scan",
    "chunked_states",
    "chunked_reads",
    "adjoint_states",
    "propagate",
    "Propagation",
]


@dataclass
class Transition:
    """A_t(S) = diag(decay_t) S + erase_a_t (erase_b_t^T S), for every position t.

    Attributes:
        decay: `[batch, pos, head]` (one per head), `[batch, pos, head, d_k]` (per key channel) or
            `[batch, pos, head, d_k, d_v]` (per state entry, Mamba-1: A_t(S) = decay_t * S).
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
        d = self.decay * keep[(..., *(None,) * (self.decay.dim() - 3))]
        ea = None if self.erase_a is None else self.erase_a * keep[..., None]
        return Transition(d, ea, self.erase_b)

    def adjoint(self) -> Transition:
        """A_t^*, the adjoint under <X, Y> = tr(X^T Y): diag(decay) + erase_b erase_a^T (an
        elementwise decay is its own adjoint too)."""
        return Transition(self.decay, self.erase_b, self.erase_a)


def _step(
    S: Tensor,
    d: Tensor,
    ea: Tensor | None,
    eb: Tensor | None,
    wk: Tensor | None = None,
    wv: Tensor | None = None,
) -> Tensor:
    """diag(d) S + ea (eb^T S) + wk wv^T for S `[..., d_k, d_v]`, d `[...]`, `[..., d_k]` or
    `[..., d_k, d_v]`.

    The rank-1 terms are added in one batched product, so the step passes over the state's
    memory twice (the decay, then the product).
    """
    K, V = S.shape[-2:]
    out = _decayed(S, d)
    cols, rows = [], []
    if ea is not None:
        cols.append(ea[..., :, None])
        rows.append(torch.matmul(eb[..., None, :], S))
    if wk is not None:
        cols.append(wk[..., :, None])
        rows.append(wv[..., None, :])
    if not cols:
        return out
    U = torch.cat(cols, -1).reshape(-1, K, len(cols))
    R = torch.cat(rows, -2).reshape(-1, len(rows), V)
    return torch.baddbmm(out.reshape(-1, K, V), U, R).view(out.shape)


def _decayed(S: Tensor, d: Tensor) -> Tensor:
    """diag(d) S for S `[..., d_k, d_v]` and d `[...]` (scalar), `[..., d_k]` (per key channel)
    or `[..., d_k, d_v]` (per state entry: the elementwise product)."""
    extra = S.dim() - d.dim()
    return S * (d if extra == 0 else d[..., None] if extra == 1 else d[..., None, None])


def _apply(S: Tensor, d: Tensor, ea: Tensor | None, eb: Tensor | None) -> Tensor:
    """diag(d) S + ea (eb^T S) for S `[..., d_k, d_v]`, d `[...]`, `[..., d_k]` or
    `[..., d_k, d_v]`."""
    out = _decayed(S, d)
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

    def write(S: Tensor, t: int) -> Tensor:
        if writes is not None:
            return S + writes[:, t]
        return S + write_k[:, t, :, :, None] * write_v[:, t, :, None, :]

    outs, S, states = _step_through(transition, S, q, write, keep_states)
    o = torch.stack(outs, 1) if outs else q.new_zeros(B, 0, H, dv)
    return o, S, (torch.stack(states, 1) if keep_states else None)


def _step_through(
    transition: Transition,
    S: Tensor | None,
    q: Float[Tensor, "batch pos head d_k"],
    write: Callable[[Tensor | None, int], Tensor],
    keep_states: bool = False,
) -> tuple[list[Tensor], Tensor, list[Tensor]]:
    """S_t = write(A_t(S_{t-1}), t), o_t = S_t^T q_t for every position of `q`, one step at a
    time. `S` None stands for the zero state (the first transition is then skipped: A(0) = 0).

    Returns the reads (a list over positions), the last state and, with `keep_states`, the states.
    """
    outs, states = [], []
    for t in range(q.shape[1]):
        S = write(None if S is None else transition.step(S, t), t)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
        if keep_states:
            states.append(S)
    return outs, S, states


@dataclass
class _Chunks:
    """A recurrence cut into n chunks of C positions (float32, zero-padded to n C), for
    `chunked_states` and `chunked_reads`."""

    n: int
    C: int
    pad: int
    d: Tensor  # [B, n, C, H, ...]
    ea: Tensor | None
    eb: Tensor | None
    W: Tensor | None  # dense writes [B, n, C, H, K, V], or the factors below
    k: Tensor | None
    v: Tensor | None

    @classmethod
    def cut(
        cls,
        transition: Transition,
        write_k: Tensor | None,
        write_v: Tensor | None,
        writes: Tensor | None,
        chunk: int | None,
    ) -> _Chunks:
        B, T = transition.decay.shape[:2]
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

        return cls(
            n,
            C,
            pad,
            split(transition.decay, 1.0),
            split(transition.erase_a),
            split(transition.erase_b),
            split(writes),
            split(write_k),
            split(write_v),
        )

    def step(self, S: Tensor, i: int, with_write: bool = True) -> Tensor:
        """A_i(S) + W_i in every chunk at once (without the write when not `with_write`)."""
        a = None if self.ea is None else self.ea[:, :, i]
        b = None if self.eb is None else self.eb[:, :, i]
        d = self.d[:, :, i]
        if not with_write:
            return _step(S, d, a, b)
        if self.W is not None:
            return _step(S, d, a, b) + self.W[:, :, i]
        return _step(S, d, a, b, self.k[:, :, i], self.v[:, :, i])

    def starts(self, S0: Tensor | None, K: int, V: int) -> tuple[Tensor, Tensor]:
        """(the state at every chunk start [B, n, H, K, V], the state after the last chunk).

        In every chunk at once, C steps from a zero state give the chunk's own contribution N_c,
        and the same steps applied to the identity give the chunk's transition M_c (a decay when
        there is no removal term, else a K x K matrix); then n steps S_{c+1} = M_c S_c + N_c.
        """
        B, n, _, H = self.d.shape[:4]
        dev = self.d.device
        local = torch.zeros(B, n, H, K, V, device=dev)
        if self.ea is None:
            M = self.d.prod(2)  # [B, n, H, ...]
        else:
            M = torch.eye(K, device=dev).expand(B, n, H, K, K)
        for i in range(self.C):
            local = self.step(local, i)
            if self.ea is not None:
                M = self.step(M, i, with_write=False)
        S = torch.zeros(B, H, K, V, device=dev) if S0 is None else S0.float()
        starts = []
        for c in range(n):
            starts.append(S)
            if self.ea is None:
                S = _apply(S, M[:, c], None, None) + local[:, c]
            else:
                S = torch.baddbmm(
                    local[:, c].reshape(-1, K, V), M[:, c].reshape(-1, K, K), S.reshape(-1, K, V)
                ).view(B, H, K, V)
        return torch.stack(starts, 1), S


def _sizes(write_k: Tensor | None, write_v: Tensor | None, writes: Tensor | None) -> tuple:
    """(d_k, d_v) of the writes, dense or as factors."""
    if writes is not None:
        return tuple(writes.shape[-2:])
    return write_k.shape[-1], write_v.shape[-1]


def chunked_states(
    transition: Transition,
    write_k: Float[Tensor, "batch pos head d_k"] | None,
    write_v: Float[Tensor, "batch pos head d_v"] | None,
    S0: Float[Tensor, "batch head d_k d_v"] | None = None,
    writes: Float[Tensor, "batch pos head d_k d_v"] | None = None,
    chunk: int | None = None,
    reverse: bool = False,
) -> Float[Tensor, "batch pos head d_k d_v"]:
    """Every state S_t of S_t = A_t(S_{t-1}) + W_t, in chunks of about sqrt(T) positions.

    The same recurrence as `scan(keep_states=True)` for any transition, with about 3 sqrt(T)
    sequential steps instead of T: positions are grouped into n chunks of C, and

    1. in every chunk at once, C steps from a zero state give the chunk's own contribution N_c,
       and the same steps applied to the identity give the chunk's transition M_c (a scalar,
       per-channel or per-entry decay when there is no removal term, else a d_k x d_k matrix);
    2. n steps S_{c+1} = M_c S_c + N_c give the state at every chunk start;
    3. C steps from the chunk starts, in every chunk at once, give every state.

    Only products and sums of the transitions: no division by a decay, so a zero transition (a
    state assigned at t, see `Transition.masked`) is exact. Differentiable; float32. With
    `reverse`, the state after tau steps is returned at position T - 1 - tau (the inputs are given
    in reversed time, as `adjoint_states` does).
    """
    B, T, H = transition.decay.shape[:3]
    K, V = _sizes(write_k, write_v, writes)
    dev = transition.decay.device
    if T == 0:
        return torch.zeros(B, 0, H, K, V, device=dev)
    ch = _Chunks.cut(transition, write_k, write_v, writes, chunk)
    n, C = ch.n, ch.C
    S, _ = ch.starts(S0, K, V)
    if reverse:  # written straight to position T - 1 - tau (no flip of the result afterwards)
        res = torch.empty(B, n * C, H, K, V, device=dev)
        at = (n * C - 1) - torch.arange(n, device=dev) * C
        for i in range(C):
            S = ch.step(S, i)
            res.index_copy_(1, at - i, S)
        return res[:, ch.pad :]
    out = []
    for i in range(C):
        S = ch.step(S, i)
        out.append(S)
    return torch.stack(out, 2).reshape(B, n * C, H, K, V)[:, :T]


def chunked_reads(
    transition: Transition,
    q: Float[Tensor, "batch pos head d_k"],
    write_k: Float[Tensor, "batch pos head d_k"],
    write_v: Float[Tensor, "batch pos head d_v"],
    S0: Float[Tensor, "batch head d_k d_v"] | None = None,
    chunk: int | None = None,
) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"]]:
    """The reads o_t = S_t^T q_t and the final state, by `chunked_states`'s three passes, without
    keeping the states: the last pass reads each state as it is made.

    The fast path of a recurrence with no cheaper closed form per chunk (Mamba-1's elementwise
    decay): about 3 sqrt(T) sequential steps over `[batch, T / C, head, d_k, d_v]`. Float32.
    """
    B, T, H, K = q.shape
    V = write_v.shape[-1]
    if T == 0:
        S_T = torch.zeros(B, H, K, V, device=q.device) if S0 is None else S0.float()
        return q.new_zeros(B, 0, H, V, dtype=torch.float32), S_T
    ch = _Chunks.cut(transition, write_k, write_v, None, chunk)
    n, C = ch.n, ch.C
    S, S_T = ch.starts(S0, K, V)
    qc = torch.cat((q.float(), q.new_zeros(B, ch.pad, H, K, dtype=torch.float32)), 1)
    qc = qc.view(B, n, C, H, K)
    out = []
    for i in range(C):
        S = ch.step(S, i)
        out.append(torch.einsum("bnhkv,bnhk->bnhv", S, qc[:, :, i]))
    return torch.stack(out, 2).reshape(B, n * C, H, V)[:, :T], S_T


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
    return chunked_states(rev, q.flip(1), grad_read.flip(1), grad_final, reverse=True)


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
    #: the shape of the layer's states, `[batch, pos, head, d_k, d_v]`
    shape: tuple[int, ...]

    @classmethod
    def found(
        cls, changed: Tensor, edited: Tensor, native: Callable[[tuple[Tensor, ...]], Tensor]
    ) -> Edits:
        """edited - native where `changed` `[batch, pos, head]` is set; `native(index)` gives the
        native values at `index` (three index tensors), so nothing of full size is rebuilt."""
        b, t, h = changed.nonzero(as_tuple=True)
        delta = edited[b, t, h].float() - native((b, t, h)).float()
        return cls(b, t, h, delta, tuple(edited.shape))

    @classmethod
    def from_dense(cls, delta: Float[Tensor, "batch pos head d_k d_v"]) -> Edits:
        """The edits of a dense tensor of additive edits (zero where nothing changed)."""
        touched = delta.ne(0).flatten(3).any(-1)
        return cls.found(touched, delta, lambda index: delta.new_zeros(()))

    def __len__(self) -> int:
        return len(self.t)


@dataclass(frozen=True)
class Propagation:
    """A family's fast forms of the response E_t = A_t(E_{t-1}) + dW_t, dO_t = E_t^T q_t; both
    optional (without them `propagate` steps and uses `chunked_states`).

    Attributes:
        carry: (batch index [n], head index [n], start position, E [n, 1, d_k, d_v]) -> (the reads
            of the state E carried from `start` on with zero writes [n, T - start, 1, d_v], the
            final state): the family's chunked rule run with zero writes.
        dense: (the transition of a batch of single heads, their reads, their dense edits
            [n, T, 1, d_k, d_v]) -> (dO [n, T, 1, d_v], E_T [n, 1, d_k, d_v]): the family's
            chunked propagation of edits at many positions.
    """

    carry: Callable[[Tensor, Tensor, int, Tensor], tuple[Tensor, Tensor]] | None = None
    dense: Callable[[Transition, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    @classmethod
    def from_rule(
        cls,
        rule: Callable[..., tuple[Tensor, Tensor]],
        inputs: tuple[Tensor, ...],
        zeroed: set[int],
        dense: Callable[[Transition, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> Propagation:
        """The propagation of a family whose chunked rule is `rule(*inputs, S0)` -> (o, S_T).

        `inputs` are the rule's per-position tensors `[batch, pos, head, ...]`; those at the
        indices in `zeroed` carry the write and are replaced by zeros: an edit's response is the
        same recurrence with no writes, started from the edited state, for the edited (batch,
        head) pairs.
        """

        def carry(bi: Tensor, hi: Tensor, start: int, E0: Tensor) -> tuple[Tensor, Tensor]:
            args = [
                x.new_zeros(len(bi), x.shape[1] - start, 1, *x.shape[3:])
                if i in zeroed
                else x[bi, start:, hi].unsqueeze(2)
                for i, x in enumerate(inputs)
            ]
            return rule(*args, E0)

        return cls(carry, dense)


def propagate(
    transition: Transition,
    q: Float[Tensor, "batch pos head d_k"],
    edits: Edits | Float[Tensor, "batch pos head d_k d_v"],
    fast: Propagation | None = None,
) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"]]:
    """Exact response of a layer to additive state edits (`Edits`, or a dense tensor that is zero
    where nothing changed): E_t = A_t(E_{t-1}) + delta_t, E_{-1} = 0; returns (dO with
    dO_t = E_t^T q_t, E_T).

    Only the (batch, head) pairs with an edit run, only from the first edited position t0 on, and
    no tensor of the states' full size is made. When the edits span at most `_STEP_SPAN`
    positions, the response is stepped from t0 to the last edited position t1; after t1 the
    writes are zero, so with `fast.carry` the rest runs on the family's chunked fast path. Longer
    spans run densely: on `fast.dense` when the family has one, else on `chunked_states`.
    """
    if isinstance(edits, Tensor):
        edits = Edits.from_dense(edits)
    fast = fast or Propagation()
    B, T, H, dk, dv = edits.shape
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
        if fast.dense is not None:
            o, E_last = fast.dense(sub, qsub, local)
        else:
            E = chunked_states(sub, None, None, writes=local)
            o, E_last = torch.einsum("ntokv,ntok->ntov", E, qsub), E[:, -1]
        d_o = _scatter_pairs(d_o, bi, hi, t0, o[:, :, 0])
        E_T = E_T.index_put((bi, hi), E_last[:, 0].to(E_T.dtype))
        return d_o, E_T

    stop = t1 + 1 if fast.carry is not None else T  # step through [t0, stop)
    sub = transition.select(bi, hi, slice(t0, stop))
    order = torch.argsort(edits.t, stable=True)
    at, counts = torch.unique_consecutive(edits.t[order], return_counts=True)
    adds = {
        int(t) - t0: (inv[o], edits.delta[o].unsqueeze(1))
        for t, o in zip(at.tolist(), torch.split(order, counts.tolist()), strict=True)
    }

    def add(E: Tensor | None, t: int) -> Tensor:
        if E is None:
            E = q.new_zeros(len(pairs), 1, dk, dv)
        return E.index_add(0, *adds[t]) if t in adds else E

    outs, E, _ = _step_through(sub, None, q[bi, t0:stop, hi, None], add)
    d_o = _scatter_pairs(d_o, bi, hi, t0, torch.stack(outs, 1)[:, :, 0], stop)
    if stop < T:
        o_rest, E = fast.carry(bi, hi, stop, E)
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
