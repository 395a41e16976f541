"""FlatSAE: the vector baseline, a TopK SAE on ``vec(X)`` with the WriteSAE's config and API."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from writesae.config import WriteSAEConfig
from writesae.factor_loss import rows
from writesae.saes.base import BaseSAE, unit_rows

__all__ = ["FlatSAE"]


class FlatSAE(BaseSAE):
    """Vector baseline on ``vec(X)`` (row-major): dense encoder, dense decoder columns.

    ``p = W_enc^T vec(X) + b_enc``, ``vec(X_hat) = W_dec^T c + b_dec`` with unit-norm decoder rows
    (each atom a unit-Frobenius ``d_k x d_v`` matrix). Same config, trainer and hook API as
    :class:`WriteSAE`; ``cfg.kind`` must be ``'flat'``.
    """

    kind = "flat"

    def __init__(self, cfg: WriteSAEConfig, seed: int | None = None):
        super().__init__(cfg)
        dt = getattr(torch, cfg.dtype)
        (dec,) = self._random_unit_rows(seed, cfg.d_in)
        self.W_dec = nn.Parameter(dec.to(dt))
        self.W_enc = nn.Parameter(dec.T.contiguous().to(dt))
        self._init_biases()

    @staticmethod
    def matched_n_atoms(cfg: WriteSAEConfig) -> int:
        """Atoms of a FlatSAE whose parameter count is closest to a WriteSAE with ``cfg``.

        Parameter counts (paper Table 10): bilinear WriteSAE ``2n(d_k+d_v) + n + d_k d_v``,
        FlatSAE ``2 n d_in + n + d_in`` (bias terms only if ``decoder_bias``).
        """
        per_write = 2 * (cfg.d_k + cfg.d_v) + 1
        if cfg.encoder == "dense":
            per_write = cfg.d_in + cfg.d_k + cfg.d_v + 1
        return max(1, round(cfg.n_atoms * per_write / (2 * cfg.d_in + 1)))

    def pre_acts(self, x: Float[Tensor, "... d_k d_v"]) -> Float[Tensor, "... n_atoms"]:
        """`p = vec(X) W_enc + b_enc`."""
        return x.to(self.b_enc.dtype).flatten(-2) @ self.W_enc + self.b_enc

    def pre_acts_at(
        self, x: Float[Tensor, "*b d_k d_v"], idx: Int[Tensor, "*b m"]
    ) -> Float[Tensor, "*b m"]:
        """Pre-activations of the listed atoms only."""
        w_rows = self.W_enc.T[idx]  # [*b, m, d_in]
        x = x.to(self.b_enc.dtype).flatten(-2)[..., :, None]
        return (w_rows @ x).squeeze(-1) + rows(self.b_enc, idx)

    def atom_matrices(self, idx: Int[Tensor, "..."]) -> Float[Tensor, "... d_k d_v"]:
        """Decoder rows reshaped to `d_k x d_v` matrices."""
        return rows(self.W_dec, idx).unflatten(-1, (self.cfg.d_k, self.cfg.d_v))

    def decode_sparse(
        self, values: Float[Tensor, "... m"], indices: Int[Tensor, "... m"], bias: bool = True
    ) -> Float[Tensor, "... d_k d_v"]:
        """`X_hat = sum_j c_j A_{idx_j}` (+ `B_dec`) over the listed atoms."""
        out = (values[..., None, :] @ rows(self.W_dec, indices)).squeeze(-2)
        out = out.unflatten(-1, (self.cfg.d_k, self.cfg.d_v))
        if bias and self.b_dec is not None:
            out = out + self.b_dec
        return out

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.copy_(unit_rows(self.W_dec))
