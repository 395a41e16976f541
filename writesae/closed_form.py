"""The closed-form logit shift of a rank-1 state edit: the paper's direct path and the exact first
order (paper Eq. 1 and App. A, arXiv 2605.12770).

An edit eps u w^T of one head's write (equivalently its state) at position t0 changes that layer's
reads by an exact linear response (the recurrence is affine in the state, and the layer's own
q, k, decays do not depend on its state):

    dO_s = eps <P_{t0->s} u, q_s> w,   P_{t0->s} = A_s ... A_{t0+1}   (s >= t0)

Everything after the read (the per-head norm and gate, the output projection, the later positions
and layers, the final norm and the unembedding) is nonlinear. Two predictions of the logit shift
at a read position t follow:

* `"direct"` (the paper's formula): eps <G u, q_t> <W_O^(h) w, W_U[tok]>, treating all of that
  as the identity (G the scalar decay product, or the exact transition product);
* `"first_order"`: eps times the exact directional derivative of the logits along the edit,
  J dO with J the Jacobian of "the rest of the network" from the read on. It is computed with
  forward-mode automatic differentiation (a dual tensor on `hook_read`), one forward pass per batch
  of edits (each batch row carries its own edit), never by finite differences.

`eps` is relative by default: the edit's Frobenius norm is `eps` times the norm of the native write
of that head at t0 (so eps = 0.1 is a tenth of what the token itself wrote); `eps_scale="absolute"`
gives the paper's absolute eps.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import torch
import torch.autograd.forward_ad as fwAD
from jaxtyping import Float
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from hooked_recurrent.recurrence import Transition
from hooked_recurrent.state import RecurrentState
from writesae.activations import write_factors
from writesae.protocols import (
    CacheLike,
    HookLike,
    MixerLike,
    ModelLike,
    PositionedHookLike,
    ReadoutModelLike,
)

__all__ = [
    "EPS_SCALES",
    "native_write_norm",
    "read_response",
    "run_from",
    "prefix_state",
    "read_jvp",
    "direct_readout",
]

EPS_SCALES = ("write_norm", "absolute")


def native_write_norm(
    model: ModelLike, cache: CacheLike, layer: int, head: int
) -> Float[Tensor, "batch pos"]:
    """||W_t||_F of the head's native write at every position, `[batch, pos]` (float64).

    The write is rank-1, (s_t k_t) v_t^T with s_t the family's write strength (beta for Qwen3.5,
    dt for Mamba-2, none for RWKV-7), so its norm is |s_t| ||k_t|| ||v_t||, computed from the
    cached factors (:func:`writesae.activations.write_factors`) without building the d_k x d_v
    matrices.
    """
    key, value = write_factors(model, cache, layer, head)
    return key.double().norm(dim=-1) * value.double().norm(dim=-1)


def read_response(
    model: ModelLike,
    cache: CacheLike,
    layer: int,
    head: int,
    position: int,
    read_position: int,
    u: Float[Tensor, "n d_k"],
    w: Float[Tensor, "n d_v"],
    rows: Tensor | None = None,
    propagator: str = "exact",
) -> Float[Tensor, "n steps d_v"]:
    """The change of the head's read, per unit eps, for the edit u w^T at `position`.

    Returns dO `[n, read_position - position + 1, d_v]` (float64) for the positions
    `position..read_position`: dO_s = <P u, q_s> w with P the exact transition product
    (`propagator="exact"`) or the scalar decay product G (`"gate"`, per key channel for RWKV-7).
    `u` `[n, d_k]` and `w` `[n, d_v]` are one edit per row; `rows` `[n]` says which prompt of the
    cache each edit is in (default: row i is prompt i).
    """
    p = f"blocks.{layer}.attn"
    q = cache[f"{p}.hook_q"][:, :, head].double()
    if rows is None:
        rows = torch.arange(q.shape[0])
    q = q[rows]
    u, w = u.double(), w.double()
    if propagator == "exact":
        mixer = cast(MixerLike, model.blocks[layer].attn)
        tr = mixer.transition_from_cache(cache, head)  # [batch, pos, ...]
    elif propagator == "gate":
        tr = Transition(cache[f"{p}.hook_decay"][:, :, head].double())
    else:
        raise ValueError(f"propagator must be 'gate' or 'exact', not {propagator!r}")
    sub = tr.map(lambda x: x[rows][:, :, None])  # one head per edit row: [n, pos, 1, ...]
    pu = u[:, None, :, None]  # [n, 1, d_k, 1]
    reads = []
    for s in range(position, read_position + 1):
        if s > position:
            pu = sub.step(pu, s)
        reads.append((pu[:, 0, :, 0] * q[:, s]).sum(-1))
    return torch.stack(reads, 1)[:, :, None] * w[:, None, :]


def _takes_state(model: ModelLike) -> bool:
    try:
        return "state" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def run_from(
    model: ModelLike,
    tokens: Tensor,
    start: int,
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
    state: RecurrentState | None = None,
) -> Tensor:
    """Logits of positions `start..` of `tokens`, with `fwd_hooks`, continuing from `state` (the
    model's state after `tokens[:, :start]`) when the model takes one; otherwise (a stub without a
    state) the whole sequence is run and the logits sliced. Hooks see absolute positions."""
    if state is not None or (start == 0 and _takes_state(model)):
        kw = {} if state is None else {"state": state}
        return model.run_with_hooks(tokens[:, start:], fwd_hooks=list(fwd_hooks), **kw)
    return model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))[:, start:]


def prefix_state(model: ModelLike, tokens: Tensor, start: int) -> RecurrentState | None:
    """The model's state after `tokens[:, :start]`, or None (start 0, or a model without state)."""
    if start == 0 or not _takes_state(model):
        return None
    _, state = model(tokens[:, :start], return_state=True)
    return state


