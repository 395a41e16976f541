"""The squared error of rank-1 writes and its gradients, from the writes' factors.

A write ``X = k v^T`` against its reconstruction ``X_hat = sum_j c_j u_j w_j^T + B`` over a
sample's active atoms: the error is computed from inner products only (stacked Gram matrices,
:class:`StackedGrams`), never from a ``d_k x d_v`` matrix per sample, and the gradients are written
by hand, with the sums into the ``[n_atoms, d]`` parameter tables done as one sparse (CSR) times
dense product per table (:class:`Selection`). Three autograd functions use them:

* :class:`SelectedBilinear`: the selected pre-activations ``p_bj = (k_b.e_j)(v_b.f_j) + b_j``;
* :class:`Rank1SqError`: ``||k v^T - sum_j c_j u_j w_j^T||_F^2`` (:func:`rank1_sq_error` adds
  the bias terms);
* :class:`TopKFactorLoss`: TopK codes and the squared error of their reconstruction, one function.

Beside each is its plain reference (:func:`naive_selected_bilinear`, :func:`naive_rank1_sq_error`,
:func:`naive_topk_factor_loss`): the same quantity written densely with ordinary autograd, slow and
obviously right; the tests hold the fast functions to them, values and gradients.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_recurrent.memory import scratch

__all__ = [
    "rows",
    "vecdot",
    "rank1_sq_error",
    "Selection",
    "StackedGrams",
    "SelectedBilinear",
    "Rank1SqError",
    "TopKFactorLoss",
    "encoder_grads",
    "aux_rank1_sq_error",
    "naive_selected_bilinear",
    "naive_rank1_sq_error",
    "naive_topk_factor_loss",
]


def rows(t: Tensor, idx: Tensor) -> Tensor:
    """``t[idx]`` for a parameter table ``t`` [n, ...] (index_select, which is faster than
    advanced indexing on CPU, forward and backward)."""
    return t.index_select(0, idx.reshape(-1)).view(*idx.shape, *t.shape[1:])


def rank1_sq_error(
    key: Float[Tensor, "*b d_k"],
    value: Float[Tensor, "*b d_v"],
    coef: Float[Tensor, "*b m"],
    idx: Int[Tensor, "*b m"],
    u: Float[Tensor, "n d_k"],
    w: Float[Tensor, "n d_v"],
    bias: Float[Tensor, "d_k d_v"] | None = None,
    ubw: Float[Tensor, "*b m"] | None = None,
) -> Float[Tensor, "*b"]:
    """``||k v^T - sum_j coef_j u_{idx_j} w_{idx_j}^T - bias||_F^2`` per sample, via Gram matrices.

    ``u`` and ``w`` are the decoder tables and ``idx`` lists each sample's atoms. The expansion is
    written out in :meth:`writesae.WriteSAE.factor_sq_error`; no ``d_k x d_v`` matrix is formed
    per sample (``bias`` is shared by the batch, so ``B v`` costs one matmul). ``ubw`` [*b, m] =
    ``u_j^T bias w_j`` if precomputed per atom (else computed per sample). The rest is one
    autograd function with a hand-written backward (:class:`Rank1SqError`).
    """
    dt = coef.dtype
    key, value = key.to(dt), value.to(dt)
    lead = coef.shape[:-1]
    m = coef.shape[-1]
    err = Rank1SqError.apply(
        key.reshape(-1, key.shape[-1]),
        value.reshape(-1, value.shape[-1]),
        coef.reshape(-1, m),
        idx.reshape(-1, m),
        u,
        w,
    ).reshape(lead)
    if bias is not None:
        if ubw is None:
            ubw = ((rows(u, idx) @ bias) * rows(w, idx)).sum(-1)  # [*b, m]: u_j^T B w_j
        bv = value @ bias.T  # [*b, d_k] = B v
        err = err - 2 * (key * bv).sum(-1) + 2 * (coef * ubw).sum(-1) + bias.pow(2).sum()
    # cancellation can push a tiny true error slightly negative
    return err.clamp_min(0.0)


class Selection:
    """The atoms each sample selected (``idx`` [B, m]), sorted by atom once, as the row pointers of
    sparse ``[n_atoms, ...]`` matrices: a sum over the samples that selected each atom becomes one
    sparse (CSR) times dense product, and one sort serves all the sums of a backward pass."""

    _warned = False

    def __init__(self, idx: Tensor, n: int):
        self.flat = idx.reshape(-1)
        self.n, self.m = n, idx.shape[-1]
        if self.flat.device.type == "cpu" and n <= np.iinfo(np.int16).max:
            # numpy's stable sort of 16-bit keys is a radix sort, faster than torch.argsort
            keys = self.flat.numpy().astype(np.int16)
            self.order = torch.from_numpy(np.argsort(keys, kind="stable"))
        else:
            self.order = torch.argsort(self.flat, stable=True)
        # 32-bit indices where they fit: the sparse kernels take them without a conversion
        self.itype = torch.int32 if len(self.flat) * (self.m + 1) < 2**31 else torch.long
        self.crow = torch.zeros(n + 1, dtype=self.itype, device=idx.device)
        torch.cumsum(torch.bincount(self.flat, minlength=n), 0, out=self.crow[1:])
        self.sample = torch.div(self.order, self.m, rounding_mode="floor").to(self.itype)
        self._slots: dict[int, Tensor] = {}

    def _product(self, cols: Tensor, vals: Tensor, x: Tensor, name: str = "") -> Tensor:
        dtype = x.dtype
        if dtype not in (torch.float32, torch.float64):  # the sparse kernels take these only:
            vals, x = vals.float(), x.float()  # sum in float32, round at the end
        args = (self.crow, cols, vals, (self.n, len(x)))
        if Selection._warned:
            mat = torch.sparse_csr_tensor(*args, check_invariants=False)
        else:  # torch warns once per process that its CSR support is in beta
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                mat = torch.sparse_csr_tensor(*args, check_invariants=False)
            Selection._warned = True
        if not name:
            return (mat @ x).to(dtype)
        out = scratch.get((self.n, x.shape[-1]), x, name)
        return torch.mm(mat, x, out=out).to(dtype)

    def per_sample(
        self, coef: Float[Tensor, "B m"], x: Float[Tensor, "B d"], name: str = ""
    ) -> Tensor:
        """``out_i = sum_{(b, j): idx_bj = i} coef_bj x_b``, [n_atoms, d] (into the reused memory
        called ``name``, if given)."""
        return self._product(self.sample, coef.reshape(-1)[self.order], x, name)

    def per_slot(self, x: Float[Tensor, "B r d"], name: str = "") -> Tensor:
        """``out_i = sum_{(b, j): idx_bj = i} x_{b, r - m + j}``, [n_atoms, d]: the last m of the r
        rows of each sample are its atoms' rows (into the reused memory ``name``, if given)."""
        r = x.shape[1]
        if r not in self._slots:  # column of each (sorted) selection in x's rows
            self._slots[r] = (self.order + (self.sample.long() + 1) * (r - self.m)).to(self.itype)
        ones = torch.ones(len(self.order), dtype=x.dtype, device=x.device)
        return self._product(self._slots[r], ones, x.reshape(-1, x.shape[-1]), name)

    def per_atom(self, coef: Float[Tensor, "B m"]) -> Float[Tensor, " n"]:
        """``out_i = sum_{(b, j): idx_bj = i} coef_bj``, [n_atoms]."""
        weights = coef.reshape(-1)
        if weights.dtype not in (torch.float32, torch.float64):
            weights = weights.float()
        return torch.bincount(self.flat, weights, minlength=self.n).to(coef.dtype)


