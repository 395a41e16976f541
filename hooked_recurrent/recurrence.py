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
        decay: `[batch, pos, head]` (scalar per head) or `[batch, pos, head, d_k]` (per key channel).
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
    B, T, H, dk, dv = delta.shape
    d_o = delta.new_zeros(B, T, H, dv)
    E_T = delta.new_zeros(B, H, dk, dv)
    touched = delta.ne(0).flatten(3).any(-1)  # [b, T, h]
    pairs = touched.any(1).nonzero(as_tuple=False)  # [(b, h)]
    if len(pairs) == 0:
        return d_o, E_T
    bi, hi = pairs[:, 0], pairs[:, 1]
    t0 = int(touched[bi, :, hi].any(0).nonzero()[0])
    sub = transition.select(bi, hi)
    dsub = delta[bi, :, hi].unsqueeze(2)  # [n, T, 1, dk, dv]
    qsub = q[bi, :, hi].unsqueeze(2)
    E = torch.zeros_like(dsub[:, 0])
    outs = []
    for t in range(t0, T):
        E = sub.step(E, t) + dsub[:, t]
        outs.append(torch.einsum("bhkv,bhk->bhv", E, qsub[:, t]))
    d_o[bi, t0:, hi] = torch.stack(outs, 1)[:, :, 0]
    E_T[bi, hi] = E[:, 0]
    return d_o, E_T


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
    ) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"]]:
        want_write, want_state = self.hook_write.active, self.hook_state.active
        if q.shape[1] == 1:  # one decoding step: the plain recurrence is the fast path
            S0_ = S0

            def fast_path() -> tuple[Tensor, Tensor]:
                return scan(transition, q, write_k, write_v, S0_)[:2]

        if not (want_write or want_state):
            return fast_path()

        writes = None
        delta = None
        if want_write:
            native = write_k[..., :, None] * write_v[..., None, :]
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
                edited = self.hook_write(native)
            # the write is rebuilt rather than compared with `native`, which a TransformerLens-style
            # hook may have edited in place; one buffer becomes the difference
            d_write = write_k[..., :, None] * write_v[..., None, :]
            torch.sub(edited, d_write, out=d_write)
            if any_nonzero(d_write):
                writes, delta = edited, d_write

        if want_state:
            states = self.state_trajectory(transition, q, write_k, write_v, S0, writes=writes)
            edited = self.hook_state(states.clone())  # a copy: in-place edits must be seen too
            d_state = torch.sub(edited, states, out=states)
            if any_nonzero(d_state):
                delta = d_state if delta is None else delta + d_state

        o, S_T = fast_path()
        if delta is not None:
            d_o, E_T = self.propagate_edits(transition, q.float(), delta)
            o = o + d_o.to(o.dtype)
            S_T = S_T + E_T
        return o, S_T
