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
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
        dense_codes: dense codes ``c`` [..., n_atoms] (zeros except the active atoms), or
            ``None`` when ``values``/``indices`` hold them; read them as ``codes``.
        pre: pre-activations ``p`` [..., n_atoms].
        values: the active codes [..., m] when the sparsifier is per-sample TopK, else ``None``.
        indices: the atoms of ``values`` [..., m], else ``None``.
    """

    recon: Tensor | None
    dense_codes: Tensor | None
    pre: Tensor
    values: Tensor | None = None
    indices: Tensor | None = None

    @property
    def codes(self) -> Tensor:
        """Dense codes; with TopK built from ``values`` and ``indices`` on first use (training
        steps that do not look at them skip the ``[..., n_atoms]`` tensor)."""
        if self.dense_codes is None:
            self.dense_codes = torch.zeros_like(self.pre).scatter(-1, self.indices, self.values)
        return self.dense_codes


class _Scratch(threading.local):
    """Named blocks of CPU memory kept from one training step to the next (one set per thread).

    The factor loss gathers and multiplies ``[batch, 1 + k, d]`` blocks (4 MiB each at batch 256,
    k = 32, d = 128) and returns ``[n_atoms, d]`` table gradients. Taken fresh every step, that
    memory goes back to the operating system in between, and touching it again page-faults,
    thousands of times per step at those sizes; on a virtual machine each first touch costs
    microseconds. A block is handed out again only when nothing else holds its storage (its use
    count is back to what it was when it was made), so a tensor that is still alive is never
    overwritten: one kept by autograd for a backward pass that has not run yet, or a gradient
    still held as a parameter's ``.grad`` (until ``zero_grad`` drops it) or by the caller. The
    caller then gets new memory. :func:`train` frees the blocks when it returns.
    """

    max_bytes = 64 << 20

    def __init__(self) -> None:
        self.blocks: dict[str, tuple[Tensor, int]] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Uninitialised ``[*shape]`` tensor of ``like``'s dtype and device."""
        n = math.prod(shape)
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        too_big = n * like.element_size() > self.max_bytes
        if like.device.type != "cpu" or use_count is None or too_big:
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        block, idle = self.blocks.get(name, (None, -1))
        if (
            block is None
            or block.dtype != like.dtype
            or block.numel() < n
            or use_count(block.untyped_storage()._cdata) != idle
        ):
            block = torch.empty(n, dtype=like.dtype, device=like.device)
            self.blocks[name] = (block, use_count(block.untyped_storage()._cdata))
        return block[:n].view(shape)

    def clear(self) -> None:
        """Let go of this thread's blocks."""
        self.blocks.clear()


