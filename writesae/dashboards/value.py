"""The value side of each atom: what w_i does to the logits.

* first order (`writesae.closed_form.read_jvp`, as the closed-form evaluation computes it): the
  exact derivative of the logits at position t when the head's read o_t moves along w_i, through
  the per-head gated norm, the output projection, the later layers, the final norm and the
  unembedding, averaged over the atom's top-activating positions t;
* direct path (`writesae.closed_form.direct_readout`, the paper's Eq. 1 read-out):
  <W_O^(h) w_i, W_U[tok]>, the same for every context.

Both are per unit move of the read along +w_i. Where the atom fires, the read moves by
c_i <u_i, q_t> w_i (code times the query's reading of u_i), so the sign of <u_i, q_t> (the key
side) says which way the tokens move.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from jaxtyping import Float, Int
from torch import Tensor

from writesae.closed_form import direct_readout, read_jvp
from writesae.protocols import ReadoutModelLike

__all__ = ["first_order_effect", "direct_effect"]


@torch.no_grad()
def first_order_effect(
    model: ReadoutModelLike,
    tokens: Int[Tensor, "n_seq pos"],
    layer: int,
    head: int,
    w: Float[Tensor, "n_atoms d_v"],
    sites: list[list[tuple[int, int]]],
) -> Float[Tensor, "n_atoms vocab"]:
    """Mean over each atom's `sites` (row, position) of d logits_t / d o_t along w_i.

    The rows holding a site are run one token at a time from the model's carried state; at each
    position t the edits of every site at t run as one batch of single-token passes (one row per
    (atom, site)) from the state after `tokens[row, :t]`. The derivative is exact (forward-mode
    AD, `read_jvp`). An atom with no site gets zeros.
    """
    by_t: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, ss in enumerate(sites):
        for row, t in ss:
            by_t[t].append((i, row))
    vocab = model.unembed.weight.shape[0]
    total = torch.zeros(w.shape[0], vocab, dtype=torch.float64)
    if not by_t:
        return total
    rows = sorted({row for ss in sites for row, _ in ss})
    local = {r: j for j, r in enumerate(rows)}
    sub = tokens[rows]
    w = w.detach().float()
    state = None
    for t in range(max(by_t) + 1):
        if t in by_t:
            atoms = torch.tensor([a for a, _ in by_t[t]])
            idx = torch.tensor([local[r] for _, r in by_t[t]])
            here = None if state is None else state.index_batch(idx)
            _, d = read_jvp(model, sub[idx, : t + 1], layer, head, t, w[atoms][:, None], here)
            total.index_add_(0, atoms, d[:, 0].double())
        _, state = model(sub[:, t : t + 1], state=state, return_state=True)
    n = torch.tensor([max(1, len(s)) for s in sites], dtype=torch.float64)
    return total / n[:, None]


@torch.no_grad()
def direct_effect(
    model: ReadoutModelLike, layer: int, head: int, w: Float[Tensor, "n_atoms d_v"], chunk: int = 32
) -> Float[Tensor, "n_atoms vocab"]:
    """<W_O^(h) w_i, W_U[tok]> for every atom and every token (float64)."""
    vocab = model.unembed.weight.shape[0]
    every = torch.arange(vocab)
    return torch.cat(
        [
            direct_readout(
                model, layer, head, w[i : i + chunk], every.expand(len(w[i : i + chunk]), -1)
            )
            for i in range(0, w.shape[0], chunk)
        ]
    )
