"""Hook functions that edit the write ``blocks.{l}.attn.hook_write`` of one head with an SAE.

A hook is called as ``fn(write, hook=hook_point)`` with ``write`` of shape
``[batch, pos, head, d_k, d_v]`` (``write = strength * k v^T``) and returns the edited tensor.
Only the SAE's head is touched. Positions are *absolute* token positions, read from
``hook.positions`` (so the hooks also work during generation, where ``pos`` has length 1).

Conditions of the single-write replacement test (paper section 3.2 and App. J, arXiv
2605.12770), at a position t where the SAE fires, with native write ``D = beta_t k_t v_t^T`` and
top atom ``A = u_j w_j^T``::

    substitute (matched_norm):  D -> sign(c_j) * ||D||_F * A / ||A||_F
    substitute (coefficient):   D -> c_j * A
    ablate (delete):            D -> 0
    ablate (random):            D -> ||D||_F * g h^T / (||g|| ||h||),  g, h ~ N(0, I)

``c_j`` is the atom's code; TopK/ReLU codes are non-negative, so the matched-norm sign is +1
for them (we keep the sign of the code, as the paper's "c A" does, rather than aligning with D).
Which atom fires is decided by the SAE on its own input kind: the native state ``S_t`` from
``hook.native_state(head)`` (paper protocol; no second forward pass) or the native write itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from jaxtyping import Float
from torch import Tensor

from writesae.protocols import HookLike, SAELike

__all__ = [
    "substitute_hook",
    "ablate_hook",
    "install_hook",
    "HookFn",
    "check_hook",
    "scaled_atom",
    "random_rank1",
]

HookFn = Callable[..., Tensor]
Write = Float[Tensor, "batch pos head d_k d_v"]
SCALINGS = ("matched_norm", "coefficient")


def check_hook(
    sae: SAELike, write: Write, hook: HookLike, suffixes: tuple[str, ...] = ("hook_write",)
) -> None:
    """Raise a ValueError naming what does not match between ``sae`` and the hook it is on."""
    cfg = sae.cfg
    name = getattr(hook, "name", None)
    allowed = [f"{cfg.hook_prefix}.{s}" for s in suffixes]
    if name not in allowed:
        raise ValueError(
            f"wrong hook name: {type(sae).__name__} for {cfg.hook_name!r} (head {cfg.head}) was "
            f"attached to {name!r}; it edits {' or '.join(repr(a) for a in allowed)}"
        )
    if write.ndim != 5:
        raise ValueError(
            f"hook {name!r}: expected [batch, pos, head, d_k, d_v], got shape {tuple(write.shape)}"
        )
    if write.shape[-2] != cfg.d_k:
        raise ValueError(
            f"d_k mismatch: hook {name!r} has d_k={write.shape[-2]}, the SAE has d_k={cfg.d_k}"
        )
    if write.shape[-1] != cfg.d_v:
        raise ValueError(
            f"d_v mismatch: hook {name!r} has d_v={write.shape[-1]}, the SAE has d_v={cfg.d_v}"
        )
    if not 0 <= cfg.head < write.shape[2]:
        raise ValueError(
            f"head index out of range: the SAE's head {cfg.head} but hook {name!r} has "
            f"{write.shape[2]} heads"
        )


def _abs_positions(hook: HookLike, p: int, device: torch.device) -> Tensor:
    pos = getattr(hook, "positions", None)
    if pos is None:
        return torch.arange(p, device=device)
    pos = torch.as_tensor(pos, device=device).long().reshape(-1)
    if pos.numel() != p:
        raise ValueError(f"hook {hook.name!r}: positions has {pos.numel()} entries, tensor has {p}")
    return pos


def _position_mask(
    hook: HookLike, p: int, positions: Iterable[int] | int | None, device: torch.device
) -> Tensor:
    """Bool [p]: which entries of the pos axis are at one of the requested absolute positions."""
    if positions is None:
        return torch.ones(p, dtype=torch.bool, device=device)
    if isinstance(positions, int):
        positions = [positions]
    want = torch.as_tensor(list(positions), device=device).long()
    return torch.isin(_abs_positions(hook, p, device), want)


def _codes_at(sae: SAELike, write: Tensor, hook: HookLike) -> Float[Tensor, "b p n"]:
    """SAE codes at every position, from the SAE's own input kind (native state or write)."""
    head = sae.cfg.head
    if sae.cfg.input_kind == "state":
        native_state = getattr(hook, "native_state", None)
        if native_state is None:
            raise ValueError(
                f"hook {getattr(hook, 'name', None)!r} has no native_state(); a state-trained SAE "
                "decides firing on S_t and needs a RecurrentHookPoint on hook_write"
            )
        x = native_state(head=head)
    else:
        x = write[:, :, head]
    dt = sae.b_enc.dtype
    with torch.no_grad():
        return sae.encode(x.to(dt))


