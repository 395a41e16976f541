"""Recurrent mixers' hooks on the write and the state: running them, applying their edits exactly,
and their gradients.

`RecurrentMixer.recur` runs a family's fast path and, when `hook_write` or `hook_state` is hooked,
builds the writes or the states, hands them to the hooks, finds what changed and applies it: write
edits propagate through the transitions (`recurrence.propagate`), state edits assign the
state (`_assign`). `_AdjointTap` gives backward hooks on both points the adjoint state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_recurrent.hook_points import RecurrentHookPoint, at_positions, current_positions
from hooked_recurrent.memory import write_buffer
from hooked_recurrent.recurrence import (
    Edits,
    Propagation,
    Transition,
    adjoint_states,
    chunked_states,
    propagate,
    scan,
)
from hooked_recurrent.state import RunContext

__all__ = ["RecurrentMixer"]


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
            write_k[..., :, None], write_v[..., None, :], out=write_buffer().get(shape, write_k)
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
        positions = info.positions
        with at_positions(positions) if positions is not None else contextlib.nullcontext():
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
    the transitions (`propagate`): the returned writes are the layer's inputs. With a hook
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

    #: the layer index (set by the family's constructor)
    layer: int
    #: the hook on the transition's decay (every family has one)
    hook_decay: RecurrentHookPoint

    @property
    def W_O(self) -> Float[Tensor, "head d_v d_model"]:
        """The output projection per head (TransformerLens layout): hook_out = sum_h hook_z[h] @
        W_O[h] (+ the bias, if any). Every family defines it."""
        raise NotImplementedError(f"{type(self).__name__} does not define W_O")

    def head_output_weight(self, head: int) -> Float[Tensor, "d_model d_v"]:
        """W_O^(h) as a `[d_model, d_v]` matrix: the columns of the output projection that read
        state head `head` (what `writesae`'s first-order effects go through)."""
        return self.W_O[head].T

    #: the hooks whose values define the transition, in the order `make_transition` takes them
    transition_hooks: tuple[str, ...] = ("hook_decay",)

    #: the transition A_t from the values at `transition_hooks` (the forward pass and
    #: `transition_from_cache` both build it here); the default is a pure decay
    make_transition: Callable[..., Transition] = staticmethod(Transition)

    def transition_from_cache(self, cache: Any, head: int) -> Transition:  # any cache by hook name
        """One head's transitions A_t rebuilt from this layer's cached `transition_hooks`, in
        float64, as tensors `[batch, pos, ...]` of that head (no head axis): what `writesae`'s
        closed forms step through."""
        values = [cache[getattr(self, h).name][:, :, head].double() for h in self.transition_hooks]
        return self.make_transition(*values)

    def hooked_decay(
        self,
        decay: Float[Tensor, "batch pos head *k"],
        log_decay: Float[Tensor, "batch pos head *k"],
    ) -> tuple[Tensor, Tensor]:
        """Run `hook_decay` on `decay` = exp(`log_decay`); returns (decay, log decay) where the
        log is taken only where the hook changed the decay, so the other entries (and every
        position before an edit) keep their bits."""
        if not self.hook_decay.active:
            return decay, log_decay
        native = decay.clone()  # a hook may edit in place
        decay = self.hook_decay(decay)
        changed = decay != native
        if bool(changed.any()):
            log_decay = torch.where(changed, decay.log(), log_decay)
        return decay, log_decay

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

        A family may override this with a faster form of the same recurrence (RWKV-7: its own
        chunked rule).
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
        propagation: Propagation | None = None,
        run: RunContext | None = None,
    ) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"]]:
        """Run the recurrence: the fast path, plus the exact response to any edit made at
        `hook_write` or `hook_state` (propagated with the family's `propagation`, if any).
        Returns the reads `[batch, pos, head, d_v]` and the final state `[batch, head, d_k, d_v]`.

        With a hook on `hook_state`, the final state of the trajectory the hook was given (no
        state edits) is saved to `run` as `S_native`, and a later call that continues from that
        state (generation) hands its hook the same trajectory, so `generate` with a state hook
        equals one forward pass over the whole sequence with it.
        """
        hw, hs = self.hook_write, self.hook_state
        grad = torch.is_grad_enabled()
        backward_hooks = grad and bool(hw._backward_hooks or hs._backward_hooks)
        if q.shape[1] == 1:  # one decoding step: the plain recurrence is the fast path
            run_fast: FastPath = lambda: scan(transition, q, write_k, write_v, S0)[:2]  # noqa: E731
        else:
            run_fast = fast_path
        if not (hw.active or hs.active or backward_hooks):
            return run_fast()

        writes = w_edits = w_changed = carrier_w = None
        if hw.active:
            writes, w_edits, w_changed, carrier_w = self._run_write_hook(
                transition, q, write_k, write_v, S0, grad
            )
        X = assigned = native = carrier_s = None
        S0_native = S0
        if hs.active:
            past = None if run is None else run.layer_in(self.layer)
            S0_native = S0 if past is None else past.get("S_native", S0)
            X, assigned, native, carrier_s = self._run_state_hook(
                transition, q, write_k, write_v, S0_native, writes, grad
            )
            if run is not None:
                run.save(self.layer, S_native=native[:, -1].detach())
            if assigned is None and S0_native is not S0:  # earlier calls assigned states
                assigned = torch.zeros(native.shape[:3], dtype=torch.bool, device=native.device)

        o, S_T = run_fast()
        qf = q.float()
        if w_edits is not None:
            d_o, E_T = propagate(transition, qf, w_edits, propagation)
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

    def _run_write_hook(
        self,
        transition: Transition,
        q: Tensor,
        write_k: Tensor,
        write_v: Tensor,
        S0: Tensor | None,
        grad: bool,
    ) -> tuple[Tensor | None, Edits | None, Tensor | None, Tensor | None]:
        """Hand the writes to `hook_write`; returns (the edited writes or None when nothing
        changed, the edits, the changed `[batch, pos, head]` mask, the gradient carrier or None)."""
        hw = self.hook_write
        with hw.providing(native_state=self._native_states(transition, q, write_k, write_v, S0)):
            edited, w_edits, w_changed = _hooked_write(hw, write_k, write_v)
        carrier = None
        if grad and hw._forward_hooks and edited.requires_grad:
            # zero in value; carries the gradient of the entries the edits do not cover
            carrier = edited - write_k[..., :, None] * write_v[..., None, :]
        # without edits the write buffer is free again once the caller drops `edited`
        return (edited if w_edits is not None else None), w_edits, w_changed, carrier

    def _run_state_hook(
        self,
        transition: Transition,
        q: Tensor,
        write_k: Tensor,
        write_v: Tensor,
        S0_native: Tensor | None,
        writes: Tensor | None,
        grad: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Hand the state trajectory (with the edited `writes`, from `S0_native`) to
        `hook_state`; returns (the returned states, the assigned mask or None, the states it was
        given, the gradient carrier or None)."""

        def states() -> Tensor:
            return self.state_trajectory(transition, q, write_k, write_v, S0_native, writes=writes)

        X, assigned, native = _hooked_state(self.hook_state, states(), states)
        carrier = None
        if grad and self.hook_state._forward_hooks and X.requires_grad:
            carrier = X - native  # zero where nothing was assigned; carries the gradient
        return X, assigned, native, carrier

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
