"""One pass over a corpus for the atom dashboard: every statistic that needs the model's
activations, gathered batch by batch so that no `[tokens, n_atoms]` or `[tokens, d_k, d_v]` array
of the whole corpus is ever held.

Per batch of sequences the model runs once with the SAE's layer cached, and:

* the codes `c = sae.encode(X_t)` are kept sparse (position, atom, value);
* the fraction of variance each atom explains is accumulated: removing atom i from every
  reconstruction raises the squared error by sum_t (2 c_ti <R_t, u_i w_i^T> + c_ti^2 ||u_i||^2
  ||w_i||^2), with R_t = X_t - X_hat_t the residual;
* the key side: cos(k_t, u_i) of the write's key with every atom's u, summed per token id;
* the read side: <u_i, q_t> of every query with every u, the largest |.| kept per atom;
* the head's transitions A_t (for the memory of an atom's contribution).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_recurrent.recurrence import Transition
from writesae.protocols import CacheLike, ConfiguredModelLike, MixerLike, RankOneSAELike

__all__ = ["CorpusStats", "corpus_pass", "sae_layer"]


def sae_layer(sae: RankOneSAELike) -> int:
    """The layer of the SAE's hook (`blocks.{layer}.attn.hook_state`)."""
    return int(sae.cfg.hook_prefix.split(".")[1])


@dataclass
class CorpusStats:
    """What one pass over `tokens` `[n_seq, T]` leaves (flat position p = seq * T + t).

    Attributes:
        tokens: the corpus `[n_seq, T]`.
        pos, atom, value: the nonzero codes, one entry each (sorted by position).
        fve_drop: `[n_atoms]` fraction of the total variance lost when the atom is removed from
            every reconstruction (its share of the explained variance).
        fve: fraction of variance explained by the whole dictionary.
        key_sum, key_count: `[vocab, n_atoms]` sum of cos(k_t, u_i) over the positions holding
            each token id, and `[vocab]` how many positions hold it.
        read_value, read_pos: `[n_atoms, m]` the largest |<u_i, q_t>| over the corpus (signed)
            and their flat positions.
        transition: the head's transitions A_t over the corpus, `[n_seq, T, 1, ...]`.
    """

    tokens: Tensor
    pos: Tensor
    atom: Tensor
    value: Tensor
    fve_drop: Tensor
    fve: float
    key_sum: Tensor
    key_count: Tensor
    read_value: Tensor
    read_pos: Tensor
    transition: Transition


def _names(model: ConfiguredModelLike, layer: int, kind: str) -> list[str]:
    """The layer's hooks to cache: every per-token hook, and the state only for a state SAE."""
    prefix = f"blocks.{layer}.attn."
    skip = ("hook_write", "hook_state") if kind == "write" else ("hook_write",)
    return [n for n in model.hook_dict if n.startswith(prefix + "hook_") and not n.endswith(skip)]


def _input(
    model: ConfiguredModelLike, cache: CacheLike, sae: RankOneSAELike, layer: int
) -> tuple[Tensor, Tensor]:
    """The SAE's input X `[N, d_k, d_v]` at every position of the batch and its codes `[N, n]`."""
    p, head = f"blocks.{layer}.attn", sae.cfg.head
    dt = sae.key_factors.dtype
    if sae.cfg.input_kind == "state":
        x = cache[f"{p}.hook_state"][:, :, head].to(dt).flatten(0, 1)
        return x, sae.encode(x)
    key = cache[f"{p}.hook_k"][:, :, head].to(dt).flatten(0, 1)
    strength = cast(MixerLike, model.blocks[layer].attn).write_strength_hook
    if strength:
        key = key * cache[f"{p}.{strength}"][:, :, head].to(dt).flatten(0, 1)[:, None]
    val = cache[f"{p}.hook_v"][:, :, head].to(dt).flatten(0, 1)
    return key[:, :, None] * val[:, None, :], sae.encode_factors(key, val)