def scaled_atom(
    atom: Float[Tensor, "*b d_k d_v"],
    code: Float[Tensor, "*b"],
    native_norm: Float[Tensor, "*b"],
    scale: str | float = "matched_norm",
) -> Float[Tensor, "*b d_k d_v"]:
    """The atom ``A`` as a substitute for a native write of Frobenius norm ``native_norm``.

    * ``"matched_norm"``: ``sign(c) ||D||_F A / ||A||_F`` (paper App. J);
    * ``"coefficient"``: ``c A`` (the atom at its code, the paper's abstract);
    * a float ``f``: ``sign(c) f ||D||_F A / ||A||_F``, a fraction of the native norm.

    The result has ``atom``'s dtype.
    """
    if scale == "coefficient":
        return code.to(atom.dtype)[..., None, None] * atom
    f = 1.0 if scale == "matched_norm" else float(scale)
    sign = torch.where(code < 0, -1.0, 1.0).to(atom.dtype)
    a_norm = atom.flatten(-2).norm(dim=-1).clamp_min(1e-30)
    return (sign * f * native_norm.to(atom.dtype) / a_norm)[..., None, None] * atom


def random_rank1(
    rows: int, positions: Iterable[int], d_k: int, d_v: int, seed: int
) -> Float[Tensor, "rows pos d_k d_v"]:
    """Random unit-Frobenius rank-1 matrices ``g h^T / (||g|| ||h||)``, ``g, h ~ N(0, I)``
    (float64): the random control of the substitution test.

    Each absolute position draws its ``rows`` pairs ``(g, h)`` from its own generator, seeded
    ``seed * 1_000_003 + position``, so a full pass and token-by-token generation draw the same
    matrices at the same position.
    """
    positions = list(positions)
    g = torch.empty(rows, len(positions), d_k, dtype=torch.float64)
    h = torch.empty(rows, len(positions), d_v, dtype=torch.float64)
    for j, pos in enumerate(positions):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(pos))
        g[:, j] = torch.randn(rows, d_k, generator=gen, dtype=torch.float64)
        h[:, j] = torch.randn(rows, d_v, generator=gen, dtype=torch.float64)
    g = g / g.norm(dim=-1, keepdim=True)
    h = h / h.norm(dim=-1, keepdim=True)
    return g[..., :, None] * h[..., None, :]


