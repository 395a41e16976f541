"""The base of every SAE kind: its output, shared API, saving and loading, the registry of kinds.

Every SAE takes a state or write matrix ``X in R^{d_k x d_v}`` (key side = rows) and has one API:

* ``encode(x) -> codes [..., n_atoms]``, ``decode(codes) -> [..., d_k, d_v]``,
* ``sae(x)`` -> reconstruction, ``sae.run(x)`` -> :class:`SAEOutput` with codes and pre-activations,
* ``save(dir)`` / ``load(dir)`` as ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout),
* hook functions ``substitute``, ``ablate``, ``install`` (see :mod:`writesae.interventions`).

A kind is a subclass with a ``kind`` name (``cfg.kind``); defining it registers it in
:data:`SAE_KINDS`, which :func:`load_sae` reads to pick the class of a saved SAE.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar, cast

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hooked_recurrent.validation import model_fingerprint
from writesae.config import WriteSAEConfig
from writesae.fileio import atomic_dir
from writesae.interventions import HookFn, ablate_hook, install_hook, substitute_hook
from writesae.protocols import ConfiguredModelLike, HookLike

__all__ = ["SAEOutput", "BaseSAE", "SAE_KINDS", "load_sae", "CFG_FILE", "WEIGHTS_FILE"]

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


def unit_rows(t: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    """``t`` with every row scaled to unit norm."""
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


_SAE = TypeVar("_SAE", bound="BaseSAE")


class BaseSAE(nn.Module):
    """Shared encode/sparsify/decode logic, persistence and intervention hooks."""

    kind: ClassVar[str] = ""
    b_enc: nn.Parameter  # encoder bias [n_atoms], set by every subclass

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            SAE_KINDS[cls.kind] = cls

    def __init__(self, cfg: WriteSAEConfig):
        super().__init__()
        if cfg.kind != self.kind:
            raise ValueError(
                f"{type(self).__name__} needs cfg.kind={self.kind!r}, got {cfg.kind!r}"
            )
        self.cfg = cfg

    def _random_unit_rows(self, seed: int | None, *widths: int) -> list[Tensor]:
        """The initial decoder tables: `[n_atoms, width]` float64 Gaussian rows scaled to unit
        norm, one per width, drawn in order from one generator seeded with `seed` (None: torch's
        global one)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        n = self.cfg.n_atoms
        return [unit_rows(torch.randn(n, d, generator=gen, dtype=torch.float64)) for d in widths]

    def _init_biases(self) -> None:
        """Zero encoder bias `b_enc` [n_atoms]; zero decoder bias `b_dec` [d_k, d_v] if
        `cfg.decoder_bias`, else the parameter `b_dec` is None."""
        dt = getattr(torch, self.cfg.dtype)
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.n_atoms, dtype=dt))
        if self.cfg.decoder_bias:
            self.b_dec = nn.Parameter(torch.zeros(self.cfg.d_k, self.cfg.d_v, dtype=dt))
        else:
            self.register_parameter("b_dec", None)

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
    def sparsify(
        self, pre: Float[Tensor, "... n_atoms"], pre_at: Callable[[Tensor], Tensor] | None = None
    ) -> SAEOutput:
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

    def _check_factors(self, key: object, value: object) -> None:
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
        key, value = cast(Tensor, key), cast(Tensor, value)  # checked above
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
        with atomic_dir(path, overwrite, what="SAE folder") as tmp:
            self.save_into(tmp)
        return Path(path)

    def save_into(self, folder: Path) -> None:
        """Write the SAE's two files into the existing folder ``folder`` (a caller that writes
        more files beside them, atomically, uses this inside its own ``atomic_dir``)."""
        tensors = {n: t.detach().contiguous().cpu() for n, t in self.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"kind": self.kind})
        (folder / CFG_FILE).write_text(self.cfg.to_json())

    def check_model(self, model: ConfiguredModelLike, allow_other_model: bool = False) -> None:
        """Raise unless ``model`` is the model this SAE was trained on.

        Shapes (``d_k``, ``d_v``, heads, the hooked layer) must always agree. The weights must
        have the fingerprint recorded in ``cfg.model_fingerprint`` (when recorded) unless
        ``allow_other_model=True``: an SAE of the right shape on another model reads another
        basis and its results mean nothing.
        """
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
    def load(cls: type[_SAE], path: str | Path, device: str | torch.device = "cpu") -> _SAE:
        """Load an SAE saved by :meth:`save`; errors name the file and what is wrong."""
        sae = load_sae(path, device=device)
        if cls is not BaseSAE and not isinstance(sae, cls):
            raise ValueError(
                f"{Path(path) / CFG_FILE}: kind {sae.cfg.kind!r} is a "
                f"{type(sae).__name__}, not a {cls.__name__}; use load_sae()"
            )
        return cast(_SAE, sae)  # an instance of cls (checked above unless cls is BaseSAE)

    # ---------------------------------------------------------------- interventions
    def substitute(self, write: Tensor, hook: HookLike) -> Tensor:
        """Hook for ``blocks.{l}.attn.hook_write``: matched-norm top-atom substitution.

        See :func:`writesae.interventions.substitute_hook` (defaults used here).
        """
        return substitute_hook(self)(write, hook)

    def substitute_hook(self, **kwargs: object) -> HookFn:
        """Factory for substitution hooks; see :func:`writesae.interventions.substitute_hook`."""
        return substitute_hook(self, **kwargs)  # type: ignore[arg-type]

    def ablate(self, write: Tensor, hook: HookLike) -> Tensor:
        """Hook for ``blocks.{l}.attn.hook_write``: delete the SAE head's write everywhere."""
        return ablate_hook(self)(write, hook)

    def ablate_hook(self, **kwargs: object) -> HookFn:
        """Factory for ablation hooks; see :func:`writesae.interventions.ablate_hook`."""
        return ablate_hook(self, **kwargs)  # type: ignore[arg-type]

    def install(
        self,
        atom_or_direction: int | tuple[Tensor, Tensor] | Tensor,
        positions: Iterable[int] | int,
        scale: float = 1.0,
    ) -> HookFn:
        """Hook adding ``scale * A`` at absolute positions; see ``interventions.install_hook``."""
        return install_hook(self, atom_or_direction, positions, scale)


SAE_KINDS: dict[str, type[BaseSAE]] = {}
"""The SAE classes by ``kind`` (``cfg.kind``); a subclass of :class:`BaseSAE` with a ``kind``
name is added when it is defined."""


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> BaseSAE:
    """Load an SAE directory of any registered kind (``cfg.json`` + ``sae_weights.safetensors``).

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
    if cfg.kind not in SAE_KINDS:
        raise ValueError(f"{cfg_path}: SAE kind {cfg.kind!r} is not one of {sorted(SAE_KINDS)}")
    sae = SAE_KINDS[cfg.kind](cfg)
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{w_path}: cannot read safetensors file ({e})") from e
    expected = {n: tuple(t.shape) for n, t in sae.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{w_path}: tensor names do not match cfg.json ({cfg.kind}, encoder "
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
