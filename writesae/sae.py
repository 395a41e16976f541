"""WriteSAE (rank-1 decoder atoms) and FlatSAE (vector baseline) on matrix-valued inputs.

Both take a state or write matrix ``X in R^{d_k x d_v}`` (key side = rows) and share one API:

* ``encode(x) -> codes [..., n_atoms]``, ``decode(codes) -> [..., d_k, d_v]``,
* ``sae(x)`` -> reconstruction, ``sae.run(x)`` -> :class:`SAEOutput` with codes and pre-activations,
* ``save(dir)`` / ``load(dir)`` as ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout),
* hook functions ``substitute``, ``ablate``, ``install`` (see :mod:`writesae.interventions`).

WriteSAE decoder (writesae_method.md section 2.2, ``bilinear`` row)::

    X_hat = sum_i c_i u_i w_i^T + B_dec,     ||u_i|| = ||w_i|| = 1  (so ||u_i w_i^T||_F = 1)

with encoder either the bilinear matched filter ``p_i = e_i^T X f_i + b_i`` or a dense one
``p_i = <E_i, X>_F + b_i``. When ``X = k v^T`` is a write, :meth:`WriteSAE.encode_factors` and
:meth:`WriteSAE.factor_sq_error` work on ``(k, v)`` and never build a ``d_k x d_v`` matrix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from writesae.config import WriteSAEConfig

__all__ = ["SAEOutput", "BaseSAE", "WriteSAE", "FlatSAE", "load_sae", "CFG_FILE", "WEIGHTS_FILE"]

logger = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


@dataclass
class SAEOutput:
    """Everything one encode/decode pass produces.

    Attributes:
        recon: reconstruction ``X_hat`` [..., d_k, d_v]; ``None`` when computed from factors.
        codes: dense codes ``c`` [..., n_atoms] (zeros except the active atoms).
        pre: pre-activations ``p`` [..., n_atoms].
        values: the active codes [..., m] when the sparsifier is per-sample TopK, else ``None``.
        indices: the atoms of ``values`` [..., m], else ``None``.
    """

    recon: Tensor | None
    codes: Tensor
    pre: Tensor
    values: Tensor | None = None
    indices: Tensor | None = None


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _unit_rows(t: Tensor) -> Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def rows(t: Tensor, idx: Tensor) -> Tensor:
    """``t[idx]`` for a parameter table ``t`` [n, ...] (index_select: about 2x faster than
    advanced indexing, forward and backward, on CPU)."""
    return t.index_select(0, idx.reshape(-1)).view(*idx.shape, *t.shape[1:])


class BaseSAE(nn.Module):
    """Shared encode/sparsify/decode logic, persistence and intervention hooks."""

    architecture: str = ""

    def __init__(self, cfg: WriteSAEConfig):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(
                f"{type(self).__name__} needs cfg.architecture={self.architecture!r}, "
                f"got {cfg.architecture!r}"
            )
        self.cfg = cfg

    # ---------------------------------------------------------------- subclass interface
    def pre_acts(self, x: Float[Tensor, "... d_k d_v"]) -> Float[Tensor, "... n_atoms"]:
        """Encoder pre-activations `p(X)` of every atom, before the sparsifier."""
        raise NotImplementedError

    def pre_acts_factors(
        self, key: Float[Tensor, "... d_k"], value: Float[Tensor, "... d_v"]
    ) -> Float[Tensor, "... n_atoms"]:
        """Pre-activations of the rank-1 input ``key value^T`` (default: materialise it)."""
        return self.pre_acts(key[..., :, None] * value[..., None, :])

    def pre_acts_at(
        self, x: Float[Tensor, "*b d_k d_v"], idx: Int[Tensor, "*b m"]
    ) -> Float[Tensor, "*b m"]:
        """Pre-activations of the listed atoms only (``p_{b, idx[b, j]}``)."""
        raise NotImplementedError

    def pre_acts_factors_at(
        self, key: Float[Tensor, "*b d_k"], value: Float[Tensor, "*b d_v"], idx: Int[Tensor, "*b m"]
    ) -> Float[Tensor, "*b m"]:
        """Pre-activations of the listed atoms for ``X = key value^T`` (default: materialise)."""
        return self.pre_acts_at(key[..., :, None] * value[..., None, :], idx)

    def _factor_pre_acts(
        self, key: Tensor, value: Tensor
    ) -> tuple[Callable[[], Tensor], Callable[[Tensor], Tensor]]:
        """(all pre-activations, pre-activations of listed atoms) of ``key value^T``, as thunks."""
        return (
            lambda: self.pre_acts_factors(key, value),
            lambda idx: self.pre_acts_factors_at(key, value, idx),
        )

    def atom_matrices(self, idx: Int[Tensor, "..."]) -> Float[Tensor, "... d_k d_v"]:
        """Decoder atoms as ``d_k x d_v`` matrices (unit Frobenius norm after renorm)."""
        raise NotImplementedError

    def decode_sparse(
        self,
        values: Float[Tensor, "... m"],
        indices: Int[Tensor, "... m"],
        bias: bool = True,
    ) -> Float[Tensor, "... d_k d_v"]:
        """``X_hat = sum_j values_j A_{indices_j} (+ B_dec)`` for a short list of atoms."""
        raise NotImplementedError

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder atoms to unit Frobenius norm (called after every optimiser step)."""
        raise NotImplementedError

    @property
    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- sparsifier
    def sparsify(self, pre: Float[Tensor, "... n_atoms"], pre_at: Any = None) -> SAEOutput:
        """Apply the configured activation to pre-activations.

        * topk: ``c = ReLU(p)`` on the k largest ``p`` (by value) of each sample, 0 elsewhere.
        * batchtopk: ``c = ReLU(p)`` on the ``k * B`` largest over all samples of the batch
          (leading dims flattened to B), 0 elsewhere.
        * relu: ``c = ReLU(p)``.

        ``pre_at(idx)``, if given, recomputes the selected TopK pre-activations with gradients, so
        ``pre`` itself can be computed without autograd (see :meth:`_encode`).
        """
        act = self.cfg.activation
        if act == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1)
            if pre_at is not None:
                vals = pre_at(idx)
            vals = torch.relu(vals)
            codes = torch.zeros_like(pre).scatter(-1, idx, vals)
            return SAEOutput(None, codes, pre, vals, idx)
        if act == "batchtopk":
            flat = torch.relu(pre).reshape(-1)
            m = min(self.cfg.k * max(1, flat.numel() // self.cfg.n_atoms), flat.numel())
            _, top = flat.topk(m)
            mask = torch.zeros_like(flat, dtype=torch.bool).scatter(0, top, True)
            codes = torch.where(mask, flat, torch.zeros_like(flat)).reshape(pre.shape)
            return SAEOutput(None, codes, pre)
        return SAEOutput(None, torch.relu(pre), pre)

    # ---------------------------------------------------------------- public API
    def _encode(self, x: Tensor | None, key: Tensor | None = None, value: Tensor | None = None):
        """Encode a matrix ``x`` or factors ``(key, value)``.

        With TopK the gradient reaches only the k selected pre-activations, so all n_atoms
        pre-activations are computed without autograd and the selected ones are recomputed with
        it: the backward pass then costs O(k) atoms per sample instead of O(n_atoms).
        """
        if x is not None:
            full = lambda: self.pre_acts(x)  # noqa: E731
            at = lambda idx: self.pre_acts_at(x, idx)  # noqa: E731
        else:
            full, at = self._factor_pre_acts(key, value)
        if self.cfg.activation == "topk" and torch.is_grad_enabled():
            with torch.no_grad():
                pre = full()
            return self.sparsify(pre, pre_at=at)
        return self.sparsify(full())

    def encode(self, x: Float[Tensor, "... d_k d_v"]) -> Float[Tensor, "... n_atoms"]:
        """Sparse codes ``c = sparsify(p(X))``."""
        return self._encode(self._check_input(x)).codes

    def encode_factors(
        self, key: Float[Tensor, "... d_k"], value: Float[Tensor, "... d_v"]
    ) -> Float[Tensor, "... n_atoms"]:
        """Codes of the rank-1 input ``X = key value^T`` from its factors."""
        return self._encode(None, key, value).codes

    def decode(self, codes: Float[Tensor, "... n_atoms"]) -> Float[Tensor, "... d_k d_v"]:
        """``X_hat = sum_i c_i A_i + B_dec`` for dense codes (only nonzero codes are used)."""
        if codes.shape[-1] != self.cfg.n_atoms:
            raise ValueError(f"codes have {codes.shape[-1]} atoms, SAE has {self.cfg.n_atoms}")
        # Gather the nonzero atoms instead of contracting over all n_atoms: codes are sparse and the
        # dense contraction would build an [..., n_atoms, d_k] intermediate.
        m = max(1, int((codes != 0).sum(-1).max().item()) if codes.numel() else 1)
        vals, idx = codes.abs().topk(min(m, self.cfg.n_atoms), dim=-1)
        vals = codes.gather(-1, idx)
        return self.decode_sparse(vals, idx)

    def run(self, x: Float[Tensor, "... d_k d_v"]) -> SAEOutput:
        """Encode and decode; returns reconstruction, codes and pre-activations."""
        out = self._encode(self._check_input(x))
        if out.values is not None:
            out.recon = self.decode_sparse(out.values, out.indices)
        else:
            out.recon = self.decode(out.codes)
        return out

    def run_factors(
        self, key: Float[Tensor, "... d_k"], value: Float[Tensor, "... d_v"]
    ) -> SAEOutput:
        """Encode a rank-1 input from its factors (``recon`` stays ``None``)."""
        return self._encode(None, key, value)

    def forward(self, x: Float[Tensor, "... d_k d_v"]) -> Float[Tensor, "... d_k d_v"]:
        """Reconstruction ``X_hat``; use :meth:`run` for codes and pre-activations as well."""
        return self.run(x).recon

    def sq_error(
        self, x: Float[Tensor, "... d_k d_v"], out: SAEOutput | None = None
    ) -> Float[Tensor, "..."]:
        """Per-sample ``||X - X_hat||_F^2`` on materialised inputs."""
        out = self.run(x) if out is None else out
        return (x - out.recon).pow(2).sum((-2, -1))

    def factor_sq_error(
        self,
        key: Float[Tensor, "... d_k"],
        value: Float[Tensor, "... d_v"],
        out: SAEOutput | None = None,
    ) -> Float[Tensor, "..."]:
        """Per-sample ``||k v^T - X_hat||_F^2`` (default: materialise; WriteSAE overrides)."""
        out = self.run_factors(key, value) if out is None else out
        x = key[..., :, None] * value[..., None, :]
        recon = (
            self.decode(out.codes)
            if out.values is None
            else self.decode_sparse(out.values, out.indices)
        )
        return (x - recon).pow(2).sum((-2, -1))

    def _check_input(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.cfg.d_k, self.cfg.d_v):
            raise ValueError(
                f"input has trailing shape {tuple(x.shape[-2:])}, SAE expects "
                f"(d_k, d_v) = ({self.cfg.d_k}, {self.cfg.d_v})"
            )
        return x

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CFG_FILE).write_text(self.cfg.to_json())
        tensors = {n: t.detach().contiguous().cpu() for n, t in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_FILE), metadata={"architecture": self.architecture})
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> BaseSAE:
        """Load an SAE saved by :meth:`save`; errors name the file and what is wrong."""
        sae = load_sae(path, device=device)
        if cls is not BaseSAE and not isinstance(sae, cls):
            raise ValueError(
                f"{Path(path) / CFG_FILE}: architecture {sae.cfg.architecture!r} is a "
                f"{type(sae).__name__}, not a {cls.__name__}; use load_sae()"
            )
        return sae

    # ---------------------------------------------------------------- interventions
    def substitute(self, write: Tensor, hook: Any) -> Tensor:
        """Hook for ``blocks.{l}.attn.hook_write``: matched-norm top-atom substitution.

        See :func:`writesae.interventions.substitute_hook` (defaults used here).
        """
        from writesae.interventions import substitute_hook

        return substitute_hook(self)(write, hook)

    def substitute_hook(self, **kwargs: Any):
        """Factory for substitution hooks; see :func:`writesae.interventions.substitute_hook`."""
        from writesae.interventions import substitute_hook

        return substitute_hook(self, **kwargs)

    def ablate(self, write: Tensor, hook: Any) -> Tensor:
        """Hook for ``blocks.{l}.attn.hook_write``: delete the SAE head's write everywhere."""
        from writesae.interventions import ablate_hook

        return ablate_hook(self)(write, hook)

    def ablate_hook(self, **kwargs: Any):
        """Factory for ablation hooks; see :func:`writesae.interventions.ablate_hook`."""
        from writesae.interventions import ablate_hook

        return ablate_hook(self, **kwargs)

    def install(self, atom_or_direction: Any, positions: Any, scale: float = 1.0):
        """Hook adding ``scale * A`` at absolute positions; see ``interventions.install_hook``."""
        from writesae.interventions import install_hook

        return install_hook(self, atom_or_direction, positions, scale)


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

    architecture = "write"

    def __init__(self, cfg: WriteSAEConfig, seed: int | None = None):
        super().__init__(cfg)
        dt = _dtype(cfg.dtype)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        u = _unit_rows(torch.randn(cfg.n_atoms, cfg.d_k, generator=gen, dtype=torch.float64))
        w = _unit_rows(torch.randn(cfg.n_atoms, cfg.d_v, generator=gen, dtype=torch.float64))
        self.W_dec_key = nn.Parameter(u.to(dt))
        self.W_dec_value = nn.Parameter(w.to(dt))
        if cfg.encoder == "bilinear":
            # tied initialisation: the matched filter starts at the atom it detects
            self.W_enc_key = nn.Parameter(u.to(dt).clone())
            self.W_enc_value = nn.Parameter(w.to(dt).clone())
        else:
            atoms = (u[:, :, None] * w[:, None, :]).reshape(cfg.n_atoms, cfg.d_in)
            self.W_enc = nn.Parameter(atoms.T.contiguous().to(dt))
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_atoms, dtype=dt))
        if cfg.decoder_bias:
            self.b_dec = nn.Parameter(torch.zeros(cfg.d_k, cfg.d_v, dtype=dt))
        else:
            self.register_parameter("b_dec", None)

    @property
    def key_factors(self) -> Float[Tensor, "n_atoms d_k"]:
        """Key-side decoder factors ``u_i`` (rows), meeting the read query."""
        return self.W_dec_key

    @property
    def value_factors(self) -> Float[Tensor, "n_atoms d_v"]:
        """Value-side decoder factors ``w_i`` (rows), read out through W_O."""
        return self.W_dec_value

    def pre_acts(self, x: Float[Tensor, "... d_k d_v"]) -> Float[Tensor, "... n_atoms"]:
        """``p_i = e_i^T X f_i + b_i`` (bilinear) or ``<E_i, X>_F + b_i`` (dense)."""
        x = x.to(self.b_enc.dtype)
        if self.cfg.encoder == "bilinear":
            # <X, e_i f_i^T>_F as one GEMM per block of atoms: building the rank-1 filters costs
            # n d_k d_v once per batch and avoids an [..., d_k, n_atoms] intermediate (2.5x faster
            # on CPU at d_k = d_v = 128, n_atoms = 2048).
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
        written by hand (:class:`_SelectedBilinear`): sparse-times-dense products in the backward
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
            return _SelectedBilinear.apply(
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

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale `u_i` and `w_i` to unit norm, so every atom has unit Frobenius norm."""
        for t in (self.W_dec_key, self.W_dec_value):
            t.div_(torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min_(1e-12))


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
    written out in :meth:`WriteSAE.factor_sq_error`; no ``d_k x d_v`` matrix is formed per sample
    (``bias`` is shared by the batch, so ``B v`` costs one matmul). ``ubw`` [*b, m] =
    ``u_j^T bias w_j`` if precomputed per atom (else computed per sample). The rest is one
    autograd function with a hand-written backward (:class:`_Rank1SqError`).
    """
    dt = coef.dtype
    key, value = key.to(dt), value.to(dt)
    lead = coef.shape[:-1]
    m = coef.shape[-1]
    err = _Rank1SqError.apply(
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


class _SelectedBilinear(torch.autograd.Function):
    """``p_{b, idx_bj} = (k_b . e_j)(v_b . f_j) + b_j`` read from the kept full products.

    Gradients, with ``G`` the output gradient scattered to ``[B, n_atoms]``::

        dE = (G * (V F^T))^T K      dF = (G * (K E^T))^T V      db = sum_b G_b
        dk = (G * (V F^T)) E        dv = (G * (K E^T)) F

    as sparse-times-dense products (``G`` has m non-zeros per sample), with no ``[B, m, d]``
    gather and no index_add of rows into the tables.
    """

    @staticmethod
    def forward(ctx, idx, pk, pv, key, value, enc_key, enc_value, bias):  # noqa: D102
        ctx.save_for_backward(idx, pk, pv, key, value, enc_key, enc_value)
        return pk.gather(-1, idx) * pv.gather(-1, idx) + rows(bias, idx)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        idx, pk, pv, key, value, enc_key, enc_value = ctx.saved_tensors
        need = ctx.needs_input_grad
        n, m = pk.shape[-1], idx.shape[-1]
        g = g.to(pk.dtype).reshape(-1, m)
        flat_idx = idx.reshape(-1, m)
        gv = (g * pv.reshape(-1, n).gather(-1, flat_idx)).reshape(-1)  # g (v . f_j)
        gk = (g * pk.reshape(-1, n).gather(-1, flat_idx)).reshape(-1)  # g (k . e_j)
        atom = flat_idx.reshape(-1)
        sample = torch.arange(len(flat_idx), device=idx.device).repeat_interleave(m)

        def scattered(vals: Tensor) -> Tensor:  # [n_atoms, samples], m non-zeros per sample
            return torch.sparse_coo_tensor(
                torch.stack((atom, sample)), vals, (n, len(flat_idx)), check_invariants=False
            )

        d_key = d_value = d_ek = d_ev = d_b = None
        if need[3]:
            d_key = torch.sparse.mm(scattered(gv).t(), enc_key).view(key.shape)
        if need[4]:
            d_value = torch.sparse.mm(scattered(gk).t(), enc_value).view(value.shape)
        if need[5]:
            d_ek = torch.sparse.mm(scattered(gv), key.reshape(-1, key.shape[-1]))
        if need[6]:
            d_ev = torch.sparse.mm(scattered(gk), value.reshape(-1, value.shape[-1]))
        if need[7]:
            d_b = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, atom, g.reshape(-1))
        return None, None, None, d_key, d_value, d_ek, d_ev, d_b


class _Rank1SqError(torch.autograd.Function):
    """``e = |k|^2 |v|^2 - 2 sum_j c_j a_j b_j + c^T (G_u * G_w) c`` with hand-written gradients.

    ``a_j = k.u_j``, ``b_j = v.w_j``, ``G_u = U_S U_S^T``, ``G_w = W_S W_S^T`` over each sample's
    atoms S. Each sample's key is stacked on its atoms' rows, ``P = [k; U_S]`` (1 + m rows,
    gathered in one pass from the table with the batch's keys appended), so one batched Gram
    ``P P^T`` gives ``|k|^2``, ``a`` and ``G_u`` at once (likewise ``Q = [v; W_S]``). Gradients::

        de/dc_j = -2 a_j b_j + 2 [(G_u * G_w) c]_j
        de/du_j = -2 c_j b_j k + 2 c_j sum_i c_i (G_w)_ji u_i
        de/dk   = 2 |v|^2 k - 2 sum_j c_j b_j u_j                (and symmetrically for w, v)

    i.e. ``[dk; dU_S] = R P`` with the (1 + m)-square ``R = 2 g [[|v|^2, -(c b)^T],
    [-(c b), (c c^T) * G_w]]``: one batched matmul per side, then one index_add into the table.
    """

    @staticmethod
    def forward(ctx, key, value, coef, idx, u, w):  # noqa: D102
        B, m = coef.shape
        n = u.shape[0]
        rows_ = torch.cat((torch.arange(n, n + B, device=idx.device)[:, None], idx), 1).reshape(-1)
        P = torch.cat((u, key)).index_select(0, rows_).view(B, 1 + m, -1)
        Q = torch.cat((w, value)).index_select(0, rows_).view(B, 1 + m, -1)
        gp, gq = torch.bmm(P, P.transpose(1, 2)), torch.bmm(Q, Q.transpose(1, 2))
        kk, a, gu = gp[:, 0, 0], gp[:, 0, 1:], gp[:, 1:, 1:]
        vv, b, gw = gq[:, 0, 0], gq[:, 0, 1:], gq[:, 1:, 1:]
        gc = ((gu * gw) @ coef[:, :, None]).squeeze(-1)  # (G_u * G_w) c
        err = kk * vv - 2 * (coef * a * b).sum(-1) + (coef * gc).sum(-1)
        ctx.save_for_backward(coef, rows_, P, Q, gp, gq, gc)
        ctx.n = n
        return err

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        coef, rows_, P, Q, gp, gq, gc = ctx.saved_tensors
        need = ctx.needs_input_grad
        n = ctx.n
        a, b = gp[:, 0, 1:], gq[:, 0, 1:]
        g2 = 2 * g[:, None]  # [B, 1]
        d_coef = g2 * (gc - a * b) if need[2] else None

        def side(p: Tensor, other_gram: Tensor, other_dot: Tensor) -> Tensor:
            r = torch.empty_like(other_gram)  # [B, 1 + m, 1 + m]
            cb = g2 * coef * other_dot[:, 0, 1:]  # 2 g c_j b_j
            r[:, 0, 0] = g2[:, 0] * other_dot[:, 0, 0]
            r[:, 0, 1:] = -cb
            r[:, 1:, 0] = -cb
            r[:, 1:, 1:] = (g2 * coef)[:, :, None] * other_gram[:, 1:, 1:] * coef[:, None, :]
            d = torch.bmm(r, p).view(-1, p.shape[-1])
            return torch.zeros(n + len(p), p.shape[-1], dtype=p.dtype, device=p.device).index_add_(
                0, rows_, d
            )

        d_key = d_value = d_u = d_w = None
        if need[0] or need[4]:
            d_pu = side(P, gq, gq)
            d_u, d_key = d_pu[:n], d_pu[n:]
        if need[1] or need[5]:
            d_pw = side(Q, gp, gp)
            d_w, d_value = d_pw[:n], d_pw[n:]
        return d_key, d_value, d_coef, None, d_u, d_w


class FlatSAE(BaseSAE):
    """Vector baseline on ``vec(X)`` (row-major): dense encoder, dense decoder columns.

    ``p = W_enc^T vec(X) + b_enc``, ``vec(X_hat) = W_dec^T c + b_dec`` with unit-norm decoder rows
    (each atom a unit-Frobenius ``d_k x d_v`` matrix). Same config, trainer and hook API as
    :class:`WriteSAE`; ``cfg.architecture`` must be ``'flat'``.
    """

    architecture = "flat"

    def __init__(self, cfg: WriteSAEConfig, seed: int | None = None):
        super().__init__(cfg)
        dt = _dtype(cfg.dtype)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        dec = _unit_rows(torch.randn(cfg.n_atoms, cfg.d_in, generator=gen, dtype=torch.float64))
        self.W_dec = nn.Parameter(dec.to(dt))
        self.W_enc = nn.Parameter(dec.T.contiguous().to(dt))
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_atoms, dtype=dt))
        if cfg.decoder_bias:
            self.b_dec = nn.Parameter(torch.zeros(cfg.d_k, cfg.d_v, dtype=dt))
        else:
            self.register_parameter("b_dec", None)

    @staticmethod
    def matched_n_atoms(cfg: WriteSAEConfig) -> int:
        """Atoms of a FlatSAE whose parameter count is closest to a WriteSAE with ``cfg``.

        Parameter counts (method file section 2.2): bilinear WriteSAE ``2n(d_k+d_v) + n + d_k d_v``,
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
        self.W_dec.copy_(_unit_rows(self.W_dec))


_CLASSES: dict[str, type[BaseSAE]] = {"write": WriteSAE, "flat": FlatSAE}


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> BaseSAE:
    """Load a WriteSAE or FlatSAE directory (``cfg.json`` + ``sae_weights.safetensors``).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the JSON or safetensors file is corrupt, or a tensor's name or shape does not
            match what ``cfg.json`` implies; the message names the file and the tensor.
    """
    path = Path(path)
    cfg_path, w_path = path / CFG_FILE, path / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: file not found (expected {CFG_FILE} + {WEIGHTS_FILE})")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(raw).__name__}")
    try:
        cfg = WriteSAEConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: invalid config ({e})") from e
    sae = _CLASSES[cfg.architecture](cfg)
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{w_path}: cannot read safetensors file ({e})") from e
    expected = {n: tuple(t.shape) for n, t in sae.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{w_path}: tensor names do not match cfg.json ({cfg.architecture}, encoder "
            f"{cfg.encoder}, decoder_bias {cfg.decoder_bias}): missing {missing}, "
            f"unexpected {unexpected}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{w_path}: tensor {name!r} has shape {tuple(tensors[name].shape)} but {cfg_path} "
                f"(d_k={cfg.d_k}, d_v={cfg.d_v}, n_atoms={cfg.n_atoms}) needs {shape}"
            )
        if not torch.isfinite(tensors[name]).all():
            raise ValueError(f"{w_path}: tensor {name!r} contains NaN or inf")
    sae.load_state_dict(tensors)
    return sae.to(device)