def substitute_hook(
    sae: SAELike,
    positions: Iterable[int] | int | None = None,
    atom: int | None = None,
    scaling: str = "matched_norm",
    require_firing: bool = True,
) -> HookFn:
    """Hook replacing the native write by an SAE atom (module docstring for the formulas).

    Args:
        sae: the SAE (its ``cfg.head`` selects the head).
        positions: absolute positions to consider (None = all).
        atom: None = the top atom (largest |code|) at each position; an int = that atom.
        scaling: ``"matched_norm"`` (Frobenius norm of the native write; paper App. J) or
            ``"coefficient"`` (the atom's code, paper abstract).
        require_firing: substitute only where the chosen atom has a nonzero code. With False the
            atom is written everywhere in ``positions`` (sign +1 where its code is 0).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")

    def hook_fn(write: Write, hook: HookLike) -> Write:
        check_hook(sae, write, hook)
        b, p, h = write.shape[:3]
        head = sae.cfg.head
        codes = _codes_at(sae, write, hook)  # [b, p, n]
        if atom is None:
            idx = codes.abs().argmax(-1)
        else:
            if not 0 <= atom < sae.cfg.n_atoms:
                raise ValueError(f"atom {atom} out of range for n_atoms={sae.cfg.n_atoms}")
            idx = torch.full((b, p), atom, dtype=torch.long, device=write.device)
        c = codes.gather(-1, idx[..., None]).squeeze(-1)
        mask = _position_mask(hook, p, positions, write.device)[None, :].expand(b, p)
        if require_firing:
            mask = mask & (c != 0)
        native = write[:, :, head]
        a = sae.atom_matrices(idx).detach().to(native.dtype)  # [b, p, d_k, d_v]
        a = scaled_atom(a, c, native.flatten(-2).norm(dim=-1), scaling)
        new = torch.where(mask[..., None, None], a, native)
        out = write.clone()
        out[:, :, head] = new
        return out

    return hook_fn


def ablate_hook(
    sae: SAELike,
    positions: Iterable[int] | int | None = None,
    control: str = "delete",
    only_firing: bool = False,
    seed: int = 0,
) -> HookFn:
    """Hook deleting the SAE head's write, or replacing it by a matched-norm random rank-1.

    Args:
        positions: absolute positions (None = all).
        control: ``"delete"`` (write -> 0) or ``"random"`` (``||D||_F g h^T / (||g|| ||h||)``
            with Gaussian ``g, h`` drawn per sample and absolute position from ``seed``, so a
            full pass and token-by-token generation draw the same matrices).
        only_firing: restrict to positions where the SAE fires (any nonzero code), i.e. the
            positions the substitution condition edits.
    """
    if control not in ("delete", "random"):
        raise ValueError(f"control must be 'delete' or 'random', got {control!r}")

    def hook_fn(write: Write, hook: HookLike) -> Write:
        check_hook(sae, write, hook)
        b, p = write.shape[:2]
        head = sae.cfg.head
        mask = _position_mask(hook, p, positions, write.device)[None, :].expand(b, p)
        if only_firing:
            mask = mask & (_codes_at(sae, write, hook) != 0).any(-1)
        native = write[:, :, head]
        if control == "delete":
            rep = torch.zeros_like(native)
        else:
            positions_ = _abs_positions(hook, p, torch.device("cpu")).tolist()
            r = random_rank1(b, positions_, sae.cfg.d_k, sae.cfg.d_v, seed)
            r = r.to(native.dtype).to(native.device)
            rep = native.flatten(-2).norm(dim=-1)[..., None, None] * r
        out = write.clone()
        out[:, :, head] = torch.where(mask[..., None, None], rep, native)
        return out

    return hook_fn


def install_hook(
    sae: SAELike,
    atom_or_direction: int | tuple[Tensor, Tensor] | Tensor,
    positions: Iterable[int] | int,
    scale: float | Float[Tensor, " batch"] = 1.0,
) -> HookFn:
    """Hook adding ``scale * A`` to the SAE head's write (or state) at absolute ``positions``.

    ``A`` is atom ``i`` (``u_i w_i^T``) for an int, ``u w^T`` for a ``(u [d_k], w [d_v])`` pair,
    or a given ``[d_k, d_v]`` direction; ``scale`` is one number or one per batch row. Works on
    ``hook_write`` and ``hook_state`` of the SAE's layer, and inside generation (positions come
    from ``hook.positions``).
    """
    cfg = sae.cfg
    if isinstance(atom_or_direction, int):
        if not 0 <= atom_or_direction < cfg.n_atoms:
            raise ValueError(f"atom {atom_or_direction} out of range for n_atoms={cfg.n_atoms}")
        direction = sae.atom_matrices(torch.tensor(atom_or_direction)).detach()
    elif isinstance(atom_or_direction, tuple | list):
        u, w = (torch.as_tensor(t) for t in atom_or_direction)
        if u.shape != (cfg.d_k,) or w.shape != (cfg.d_v,):
            raise ValueError(
                f"(u, w) must have shapes ({cfg.d_k},) and ({cfg.d_v},), got "
                f"{tuple(u.shape)} and {tuple(w.shape)}"
            )
        direction = u[:, None] * w[None, :]
    else:
        direction = torch.as_tensor(atom_or_direction)
        if direction.shape != (cfg.d_k, cfg.d_v):
            raise ValueError(
                f"direction must be [d_k, d_v] = [{cfg.d_k}, {cfg.d_v}], "
                f"got {tuple(direction.shape)}"
            )
    if positions is None:
        raise ValueError("install needs explicit absolute positions")

    def hook_fn(write: Write, hook: HookLike) -> Write:
        check_hook(sae, write, hook, suffixes=("hook_write", "hook_state"))
        p = write.shape[1]
        mask = _position_mask(hook, p, positions, write.device)
        if not bool(mask.any()):
            return write
        out = write.clone()
        if isinstance(scale, Tensor):  # one per batch row: [batch, 1, d_k, d_v]
            add = (scale[:, None, None, None] * direction).to(write.device, write.dtype)
        else:
            add = scale * direction.to(device=write.device, dtype=write.dtype)
        out[:, mask, cfg.head] = out[:, mask, cfg.head] + add
        return out

    return hook_fn