_scratch = _Scratch()


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
            return SAEOutput(None, None, pre, torch.relu(vals), idx)
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
        """Sparse codes ``c = sparsify(p(X))``.

        An activation with all heads (``cache[hook]``, ``[batch, pos, head, d_k, d_v]``) is
        refused: the SAE was trained on head ``cfg.head``; pass ``x[:, :, sae.cfg.head]``."""
        if x.dim() == 5:
            raise ValueError(
                f"encode got {tuple(x.shape)}: a [batch, pos, head, d_k, d_v] activation with "
                f"every head; this SAE was trained on head {self.cfg.head}: pass "
                f"x[:, :, {self.cfg.head}]"
            )
        return self._encode(self._check_input(x)).codes

    def encode_factors(
        self, key: Float[Tensor, "... d_k"], value: Float[Tensor, "... d_v"]
    ) -> Float[Tensor, "... n_atoms"]:
        """Codes of the rank-1 input ``X = key value^T`` from its factors."""
        self._check_factors(key, value)
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
        self._check_factors(key, value)
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

    def factor_loss(
        self, key: Float[Tensor, "... d_k"], value: Float[Tensor, "... d_v"]
    ) -> tuple[SAEOutput, Float[Tensor, "..."]]:
        """Codes and per-sample squared error ``||k v^T - X_hat||_F^2`` of writes given by their
        factors, as the training loss needs them: ``run_factors`` then ``factor_sq_error``."""
        out = self.run_factors(key, value)
        return out, self.factor_sq_error(key, value, out)

    def _check_factors(self, key: Any, value: Any) -> None:
        for name, t, d in (("key", key, self.cfg.d_k), ("value", value, self.cfg.d_v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor [..., {d}], not {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} has dtype {t.dtype}; expected a floating tensor")
            if t.dim() == 0 or t.shape[-1] != d:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}; the SAE needs [..., {d}] "
                    f"({'d_k' if name == 'key' else 'd_v'} = {d})"
                )
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"key {tuple(key.shape)} and value {tuple(value.shape)} have different leading "
                "(batch) shapes"
            )

    def _check_input(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.cfg.d_k, self.cfg.d_v):
            raise ValueError(
                f"input has trailing shape {tuple(x.shape[-2:])}, SAE expects "
                f"(d_k, d_v) = ({self.cfg.d_k}, {self.cfg.d_v})"
            )
        return x

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` as the new folder ``path``.

        The folder is written to a temporary sibling and renamed into place when complete, so an
        interrupted save leaves no half-written SAE. An existing ``path`` is an error unless
        ``overwrite=True`` (then it is replaced whole).
        """
        from writesae.fileio import atomic_dir

        with atomic_dir(path, overwrite, what="SAE folder") as tmp:
            self._write(tmp)
        return Path(path)

    def _write(self, folder: Path) -> None:
        """The SAE's two files into an existing (temporary) folder."""
        tensors = {n: t.detach().contiguous().cpu() for n, t in self.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"architecture": self.architecture})
        (folder / CFG_FILE).write_text(self.cfg.to_json())

    def check_model(self, model: Any, allow_other_model: bool = False) -> None:
        """Raise unless ``model`` is the model this SAE was trained on.

        Shapes (``d_k``, ``d_v``, heads, the hooked layer) must always agree. The weights must
        have the fingerprint recorded in ``cfg.model_fingerprint`` (when recorded) unless
        ``allow_other_model=True``: an SAE of the right shape on another model reads another
        basis and its results mean nothing.
        """
        from hooked_recurrent.validation import model_fingerprint

        c, m = self.cfg, model.cfg
        if (c.d_k, c.d_v) != (m.d_k, m.d_v):
            raise ValueError(
                f"the SAE is for d_k x d_v = {c.d_k} x {c.d_v} states but the model has "
                f"{m.d_k} x {m.d_v}"
            )
        if c.hook_name not in model.hook_dict:
            raise ValueError(f"the model has no hook {c.hook_name!r} (the SAE's hook)")
        if not 0 <= c.head < m.n_heads:
            raise ValueError(f"the SAE's head {c.head} is out of range ({m.n_heads} heads)")
        if c.model_fingerprint and not allow_other_model:
            got = model_fingerprint(model)
            if got != c.model_fingerprint:
                raise ValueError(
                    f"the SAE was trained on model {c.model_name!r} (weights fingerprint "
                    f"{c.model_fingerprint}) but this model's weights have fingerprint {got} "
                    f"({getattr(m, 'model_name', '')!r}); pass allow_other_model=True "
                    "(--allow-other-model) to use it anyway"
                )

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

    def factor_loss(
        self, key: Float[Tensor, "... d_k"], value: Float[Tensor, "... d_v"]
    ) -> tuple[SAEOutput, Float[Tensor, "..."]]:
        """As the base class. With the bilinear encoder, TopK and autograd on (training), the
        selected codes and the error are one autograd function (:class:`_TopKFactorLoss`) with the
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
            pk = torch.mm(key, self.W_enc_key.T, out=_scratch.get("pk", shape, key))
            pv = torch.mm(value, self.W_enc_value.T, out=_scratch.get("pv", shape, value))
            pre = torch.addcmul(self.b_enc, pk, pv)
            idx = pre.topk(self.cfg.k, dim=-1).indices
        vals, err = _TopKFactorLoss.apply(
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


class _Selection:
    """The atoms each sample selected (``idx`` [B, m]), sorted by atom once, as the row pointers of
    sparse ``[n_atoms, ...]`` matrices: a sum over the samples that selected each atom becomes one
    sparse (CSR) times dense product, and one sort serves all the sums of a backward pass."""

    _warned = False

    def __init__(self, idx: Tensor, n: int):
        self.flat = idx.reshape(-1)
        self.n, self.m = n, idx.shape[-1]
        if self.flat.device.type == "cpu" and n <= np.iinfo(np.int16).max:
            # numpy's stable sort of 16-bit keys is a radix sort: 7x faster than torch.argsort
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
        if _Selection._warned:
            mat = torch.sparse_csr_tensor(*args, check_invariants=False)
        else:  # torch warns once per process that its CSR support is in beta
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                mat = torch.sparse_csr_tensor(*args, check_invariants=False)
            _Selection._warned = True
        if not name:
            return (mat @ x).to(dtype)
        out = _scratch.get(name, (self.n, x.shape[-1]), x)
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


def _vecdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


class _StackedGrams:
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
            torch.cat((u, key)), 0, rows_, out=_scratch.get("P", (len(rows_), u.shape[1]), u)
        ).view(B, 1 + m, -1)
        self.Q = torch.index_select(
            torch.cat((w, value)), 0, rows_, out=_scratch.get("Q", (len(rows_), w.shape[1]), w)
        ).view(B, 1 + m, -1)
        self.gp = torch.bmm(self.P, self.P.transpose(1, 2))
        self.gq = torch.bmm(self.Q, self.Q.transpose(1, 2))
        self.sigma = torch.cat((torch.ones_like(coef[:, :1]), -coef), 1)
        self.h_sigma = _vecdot(self.gp * self.gq, self.sigma[:, None, :])  # [B, 1 + m]
        self.err = _vecdot(self.sigma, self.h_sigma)

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
        r = _scratch.get("R", (len(rows_), m, sigma.shape[1]), rows_)
        torch.mul(other_gram[:, -m:], (s * sigma_rows)[:, :, None], out=r).mul_(sigma[:, None, :])
        return torch.bmm(r, rows_, out=_scratch.get("dP", (len(rows_), m, rows_.shape[-1]), rows_))


class _SelectedBilinear(torch.autograd.Function):
    """``p_{b, idx_bj} = (k_b . e_j)(v_b . f_j) + b_j`` read from the kept full products.

    Gradients, with ``g`` the output gradient::

        de_j = sum_b g_bj (v_b . f_j) k_b     df_j = sum_b g_bj (k_b . e_j) v_b
        dk_b = sum_j g_bj (v_b . f_j) e_j     dv_b = sum_j g_bj (k_b . e_j) f_j
        db_j = sum_b g_bj

    the table gradients as sparse-times-dense products (:class:`_Selection`).
    """

    @staticmethod
    def forward(ctx, idx, pk, pv, key, value, enc_key, enc_value, bias):  # noqa: D102
        pk_s, pv_s = pk.gather(-1, idx), pv.gather(-1, idx)
        ctx.save_for_backward(idx, pk_s, pv_s, key, value, enc_key, enc_value)
        ctx.n = bias.shape[0]
        return torch.addcmul(rows(bias, idx), pk_s, pv_s)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        idx, pk_s, pv_s, key, value, enc_key, enc_value = ctx.saved_tensors
        lead = idx.shape[:-1]
        grads = _encoder_grads(
            ctx.needs_input_grad[3:],
            g.to(pk_s.dtype).reshape(-1, idx.shape[-1]),
            _Selection(idx.reshape(-1, idx.shape[-1]), ctx.n),
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


def _encoder_grads(
    need: tuple[bool, ...],
    g: Tensor,
    sel: _Selection,
    pk_s: Tensor,
    pv_s: Tensor,
    key: Tensor,
    value: Tensor,
    enc_key: Tensor,
    enc_value: Tensor,
) -> tuple[Tensor | None, ...]:
    """(dk, dv, dE, dF, db_enc) of the selected pre-activations ``p = (k.e_j)(v.f_j) + b_j``
    given their gradient ``g`` [B, m] (:class:`_SelectedBilinear`); ``need`` flags which."""
    gv, gk = g * pv_s, g * pk_s  # g (v . f_j), g (k . e_j)

    def per_sample_rows(coef: Tensor, table: Tensor) -> Tensor:  # sum_j coef_bj table_{idx_bj}
        return _vecdot(coef[:, None, :], rows(table, sel.flat.view(g.shape)).transpose(1, 2))

    return (
        per_sample_rows(gv, enc_key) if need[0] else None,
        per_sample_rows(gk, enc_value) if need[1] else None,
        sel.per_sample(gv, key, "dE") if need[2] else None,
        sel.per_sample(gk, value, "dF") if need[3] else None,
        sel.per_atom(g) if need[4] else None,
    )


class _Rank1SqError(torch.autograd.Function):
    """``||k v^T - sum_j c_j u_j w_j^T||_F^2`` per sample with hand-written gradients: the stacked
    Gram form of :class:`_StackedGrams`, then one sparse product per side sums the atoms' rows into
    the table (:class:`_Selection`)."""

    @staticmethod
    def forward(ctx, key, value, coef, idx, u, w):  # noqa: D102
        grams = _StackedGrams(key, value, coef, idx, u, w)
        ctx.save_for_backward(idx, *grams.saved())
        ctx.n = u.shape[0]
        return grams.err

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        idx, P, Q, gp, gq, sigma, h_sigma = ctx.saved_tensors
        need = ctx.needs_input_grad
        s = 2 * g[:, None]  # [B, 1]
        d_coef = _StackedGrams.d_coef(s, h_sigma) if need[2] else None
        sel = _Selection(idx, ctx.n)
        d_key = d_value = d_u = d_w = None
        if need[0] or need[4]:
            d = _StackedGrams.side(s, sigma, P, gq, key_row=need[0])
            d_key = d[:, 0].clone() if need[0] else None
            d_u = sel.per_slot(d) if need[4] else None
            del d  # its memory is reused by the value side
        if need[1] or need[5]:
            d = _StackedGrams.side(s, sigma, Q, gp, key_row=need[1])
            d_value = d[:, 0].clone() if need[1] else None
            d_w = sel.per_slot(d) if need[5] else None
        return d_key, d_value, d_coef, None, d_u, d_w


class _TopKFactorLoss(torch.autograd.Function):
    """TopK codes of the bilinear encoder and the squared error of their reconstruction, for writes
    ``k v^T`` given by their factors: one function with one hand-written backward.

    Per sample, with the m atoms S chosen by TopK (without autograd, from the full products
    ``pk = K E^T`` and ``pv = V F^T``) and decoder bias ``B``::

        p_j = (k.e_j)(v.f_j) + b_enc_j,    c_j = ReLU(p_j)
        err = ||k v^T - sum_j c_j u_j w_j^T||^2 - 2 k^T B v + 2 sum_j c_j u_j^T B w_j + ||B||^2

    the first term in the stacked Gram form (:class:`_StackedGrams`). Gradients of the bias terms,
    with ``s = 2 dL/d err`` per sample: ``dc_j += s u_j^T B w_j``, ``du_j += s c_j B w_j``,
    ``dw_j += s c_j B^T u_j``, ``dk -= s B v``, ``dv -= s B^T k``, ``dB = sum_b s (-k v^T +
    sum_j c_j u_j w_j^T + B)``; then ``dL/dp = dL/dc [p > 0]`` flows into the encoder
    (:func:`_encoder_grads`). The atoms are sorted once for all the sums into the encoder and
    decoder tables (:class:`_Selection`), and autograd sees one node instead of some forty.
    """

    @staticmethod
    def forward(ctx, key, value, idx, pk, pv, b_enc, u, w, b_dec, enc_key, enc_value):  # noqa: D102
        pk_s, pv_s = pk.gather(-1, idx), pv.gather(-1, idx)
        p = torch.addcmul(rows(b_enc, idx), pk_s, pv_s)
        c = torch.relu(p)
        grams = _StackedGrams(key, value, c, idx, u, w)
        err, ub, ubw = grams.err, None, None
        if b_dec is not None:
            ub = u @ b_dec  # [n, d_v]: B^T u_i
            ubw = rows(_vecdot(ub, w), idx)  # u_j^T B w_j
            err = err + 2 * (_vecdot(c, ubw) - _vecdot(key, value @ b_dec.T)) + b_dec.pow(2).sum()
        ctx.save_for_backward(
            key, value, idx, pk_s, pv_s, p, c, ub, ubw, u, w, b_dec, enc_key, enc_value,
            *grams.saved(),
        )  # fmt: skip
        ctx.mark_non_differentiable(idx)
        return c, err

    @staticmethod
    def backward(ctx, g_c, g_err):  # noqa: D102
        (key, value, idx, pk_s, pv_s, p, c, ub, ubw, u, w, b_dec, enc_key, enc_value,
         P, Q, gp, gq, sigma, h_sigma) = ctx.saved_tensors  # fmt: skip
        need = ctx.needs_input_grad
        sel = _Selection(idx, u.shape[0])
        s = 2 * g_err[:, None]  # [B, 1]
        d_c = _StackedGrams.d_coef(s, h_sigma)
        if ubw is not None:
            d_c = d_c + s * ubw
        if g_c is not None:
            d_c = d_c + g_c
        d_p = d_c * (p > 0)
        enc = _encoder_grads(
            (need[0], need[1], need[9], need[10], need[5]), d_p, sel, pk_s, pv_s, key, value,
            enc_key, enc_value,
        )  # fmt: skip
        d_key, d_value, d_ek, d_ev, d_benc = enc
        d_u = d_w = d_bdec = None
        if need[0] or need[6]:
            d = _StackedGrams.side(s, sigma, P, gq, key_row=need[0])
            d_key = d_key + d[:, 0] if need[0] else None
            d_u = sel.per_slot(d, "dU") if need[6] else None
            del d  # its memory is reused by the value side
        if need[1] or need[7]:
            d = _StackedGrams.side(s, sigma, Q, gp, key_row=need[1])
            d_value = d_value + d[:, 0] if need[1] else None
            d_w = sel.per_slot(d, "dW") if need[7] else None
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