@contextlib.contextmanager
def _forward_ad_friendly() -> Iterator[None]:
    """Attention on the math backend: the fused CPU kernels have no forward-mode derivative."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def read_jvp(
    model: ModelLike,
    tokens: Tensor,
    layer: int,
    head: int,
    start: int,
    tangent: Float[Tensor, "n steps d_v"],
    state: RecurrentState | None = None,
) -> tuple[Tensor, Tensor]:
    """Logits and their derivative when the head's read moves along `tangent`.

    Args:
        tokens: `[n, T]`, one edit per row.
        start: the first position run (the state after `tokens[:, :start]` is `state`).
        tangent: `[n, L, d_v]`, the read's direction at positions `start..start+L-1` (zero after).

    Returns:
        (logits, d logits) `[n, T - start, vocab]`, the derivative exact (forward-mode AD through
        everything after `blocks.{layer}.attn.hook_read`).
    """
    name = f"blocks.{layer}.attn.hook_read"

    def dual(read: Tensor, hook: HookLike) -> Tensor:
        # the read's position axis starts at `start` (state continued) or at 0 (whole sequence)
        # (a continued run's hook points carry absolute `positions`)
        hp = cast(PositionedHookLike, hook)
        i0 = start - int(hp.positions[0]) if read.shape[1] > tokens.shape[1] - start else 0
        t = torch.zeros_like(read)
        L = min(tangent.shape[1], read.shape[1] - i0)
        t[:, i0 : i0 + L, head] = tangent[:, :L].to(read.dtype)
        return fwAD.make_dual(read, t)

    with torch.no_grad(), _forward_ad_friendly(), fwAD.dual_level():
        out = run_from(model, tokens, start, [(name, dual)], state)
        primal, d = fwAD.unpack_dual(out)
        primal = primal.clone()
        d = torch.zeros_like(primal) if d is None else d.clone()
    return primal, d


def direct_readout(
    model: ReadoutModelLike, layer: int, head: int, w: Float[Tensor, "n d_v"], token: Tensor
) -> Tensor:
    """<W_O^(h) w, W_U[tok]> for `w` `[n, d_v]` and tokens `[n]` or `[n, m]` (float64)."""
    W_O = cast(MixerLike, model.blocks[layer].attn).head_output_weight(head).double()
    W_U = model.unembed.weight.double()  # [vocab, d_model]
    out = w.double() @ W_O.T  # [n, d_model]
    if token.dim() == 1:
        return (W_U[token] * out).sum(-1)
    return torch.einsum("nmd,nd->nm", W_U[token], out)