def vecdot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b) over the last axis."""
    return (a * b).sum(-1)


class StackedGrams:
    """The squared error of a rank-1 write against its reconstruction, as stacked Gram matrices.

    Each sample's key is stacked on its atoms' rows, ``P = [k; U_S]``, and likewise ``Q = [v; W_S]``
    ([B, 1 + m, d], gathered in one pass from the table with the batch's keys appended, into reused
    memory). With ``sigma = [1, -c_1, ..., -c_m]`` and ``H = (P P^T) * (Q Q^T)``::

        sigma^T H sigma = |k|^2 |v|^2 - 2 sum_j c_j (k.u_j)(v.w_j) + c^T (G_u * G_w) c
                        = ||k v^T - sum_j c_j u_j w_j^T||_F^2

    and, with ``s`` the incoming gradient times two::

        de/dc_j = -2 (H sigma)_j                 (j >= 1)
        [dk; dU_S] = s ((sigma sigma^T) * Q Q^T) P,    [dv; dW_S] = s ((sigma sigma^T) * P P^T) Q

    (the second: ``de/du_j = -2 c_j b_j k + 2 c_j sum_i c_i (G_w)_ij u_i``, ``de/dk = 2 |v|^2 k -
    2 sum_j c_j b_j u_j``). Per sample: two Gram matrices forward, two ``(1 + m)``-square by
    ``(1 + m) x d`` products backward.
    """

    def __init__(self, key: Tensor, value: Tensor, coef: Tensor, idx: Tensor, u: Tensor, w: Tensor):
        B, m = idx.shape
        n = u.shape[0]
        rows_ = torch.cat((torch.arange(n, n + B, device=idx.device)[:, None], idx), 1).reshape(-1)
        self.P = torch.index_select(
            torch.cat((u, key)), 0, rows_, out=scratch.get((len(rows_), u.shape[1]), u, "P")
        ).view(B, 1 + m, -1)
        self.Q = torch.index_select(
            torch.cat((w, value)), 0, rows_, out=scratch.get((len(rows_), w.shape[1]), w, "Q")
        ).view(B, 1 + m, -1)
        self.gp = torch.bmm(self.P, self.P.transpose(1, 2))
        self.gq = torch.bmm(self.Q, self.Q.transpose(1, 2))
        self.sigma = torch.cat((torch.ones_like(coef[:, :1]), -coef), 1)
        self.h_sigma = vecdot(self.gp * self.gq, self.sigma[:, None, :])  # [B, 1 + m]
        self.err = vecdot(self.sigma, self.h_sigma)

    def saved(self) -> tuple[Tensor, ...]:
        """What the backward pass needs (for ``ctx.save_for_backward``)."""
        return self.P, self.Q, self.gp, self.gq, self.sigma, self.h_sigma

    @staticmethod
    def d_coef(s: Tensor, h_sigma: Tensor) -> Tensor:
        """``s de/dc`` [B, m]."""
        return -s * h_sigma[:, 1:]

    @staticmethod
    def side(s: Tensor, sigma: Tensor, rows_: Tensor, other_gram: Tensor, key_row: bool) -> Tensor:
        """``s [dk; dU_S]`` for ``rows_ = P`` and ``other_gram = Q Q^T`` (or the value side; just
        ``s dU_S`` without ``key_row``), in reused memory: drop it before the next call."""
        sigma_rows = sigma if key_row else sigma[:, 1:]
        m = sigma_rows.shape[1]
        r = scratch.get((len(rows_), m, sigma.shape[1]), rows_, "R")
        torch.mul(other_gram[:, -m:], (s * sigma_rows)[:, :, None], out=r).mul_(sigma[:, None, :])
        return torch.bmm(r, rows_, out=scratch.get((len(rows_), m, rows_.shape[-1]), rows_, "dP"))

    @staticmethod
    def decoder_sides(
        s: Tensor,
        sigma: Tensor,
        PQ: tuple[Tensor, Tensor],
        grams: tuple[Tensor, Tensor],
        sel: Selection,
        need: tuple[bool, bool, bool, bool],
        names: tuple[str, str] = ("", ""),
        base: tuple[Tensor | None, Tensor | None] = (None, None),
    ) -> tuple[Tensor | None, ...]:
        """``(s dk, s dU, s dv, s dW)`` from :meth:`side` on the key side (``P`` with ``Q Q^T``)
        then the value side, each None where ``need`` (same order) says so: ``dk``, ``dv`` added
        to ``base`` if given; ``dU``, ``dW`` summed into the tables (into the reused memory
        ``names``, if given)."""
        gp, gq = grams
        out: list[Tensor | None] = []
        for rows_, other, need_row, need_table, name, b in zip(
            PQ, (gq, gp), need[::2], need[1::2], names, base, strict=True
        ):
            d_row = d_table = None
            if need_row or need_table:
                d = StackedGrams.side(s, sigma, rows_, other, key_row=need_row)
                if need_row:
                    d_row = d[:, 0].clone() if b is None else b + d[:, 0]
                d_table = sel.per_slot(d, name) if need_table else None
                del d  # its memory is reused by the value side
            out += [d_row, d_table]
        return tuple(out)


class SelectedBilinear(torch.autograd.Function):
    """``p_{b, idx_bj} = (k_b . e_j)(v_b . f_j) + b_j`` read from the kept full products.

    Gradients, with ``g`` the output gradient::

        de_j = sum_b g_bj (v_b . f_j) k_b     df_j = sum_b g_bj (k_b . e_j) v_b
        dk_b = sum_j g_bj (v_b . f_j) e_j     dv_b = sum_j g_bj (k_b . e_j) f_j
        db_j = sum_b g_bj

    the table gradients as sparse-times-dense products (:class:`Selection`).
    """

    @staticmethod
    def forward(ctx, idx, pk, pv, key, value, enc_key, enc_value, bias):  # noqa: D102
        """The selected pre-activations (see the class docstring)."""
        pk_s, pv_s = pk.gather(-1, idx), pv.gather(-1, idx)
        ctx.save_for_backward(idx, pk_s, pv_s, key, value, enc_key, enc_value)
        ctx.n = bias.shape[0]
        return torch.addcmul(rows(bias, idx), pk_s, pv_s)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        """The gradients of the inputs, in closed form."""
        idx, pk_s, pv_s, key, value, enc_key, enc_value = ctx.saved_tensors
        lead = idx.shape[:-1]
        grads = encoder_grads(
            ctx.needs_input_grad[3:],
            g.to(pk_s.dtype).reshape(-1, idx.shape[-1]),
            Selection(idx.reshape(-1, idx.shape[-1]), ctx.n),
            pk_s.reshape(-1, idx.shape[-1]),
            pv_s.reshape(-1, idx.shape[-1]),
            key.reshape(-1, key.shape[-1]),
            value.reshape(-1, value.shape[-1]),
            enc_key,
            enc_value,
        )
        d_key, d_value, d_ek, d_ev, d_b = grads
        d_key = None if d_key is None else d_key.view(*lead, -1)
        d_value = None if d_value is None else d_value.view(*lead, -1)
        return None, None, None, d_key, d_value, d_ek, d_ev, d_b


def encoder_grads(
    need: tuple[bool, ...],
    g: Tensor,
    sel: Selection,
    pk_s: Tensor,
    pv_s: Tensor,
    key: Tensor,
    value: Tensor,
    enc_key: Tensor,
    enc_value: Tensor,
) -> tuple[Tensor | None, ...]:
    """(dk, dv, dE, dF, db_enc) of the selected pre-activations ``p = (k.e_j)(v.f_j) + b_j``
    given their gradient ``g`` [B, m] (:class:`SelectedBilinear`); ``need`` flags which."""
    gv, gk = g * pv_s, g * pk_s  # g (v . f_j), g (k . e_j)

    def per_sample_rows(coef: Tensor, table: Tensor) -> Tensor:  # sum_j coef_bj table_{idx_bj}
        return vecdot(coef[:, None, :], rows(table, sel.flat.view(g.shape)).transpose(1, 2))

    return (
        per_sample_rows(gv, enc_key) if need[0] else None,
        per_sample_rows(gk, enc_value) if need[1] else None,
        sel.per_sample(gv, key, "dE") if need[2] else None,
        sel.per_sample(gk, value, "dF") if need[3] else None,
        sel.per_atom(g) if need[4] else None,
    )


class Rank1SqError(torch.autograd.Function):
    """``||k v^T - sum_j c_j u_j w_j^T||_F^2`` per sample with hand-written gradients: the stacked
    Gram form of :class:`StackedGrams`, then one sparse product per side sums the atoms' rows into
    the table (:class:`Selection`)."""

    @staticmethod
    def forward(ctx, key, value, coef, idx, u, w):  # noqa: D102
        """The squared reconstruction error per sample (see the class docstring)."""
        grams = StackedGrams(key, value, coef, idx, u, w)
        ctx.save_for_backward(idx, *grams.saved())
        ctx.n = u.shape[0]
        return grams.err

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        """The gradients of the inputs, in closed form."""
        idx, P, Q, gp, gq, sigma, h_sigma = ctx.saved_tensors
        need = ctx.needs_input_grad
        s = 2 * g[:, None]  # [B, 1]
        d_coef = StackedGrams.d_coef(s, h_sigma) if need[2] else None
        sel = Selection(idx, ctx.n)
        d_key, d_u, d_value, d_w = StackedGrams.decoder_sides(
            s, sigma, (P, Q), (gp, gq), sel, (need[0], need[4], need[1], need[5])
        )
        return d_key, d_value, d_coef, None, d_u, d_w


class TopKFactorLoss(torch.autograd.Function):
    """TopK codes of the bilinear encoder and the squared error of their reconstruction, for writes
    ``k v^T`` given by their factors: one function with one hand-written backward.

    Per sample, with the m atoms S chosen by TopK (without autograd, from the full products
    ``pk = K E^T`` and ``pv = V F^T``) and decoder bias ``B``::

        p_j = (k.e_j)(v.f_j) + b_enc_j,    c_j = ReLU(p_j)
        err = ||k v^T - sum_j c_j u_j w_j^T||^2 - 2 k^T B v + 2 sum_j c_j u_j^T B w_j + ||B||^2

    the first term in the stacked Gram form (:class:`StackedGrams`). Gradients of the bias terms,
    with ``s = 2 dL/d err`` per sample: ``dc_j += s u_j^T B w_j``, ``du_j += s c_j B w_j``,
    ``dw_j += s c_j B^T u_j``, ``dk -= s B v``, ``dv -= s B^T k``, ``dB = sum_b s (-k v^T +
    sum_j c_j u_j w_j^T + B)``; then ``dL/dp = dL/dc [p > 0]`` flows into the encoder
    (:func:`encoder_grads`). The atoms are sorted once for all the sums into the encoder and
    decoder tables (:class:`Selection`), and autograd sees one node instead of some forty.
    """

    @staticmethod
    def forward(ctx, key, value, idx, pk, pv, b_enc, u, w, b_dec, enc_key, enc_value):  # noqa: D102
        """The codes and the squared error (see the class docstring)."""
        pk_s, pv_s = pk.gather(-1, idx), pv.gather(-1, idx)
        p = torch.addcmul(rows(b_enc, idx), pk_s, pv_s)
        c = torch.relu(p)
        grams = StackedGrams(key, value, c, idx, u, w)
        err, ub, ubw = grams.err, None, None
        if b_dec is not None:
            ub = u @ b_dec  # [n, d_v]: B^T u_i
            ubw = rows(vecdot(ub, w), idx)  # u_j^T B w_j
            err = err + 2 * (vecdot(c, ubw) - vecdot(key, value @ b_dec.T)) + b_dec.pow(2).sum()
        ctx.save_for_backward(
            key, value, idx, pk_s, pv_s, p, c, ub, ubw, u, w, b_dec, enc_key, enc_value,
            *grams.saved(),
        )  # fmt: skip
        ctx.mark_non_differentiable(idx)
        return c, err

    @staticmethod
    def backward(ctx, g_c, g_err):  # noqa: D102
        """The gradients of the inputs, in closed form."""
        (key, value, idx, pk_s, pv_s, p, c, ub, ubw, u, w, b_dec, enc_key, enc_value,
         P, Q, gp, gq, sigma, h_sigma) = ctx.saved_tensors  # fmt: skip
        need = ctx.needs_input_grad
        sel = Selection(idx, u.shape[0])
        s = 2 * g_err[:, None]  # [B, 1]
        d_c = StackedGrams.d_coef(s, h_sigma)
        if ubw is not None:
            d_c = d_c + s * ubw
        if g_c is not None:
            d_c = d_c + g_c
        d_p = d_c * (p > 0)
        enc = encoder_grads(
            (need[0], need[1], need[9], need[10], need[5]), d_p, sel, pk_s, pv_s, key, value,
            enc_key, enc_value,
        )  # fmt: skip
        d_key, d_value, d_ek, d_ev, d_benc = enc
        d_key, d_u, d_value, d_w = StackedGrams.decoder_sides(
            s, sigma, (P, Q), (gp, gq), sel, (need[0], need[6], need[1], need[7]),
            ("dU", "dW"), (d_key, d_value),
        )  # fmt: skip
        d_bdec = None
        if b_dec is not None:
            cs = sel.per_atom(s * c)[:, None]  # [n, 1]: s c_j summed over the batch per atom
            cw = cs * w
            if d_u is not None:
                d_u = d_u.addmm_(cw, b_dec.T)  # + s c_j B w_j
            if d_w is not None:
                d_w = d_w.addcmul_(cs, ub)  # + s c_j B^T u_j
            if need[8]:
                d_bdec = u.T @ cw - key.T @ (s * value) + s.sum() * b_dec
            if d_key is not None:
                d_key = d_key - s * (value @ b_dec.T)
            if d_value is not None:
                d_value = d_value - s * (key @ b_dec)
        return d_key, d_value, None, None, None, d_benc, d_u, d_w, d_bdec, d_ek, d_ev


def aux_rank1_sq_error(
    key: Float[Tensor, "B d_k"],
    value: Float[Tensor, "B d_v"],
    vals: Float[Tensor, "B m"],
    idx: Int[Tensor, "B m"],
    z: Float[Tensor, "B k_aux"],
    zi: Int[Tensor, "B k_aux"],
    dead: Tensor,
    sq_err: Float[Tensor, " B"],
    u: Float[Tensor, "n d_k"],
    w: Float[Tensor, "n d_v"],
    b_dec: Float[Tensor, "d_k d_v"] | None,
) -> Float[Tensor, " B"]:
    """AuxK error ``||e - sum_j z_j A_j||^2`` from factors, ``e = k v^T - X_hat`` detached, with
    ``X_hat = sum_i vals_i u_{idx_i} w_{idx_i}^T + B`` and ``sq_err = ||e||^2``; the aux atoms
    ``zi`` (codes ``z``) are among the ``dead`` ones [n] (bool).

    Expanded as ``||e||^2 - 2 <e, D> + ||D||^2`` with ``||e||^2`` = the main error and::

        <e, D> = sum_j z_j [ (k.u_j)(v.w_j) - u_j^T B w_j - sum_i c_i (u_i.u_j)(w_i.w_j) ]
        ||D||^2 = z^T (G_u * G_w) z      over the aux atoms j

    The Gram matrices are built once per batch over the dead atoms (and active x dead), then
    gathered per sample, so the cost does not grow as k_aux^2 (d_k + d_v) per sample.
    """
    n = u.shape[0]
    dead_idx = dead.nonzero().squeeze(-1)
    slot = torch.full((n,), -1, dtype=torch.long)
    slot[dead_idx] = torch.arange(dead_idx.numel())
    zs = slot[zi]  # positions of the aux atoms among the dead ones
    ud, wd = u[dead_idx], w[dead_idx]
    g_dead = (ud @ ud.T) * (wd @ wd.T)  # [n_dead, n_dead], live
    g_cross = (u.detach() @ ud.T) * (w.detach() @ wd.T)  # [n, n_dead], active side detached
    dt = z.dtype
    k, v = key.to(dt), value.to(dt)
    kv = (k @ ud.T) * (v @ wd.T)  # [B, n_dead]: (k.u_j)(v.w_j)
    ed = kv.gather(-1, zs)
    if b_dec is not None:
        # B is detached in e; the aux atom side u_j, w_j stays live
        ubw_live = ((u @ b_dec.detach()) * w).sum(-1)
        ed = ed - ubw_live[zi]
    cross = g_cross[idx]  # [B, m, n_dead]
    cross = cross.gather(-1, zs[:, None, :].expand(-1, idx.shape[-1], -1))  # [B, m, k_aux]
    ed = ed - (vals.detach()[:, :, None] * cross).sum(1)
    gz = g_dead[zs[:, :, None], zs[:, None, :]]  # [B, k_aux, k_aux]
    quad = (gz * z[:, :, None] * z[:, None, :]).sum((-2, -1))
    return (sq_err.detach() - 2 * (z * ed).sum(-1) + quad).clamp_min(0.0)


# ------------------------------------------------------------------ plain references


def naive_selected_bilinear(
    idx: Int[Tensor, "B m"],
    key: Float[Tensor, "B d_k"],
    value: Float[Tensor, "B d_v"],
    enc_key: Float[Tensor, "n d_k"],
    enc_value: Float[Tensor, "n d_v"],
    bias: Float[Tensor, " n"],
) -> Float[Tensor, "B m"]:
    """:class:`SelectedBilinear` written out: ``p_bj = (k_b . e_j)(v_b . f_j) + b_j``."""
    ek = (enc_key[idx] * key[:, None, :]).sum(-1)
    fv = (enc_value[idx] * value[:, None, :]).sum(-1)
    return ek * fv + bias[idx]


def naive_rank1_sq_error(
    key: Float[Tensor, "B d_k"],
    value: Float[Tensor, "B d_v"],
    coef: Float[Tensor, "B m"],
    idx: Int[Tensor, "B m"],
    u: Float[Tensor, "n d_k"],
    w: Float[Tensor, "n d_v"],
    bias: Float[Tensor, "d_k d_v"] | None = None,
) -> Float[Tensor, " B"]:
    """:func:`rank1_sq_error` written out: build ``k v^T`` and the reconstruction as matrices."""
    recon = torch.einsum("bj,bjk,bjv->bkv", coef, u[idx], w[idx])
    if bias is not None:
        recon = recon + bias
    return (key[:, :, None] * value[:, None, :] - recon).pow(2).sum((1, 2))


def naive_topk_factor_loss(
    key: Float[Tensor, "B d_k"],
    value: Float[Tensor, "B d_v"],
    idx: Int[Tensor, "B m"],
    b_enc: Float[Tensor, " n"],
    u: Float[Tensor, "n d_k"],
    w: Float[Tensor, "n d_v"],
    b_dec: Float[Tensor, "d_k d_v"] | None,
    enc_key: Float[Tensor, "n d_k"],
    enc_value: Float[Tensor, "n d_v"],
) -> tuple[Float[Tensor, "B m"], Float[Tensor, " B"]]:
    """:class:`TopKFactorLoss` written out: codes ``c = ReLU(p)`` of the listed atoms and the
    squared error of their reconstruction (the arguments of ``TopKFactorLoss.apply`` without the
    kept products ``pk``, ``pv``)."""
    c = torch.relu(naive_selected_bilinear(idx, key, value, enc_key, enc_value, b_enc))
    return c, naive_rank1_sq_error(key, value, c, idx, u, w, b_dec)