def _fve_terms(sae: RankOneSAELike, x: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """Per-atom increase of the squared error when the atom is removed, `[n]`, and the squared
    error of the full reconstruction (scalar), for one batch."""
    m = max(1, int((codes != 0).sum(-1).max()))
    vals, idx = codes.topk(m, dim=-1)  # codes are >= 0: the nonzero ones come first
    resid = (x - sae.decode_sparse(vals, idx)).double()
    u, w = sae.key_factors.double()[idx], sae.value_factors.double()[idx]  # [N, m, d]
    inner = torch.einsum("njk,nkv,njv->nj", u, resid, w)  # <R_t, u_j w_j^T>
    norm2 = u.pow(2).sum(-1) * w.pow(2).sum(-1)
    v = vals.double()
    drop = torch.zeros(codes.shape[-1], dtype=torch.float64)
    drop.index_add_(0, idx.flatten(), (2 * v * inner + v * v * norm2).flatten())
    return drop, resid.pow(2).sum()


def _keep_top(best: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], m: int):
    """Merge running (value `[n, m]`, position `[n, m]`) with a batch's, keeping the m largest
    |value| per row."""
    vals = torch.cat([best[0], new[0]], 1)
    pos = torch.cat([best[1], new[1]], 1)
    top = vals.abs().topk(min(m, vals.shape[1]), dim=1).indices
    return vals.gather(1, top), pos.gather(1, top)


@torch.no_grad()
def corpus_pass(
    model: ConfiguredModelLike,
    sae: RankOneSAELike,
    tokens: Int[Tensor, "n_seq pos"],
    n_reads: int = 8,
    batch_tokens: int = 8192,
) -> CorpusStats:
    """Run the model over `tokens` once (in batches of about `batch_tokens` tokens) and gather
    the dashboard's corpus statistics (see `CorpusStats`)."""
    layer, head = sae_layer(sae), sae.cfg.head
    p = f"blocks.{layer}.attn"
    n_seq, T = tokens.shape
    n, vocab = sae.key_factors.shape[0], model.cfg.d_vocab
    u = sae.key_factors.detach().float()
    u_unit = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    names = _names(model, layer, sae.cfg.input_kind)
    rows = max(1, batch_tokens // T)
    pos, atom, value, trans = [], [], [], []
    drop = torch.zeros(n, dtype=torch.float64)
    sse = torch.zeros((), dtype=torch.float64)
    sum_x: float | Tensor = 0.0  # a tensor [d_k, d_v] once a batch has run
    sum_x2 = torch.zeros((), dtype=torch.float64)
    key_sum = torch.zeros(vocab, n)
    key_count = torch.zeros(vocab)
    best = (torch.zeros(n, 0), torch.zeros(n, 0, dtype=torch.long))
    for r0 in range(0, n_seq, rows):
        tok = tokens[r0 : r0 + rows]
        _, cache = model.run_with_cache(tok, names_filter=names)
        x, codes = _input(model, cache, sae, layer)
        nz = codes.nonzero()
        pos.append(nz[:, 0] + r0 * T)
        atom.append(nz[:, 1])
        value.append(codes[nz[:, 0], nz[:, 1]].float())
        d, e = _fve_terms(sae, x, codes)
        drop += d
        sse += e
        xd = x.double()
        sum_x = sum_x + xd.sum(0)
        sum_x2 += xd.pow(2).sum()
        k = cache[f"{p}.hook_k"][:, :, head].float().flatten(0, 1)
        cos = (k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ u_unit.T
        key_sum.index_add_(0, tok.flatten(), cos)
        key_count.index_add_(0, tok.flatten(), torch.ones(tok.numel()))
        reads = cache[f"{p}.hook_q"][:, :, head].float().flatten(0, 1) @ u.T  # [N, n]
        top = reads.abs().topk(min(n_reads, reads.shape[0]), dim=0).indices.T  # [n, m]
        best = _keep_top(best, (reads.T.gather(1, top), top + r0 * T), n_reads)
        cached = {n: cache[n] for n in names}  # a Mapping, as transition_from_cache takes
        trans.append(cast(MixerLike, model.blocks[layer].attn).transition_from_cache(cached, head))
    N = n_seq * T
    tss = float(sum_x2 - (cast(Tensor, sum_x) * sum_x).sum() / N)
    transition = Transition(
        *(
            None if getattr(trans[0], f) is None else torch.cat([getattr(t, f) for t in trans])
            for f in ("decay", "erase_a", "erase_b")
        )
    ).map(lambda t: t[:, :, None])
    return CorpusStats(
        tokens=tokens,
        pos=torch.cat(pos),
        atom=torch.cat(atom),
        value=torch.cat(value),
        fve_drop=drop / max(tss, 1e-300),
        fve=1.0 - float(sse) / max(tss, 1e-300),
        key_sum=key_sum,
        key_count=key_count,
        read_value=best[0],
        read_pos=best[1],
        transition=transition,
    )
