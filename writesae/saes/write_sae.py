"""WriteSAE: a sparse autoencoder whose decoder atoms are rank-1 outer products ``u_i w_i^T``.

Decoder (paper section 2 and Table 10, arXiv 2605.12770)::

    X_hat = sum_i c_i u_i w_i^T + B_dec,     ||u_i|| = ||w_i|| = 1  (so ||u_i w_i^T||_F = 1)

with encoder either the bilinear matched filter ``p_i = e_i^T X f_i + b_i`` or a dense one
``p_i = <E_i, X>_F + b_i``. When ``X = k v^T`` is a write, :meth:`WriteSAE.encode_factors` and
:meth:`WriteSAE.factor_sq_error` work on ``(k, v)`` and never build a ``d_k x d_v`` matrix
(:mod:`writesae.factor_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_recurrent.memory import scratch
from writesae.config import WriteSAEConfig
from writesae.factor_loss import SelectedBilinear, TopKFactorLoss, rank1_sq_error, rows
from writesae.saes.base import BaseSAE, SAEOutput

__all__ = ["WriteSAE"]


class WriteSAE(BaseSAE):
    """Sparse autoencoder with rank-1 decoder atoms ``A_i = u_i w_i^T``.

    Parameters (SAELens-style names):
        W_dec_key [n_atoms, d_k]: ``u_i`` (key side, unit norm).
        W_dec_value [n_atoms, d_v]: ``w_i`` (value side, unit norm).
        b_dec [d_k, d_v]: decoder bias (if ``cfg.decoder_bias``).
        W_enc_key [n_atoms, d_k], W_enc_value [n_atoms, d_v]: ``e_i, f_i`` (bilinear encoder;
            initialised equal to the decoder factors, never renormalised, as in the reference
            code).
        W_enc [d_k * d_v, n_atoms]: dense encoder (if ``cfg.encoder == 'dense'``).
        b_enc [n_atoms]: encoder bias.

    Example:
        >>> cfg = WriteSAEConfig(d_k=8, d_v=4, n_atoms=16, k=2,
        ...                      hook_name="blocks.0.attn.hook_write", head=0)
        >>> sae = WriteSAE(cfg)
        >>> sae.encode(torch.randn(3, 8, 4)).shape
        torch.Size([3, 16])
    """

    kind = "write"

    def __init__(self, cfg: WriteSAEConfig, seed: int | None = None):
        super().__init__(cfg)
        dt = getattr(torch, cfg.dtype)
        u, w = self._random_unit_rows(seed, cfg.d_k, cfg.d_v)
        self.W_dec_key = nn.Parameter(u.to(dt))
        self.W_dec_value = nn.Parameter(w.to(dt))
        if cfg.encoder == "bilinear":
            # tied initialisation: the matched filter starts at the atom it detects
            self.W_enc_key = nn.Parameter(u.to(dt).clone())
            self.W_enc_value = nn.Parameter(w.to(dt).clone())
        else:
            atoms = (u[:, :, None] * w[:, None, :]).reshape(cfg.n_atoms, cfg.d_in)
            # registered by name: `W_enc` is also a property (the bilinear encoder's dense form)
            self.register_parameter("W_enc", nn.Parameter(atoms.T.contiguous().to(dt)))
        self._init_biases()

    @property
    def key_factors(self) -> Float[Tensor, "n_atoms d_k"]:
        """Key-side decoder factors ``u_i`` (rows), meeting the read query."""
        return self.W_dec_key

    @property
    def W_dec(self) -> Float[Tensor, "n_atoms d_k d_v"]:
        """The decoder atoms ``A_i = u_i w_i^T`` (SAELens's ``W_dec``; ``W_dec.flatten(1)`` is
        SAELens's ``[d_sae, d_in]`` layout). Computed from the factors; train those."""
        return self.W_dec_key[:, :, None] * self.W_dec_value[:, None, :]

    @property
    def W_enc(self) -> Float[Tensor, "d_in n_atoms"]:
        """The encoder as SAELens lays it out, ``pre = vec(X) @ W_enc + b_enc``: the dense
        parameter, or for the bilinear encoder ``vec(e_i f_i^T)`` as columns (computed)."""
        if "W_enc" in self._parameters:
            return self._parameters["W_enc"]
        e, f = self.W_enc_key, self.W_enc_value
        return (e[:, :, None] * f[:, None, :]).reshape(self.cfg.n_atoms, -1).T

    @property
    def value_factors(self) -> Float[Tensor, "n_atoms d_v"]:
        """Value-side decoder factors ``w_i`` (rows), read out through W_O."""
        return self.W_dec_value

    def pre_acts(self, x: Float[Tensor, "... d_k d_v"]) -> Float[Tensor, "... n_atoms"]:
        """``p_i = e_i^T X f_i + b_i`` (bilinear) or ``<E_i, X>_F + b_i`` (dense)."""
        x = x.to(self.b_enc.dtype)
        if self.cfg.encoder == "bilinear":
            # <X, e_i f_i^T>_F as one GEMM per block of atoms: building the rank-1 filters costs
            # n d_k d_v once per batch and avoids an [..., d_k, n_atoms] intermediate.
            flat = x.reshape(-1, self.cfg.d_in)
            block = max(1, 2**22 // self.cfg.d_in)
            parts = []
            for s in range(0, self.cfg.n_atoms, block):
                e, f = self.W_enc_key[s : s + block], self.W_enc_value[s : s + block]
                filt = (e[:, :, None] * f[:, None, :]).reshape(e.shape[0], -1)
                parts.append(flat @ filt.T)
            pre = torch.cat(parts, -1).reshape(*x.shape[:-2], self.cfg.n_atoms)
            return pre + self.b_enc
        return x.flatten(-2) @ self.W_enc + self.b_enc

    def pre_acts_factors(
        self, key: Float[Tensor, "... d_k"], value: Float[Tensor, "... d_v"]
    ) -> Float[Tensor, "... n_atoms"]:
        """For ``X = k v^T``: ``p_i = (e_i . k)(f_i . v) + b_i``, O(n (d_k + d_v)) per sample."""
        if self.cfg.encoder != "bilinear":
            return super().pre_acts_factors(key, value)
        dt = self.b_enc.dtype
        return (key.to(dt) @ self.W_enc_key.T) * (value.to(dt) @ self.W_enc_value.T) + self.b_enc

    def pre_acts_at(
        self, x: Float[Tensor, "*b d_k d_v"], idx: Int[Tensor, "*b m"]
    ) -> Float[Tensor, "*b m"]:
        """Pre-activations of the listed atoms only (`p_{b, idx[b, j]}`)."""
        x = x.to(self.b_enc.dtype)
        if self.cfg.encoder == "bilinear":
            ex = rows(self.W_enc_key, idx) @ x  # [*b, m, d_v] = e_j^T X
            return (ex * rows(self.W_enc_value, idx)).sum(-1) + rows(self.b_enc, idx)
        w_rows = self.W_enc.T[idx]  # [*b, m, d_in]
        return (w_rows @ x.flatten(-2)[..., :, None]).squeeze(-1) + rows(self.b_enc, idx)

    def pre_acts_factors_at(
        self, key: Float[Tensor, "*b d_k"], value: Float[Tensor, "*b d_v"], idx: Int[Tensor, "*b m"]
    ) -> Float[Tensor, "*b m"]:
        """Pre-activations of the listed atoms for `X = key value^T`, from the factors."""
        if self.cfg.encoder != "bilinear":
            return super().pre_acts_factors_at(key, value, idx)
        dt = self.b_enc.dtype
        # multiply-and-sum, not a batched mat-vec: bmm with a width-1 operand is slow on CPU
        ek = (rows(self.W_enc_key, idx) * key.to(dt)[..., None, :]).sum(-1)
        fv = (rows(self.W_enc_value, idx) * value.to(dt)[..., None, :]).sum(-1)
        return ek * fv + rows(self.b_enc, idx)

    def _factor_pre_acts(
        self, key: Tensor, value: Tensor
    ) -> tuple[Callable[[], Tensor], Callable[[Tensor], Tensor]]:
        """As the base class; for the bilinear encoder the products ``k . e_i`` and ``v . f_i`` of
        a no-grad full pass are kept, and the listed atoms are read from them with gradients
        written by hand (:class:`SelectedBilinear`): sparse-times-dense products in the backward
        pass instead of gathering ``[..., m, d]`` rows of both encoder tables."""
        if self.cfg.encoder != "bilinear":
            return super()._factor_pre_acts(key, value)
        dt = self.b_enc.dtype
        key, value = key.to(dt), value.to(dt)
        kept: dict[str, Tensor] = {}

        def full() -> Tensor:
            pk, pv = key @ self.W_enc_key.T, value @ self.W_enc_value.T
            if not torch.is_grad_enabled():
                kept["pk"], kept["pv"] = pk, pv
            return torch.addcmul(self.b_enc, pk, pv)

        def at(idx: Tensor) -> Tensor:
            if "pk" not in kept:
                return self.pre_acts_factors_at(key, value, idx)
            return SelectedBilinear.apply(
                idx,
                kept["pk"],
                kept["pv"],
                key,
                value,
                self.W_enc_key,
                self.W_enc_value,
                self.b_enc,
            )

        return full, at

    def atom_matrices(self, idx: Int[Tensor, "..."]) -> Float[Tensor, "... d_k d_v"]:
        """Atoms `u_i w_i^T` as `d_k x d_v` matrices."""
        return rows(self.W_dec_key, idx)[..., :, None] * rows(self.W_dec_value, idx)[..., None, :]

    def bias_inner(self) -> Float[Tensor, " n_atoms"] | None:
        """``u_i^T B_dec w_i`` for every atom (None without a decoder bias); O(n d_k d_v) once."""
        if self.b_dec is None:
            return None
        return ((self.W_dec_key @ self.b_dec) * self.W_dec_value).sum(-1)

    def decode_sparse(
        self, values: Float[Tensor, "... m"], indices: Int[Tensor, "... m"], bias: bool = True
    ) -> Float[Tensor, "... d_k d_v"]:
        """``X_hat = U_S^T diag(c_S) W_S (+ B_dec)`` over the listed atoms S."""
        u = rows(self.W_dec_key, indices)  # [..., m, d_k]
        w = rows(self.W_dec_value, indices)  # [..., m, d_v]
        out = (values[..., None] * u).transpose(-1, -2) @ w
        if bias and self.b_dec is not None:
            out = out + self.b_dec
        return out

    def factor_sq_error(
        self,
        key: Float[Tensor, "... d_k"],
        value: Float[Tensor, "... d_v"],
        out: SAEOutput | None = None,
    ) -> Float[Tensor, "..."]:
        """Per-sample ``||k v^T - X_hat||_F^2`` from inner products only.

        With ``X_hat = sum_j c_j u_j w_j^T + B`` over the m active atoms::

            ||k v^T - X_hat||^2 = |k|^2 |v|^2 - 2 sum_j c_j (k.u_j)(v.w_j)
                                  + c^T (G_u * G_w) c             (G_u = U_S U_S^T, G_w = W_S W_S^T)
                                  - 2 k^T B v + 2 sum_j c_j u_j^T B w_j + ||B||^2

        Cost O(m^2 (d_k + d_v) + d_k d_v) per sample instead of O(m d_k d_v).
        """
        out = self.run_factors(key, value) if out is None else out
        if out.values is None:
            nnz = max(1, int((out.codes != 0).sum(-1).max().item()))
            _, idx = out.codes.abs().topk(min(nnz, self.cfg.n_atoms), dim=-1)
            vals = out.codes.gather(-1, idx)
        else:
            vals, idx = out.values, out.indices
        ubw = self.bias_inner()
        ubw = None if ubw is None else rows(ubw, idx)
        return rank1_sq_error(
            key, value, vals, idx, self.W_dec_key, self.W_dec_value, self.b_dec, ubw
        )

    def factor_loss(
        self, key: Float[Tensor, "... d_k"], value: Float[Tensor, "... d_v"]
    ) -> tuple[SAEOutput, Float[Tensor, "..."]]:
        """As the base class. With the bilinear encoder, TopK and autograd on (training), the
        selected codes and the error are one autograd function (:class:`TopKFactorLoss`) with the
        same values and gradients and fewer, larger operations (``benchmarks/sae_train.py``)."""
        fused = (
            self.cfg.encoder == "bilinear"
            and self.cfg.activation == "topk"
            and torch.is_grad_enabled()
            and key.dim() == 2
        )
        if not fused:
            return super().factor_loss(key, value)
        dt = self.b_enc.dtype
        key, value = key.to(dt), value.to(dt)
        with torch.no_grad():  # k.e_i and v.f_i are only read by the function (reused memory)
            shape = (len(key), self.cfg.n_atoms)
            pk = torch.mm(key, self.W_enc_key.T, out=scratch.get(shape, key, "pk"))
            pv = torch.mm(value, self.W_enc_value.T, out=scratch.get(shape, value, "pv"))
            pre = torch.addcmul(self.b_enc, pk, pv)
            idx = pre.topk(self.cfg.k, dim=-1).indices
        vals, err = TopKFactorLoss.apply(
            key, value, idx, pk, pv, self.b_enc, self.W_dec_key, self.W_dec_value, self.b_dec,
            self.W_enc_key, self.W_enc_value,
        )  # fmt: skip
        # cancellation can push a tiny true error slightly negative
        return SAEOutput(None, None, pre, vals, idx), err.clamp_min(0.0)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale `u_i` and `w_i` to unit norm, so every atom has unit Frobenius norm."""
        for t in (self.W_dec_key, self.W_dec_value):
            t.div_(torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min_(1e-12))
