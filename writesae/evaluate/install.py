"""The generation install (paper section 4, App. I.6): add a target direction to one head's write
during greedy decoding and count how often the continuation contains the target token."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_recurrent.components.gated_deltanet import GatedDeltaNet
from writesae.evaluate.common import check_model, sae_layer
from writesae.protocols import HookLike, MixerLike, ReadoutModelLike, SAELike, TextModelLike
from writesae.stats import wilson

__all__ = [
    "target_direction",
    "install_geometry",
    "InstallResult",
    "evaluate_install",
    "INSTALL_DIRECTIONS",
]

INSTALL_DIRECTIONS = ("first_order", "direct")


def target_direction(
    model: ReadoutModelLike, layer: int, head: int, token: int
) -> Float[Tensor, " d_v"]:
    """v*_T = W_O^(h)T W_U[T] / ||.||: the value-side direction that most raises token T's logit
    through the direct path."""
    W_O = cast(MixerLike, model.blocks[layer].attn).head_output_weight(head).float()
    v = W_O.T @ model.unembed.weight[token].float()
    return v / v.norm().clamp_min(1e-12)


def _greedy(model: ReadoutModelLike, prompts: Tensor, max_new_tokens: int, **kw: Any) -> Any:
    """The greedy continuation of `prompts` (`kw`: e.g. `fwd_hooks`); installing needs a model
    that also generates (a :class:`writesae.protocols.TextModelLike`)."""
    return cast(TextModelLike, model).generate(
        prompts, max_new_tokens, stop_at_eos=False, verbose=False, **kw
    )


def _keep(box: dict[str, Tensor], name: str) -> Callable[[Tensor, HookLike], Tensor]:
    """A hook that stores its activation in `box[name]` and returns it unchanged."""

    def fn(x: Tensor, hook: HookLike) -> Tensor:
        box[name] = x.detach()
        return x

    return fn


def _gap_bound(
    mixer: GatedDeltaNet, head: int, box: dict[str, Tensor], g_resid: Tensor, start: int
) -> float:
    """The most that rewriting the head's normalised output at `start` can change the logit gap
    whose gradient at the final residual is `g_resid`, on the direct path (W_O, then the final
    norm linearised at its current scale): sqrt(d_v) ||c|| - <c, n_now>."""
    d_f = g_resid[0, start].double()
    W_O = mixer.head_output_weight(head).detach().double()
    z = box["gate"][0, start, head].double()
    o = box["read"][0, start, head].double()
    n_now = o * torch.rsqrt(o.pow(2).mean() + mixer.eps)
    c = mixer.norm_w.detach().double() * torch.nn.functional.silu(z) * (W_O.T @ d_f)
    return float(math.sqrt(o.shape[-1]) * c.norm() - (c * n_now).sum())


@torch.enable_grad()
def install_geometry(
    model: ReadoutModelLike,
    seq: Int[Tensor, "1 pos"],
    layer: int,
    head: int,
    target: int,
    start: int,
    positions: int,
) -> dict[str, Any]:
    """What the install needs and what bounds it, from one forward and backward pass on `seq`.

    * `direction` `[positions, d_v]`: per position s in `start..start+positions-1`, the unit value
      direction of the head's read that raises sum_s log p(target | s) fastest to first order,
      through the per-head norm and gate, the later layers and the final norm (the gradient of
      that sum with respect to the read, normalised);
    * `gap`: logit(top) - logit(target) at `start` (0 when the target is top);
    * `bound`: the most that rewriting this head's normalised output at `start` can change that gap
      on the direct path (W_O, then the final norm linearised at its current scale): with c the
      head's read-out of the gap's gradient, sqrt(d_v) ||c|| - <c, n_now>. Only for mixers with a
      per-head gated RMSNorm (Qwen3.5 Gated DeltaNet); NaN otherwise.
    """
    prefix = f"blocks.{layer}.attn"
    box: dict[str, Tensor] = {}

    def on_read(o: Tensor, hook: HookLike) -> Tensor:
        box["read"] = o.detach()
        box["d_read"] = torch.zeros_like(o, requires_grad=True)
        return o + box["d_read"]

    def on_resid(r: Tensor, hook: HookLike) -> Tensor:
        box["d_resid"] = torch.zeros_like(r, requires_grad=True)
        return r + box["d_resid"]

    last = f"blocks.{len(model.blocks) - 1}.hook_resid_post"
    hooks: list[tuple[str, Callable[[Tensor, HookLike], Tensor]]] = [
        (f"{prefix}.hook_read", on_read),
        (last, on_resid),
    ]
    mixer = model.blocks[layer].attn
    gdn = isinstance(mixer, GatedDeltaNet)  # per-head gated RMSNorm: o -> norm_w rms(o) silu(z)
    if gdn:
        hooks.append((f"{prefix}.hook_gate", _keep(box, "gate")))
    logits = model.run_with_hooks(seq, fwd_hooks=hooks)[0].float()  # [pos, vocab]
    window = slice(start, start + positions)
    logp = torch.log_softmax(logits[window], -1)[:, target].sum()
    (g_read,) = torch.autograd.grad(logp, box["d_read"], retain_graph=True)
    g = g_read[0, window, head].float()
    direction = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    lg = logits[start].detach()
    top = int(lg.argmax())
    bound = float("nan")
    if isinstance(mixer, GatedDeltaNet):  # gdn, narrowed for the type checker
        gap_logit = logits[start, target] - logits[start, top]
        (g_res,) = torch.autograd.grad(gap_logit, box["d_resid"])
        bound = _gap_bound(mixer, head, box, g_res, start)
    return dict(direction=direction.detach(), gap=float(lg[top] - lg[target]), bound=bound, top=top)


@dataclass
class InstallResult:
    """Target inclusion with and without the install (paper section 4, App. I.6).

    Attributes:
        n: number of (prompt, target) trials.
        included_edited, included_native: trials whose continuation contains the target.
        rate_edited, rate_native: the same as fractions, with Wilson 95% intervals.
        median_rank_shift: median of (unedited rank - installed rank) of the target at the first
            edited position (same position, same input tokens; positive = the install raised it).
        rank_improved: fraction of trials where that rank improved.
        median_gap, median_bound: at the first edited position, the median logit gap from the top
            token to the target, and the median of the most one head can change it on the direct
            path (`install_geometry`; NaN where the family has no per-head gated norm).
        n_reachable: trials whose gap is below the bound; `rate_edited_reachable` and
            `rate_native_reachable` are the inclusion rates among them.
    """

    n: int
    included_edited: int
    included_native: int
    rate_edited: float
    rate_native: float
    ci_edited: tuple[float, float]
    ci_native: tuple[float, float]
    median_rank_shift: float
    rank_improved: float = float("nan")
    median_gap: float = float("nan")
    median_bound: float = float("nan")
    n_reachable: int = 0
    rate_edited_reachable: float = float("nan")
    rate_native_reachable: float = float("nan")
    settings: dict[str, Any] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self, with_samples: bool = False) -> dict[str, Any]:
        """The result as a dict (per-trial records only with `with_samples=True`)."""
        d = asdict(self)
        if not with_samples:
            d.pop("trials")
        return d


def _install_hooks(
    prefix: str, head: int, start: int, positions: int, scale: float, v_dir: Tensor
) -> list[tuple[str, Callable[[Tensor, HookLike], Tensor]]]:
    """The hooks of one install: keep the head's q, k, v, and add to its write at positions
    `start..start+positions-1` scale ||k_s v_s^T|| sign(k^_s . q_s) k^_s v_dir[s - start]^T."""
    box: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[[Tensor, HookLike], Tensor]:
        def fn(x: Tensor, hook: HookLike) -> Tensor:
            box[name] = x[:, :, head]
            return x

        return fn

    def install(w: Tensor, hook: Any) -> Tensor:  # a RecurrentHookPoint: reads hook.positions
        rel = hook.positions - start
        on = (rel >= 0) & (rel < positions)
        if not bool(on.any()):
            return w
        k, q, v = box["k"][:, on].float(), box["q"][:, on].float(), box["v"][:, on].float()
        norm = (k.norm(dim=-1) * v.norm(dim=-1))[..., None, None]  # ||k v^T||, no beta
        k_hat = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sign = torch.where((k_hat * q).sum(-1) < 0, -1.0, 1.0)[..., None]
        vd = v_dir[rel[on]].to(w.device)  # [n_on, d_v]
        w = w.clone()
        add = scale * norm * (sign * k_hat)[..., :, None] * vd[None, :, None, :]
        w[:, on, head] = w[:, on, head] + add.to(w.dtype)
        return w

    names = ("q", "k", "v")
    return [(f"{prefix}.hook_{n}", keep(n)) for n in names] + [(f"{prefix}.hook_write", install)]


def _trial(
    model: ReadoutModelLike,
    prompt: Tensor,
    native: Tensor,
    target: int,
    initial_rank: int,
    cell: tuple[int, int],
    fixed_dir: Tensor | None,
    direction: str,
    positions: int,
    scale: float,
    max_new_tokens: int,
) -> dict[str, Any]:
    """One (prompt, target) trial: the installed continuation against the native one."""
    layer, head = cell
    P = prompt.shape[1]
    seq, same = native[:, : P + positions], native[:, : P + 1]
    geo = install_geometry(model, seq, layer, head, target, P, positions)
    if fixed_dir is not None:
        v_dir = fixed_dir[None].expand(positions, -1)
    elif direction == "direct":
        v_dir = target_direction(model, layer, head, target)[None].expand(positions, -1)
    else:
        v_dir = geo["direction"]
    hooks = _install_hooks(f"blocks.{layer}.attn", head, P, positions, scale, v_dir)
    edited = _greedy(model, prompt, max_new_tokens, fwd_hooks=hooks)
    native_at_P = model(same)[0, P].float()
    step_logits = model.run_with_hooks(same, fwd_hooks=hooks)[0, P].float()
    return dict(
        target=int(target),
        initial_rank=initial_rank,
        native_rank_first_edit=int((native_at_P > native_at_P[target]).sum()),
        edited_rank_first_edit=int((step_logits > step_logits[target]).sum()),
        gap=geo["gap"],
        bound=geo["bound"],
        included_edited=bool((edited[0, P:] == target).any()),
        included_native=bool((native[0, P:] == target).any()),
    )


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _install_result(trials: list[dict[str, Any]], settings: dict[str, Any]) -> InstallResult:
    n = len(trials)
    ie = sum(t["included_edited"] for t in trials)
    i_n = sum(t["included_native"] for t in trials)
    shifts = [t["native_rank_first_edit"] - t["edited_rank_first_edit"] for t in trials]
    reach = [t for t in trials if t["gap"] < t["bound"]]
    return InstallResult(
        n=n,
        included_edited=ie,
        included_native=i_n,
        rate_edited=ie / n if n else float("nan"),
        rate_native=i_n / n if n else float("nan"),
        ci_edited=wilson(ie, n),
        ci_native=wilson(i_n, n),
        median_rank_shift=_median(shifts),
        rank_improved=_mean([s > 0 for s in shifts]),
        median_gap=_median([t["gap"] for t in trials]),
        median_bound=_median([t["bound"] for t in trials]),
        n_reachable=len(reach),
        rate_edited_reachable=_mean([t["included_edited"] for t in reach]),
        rate_native_reachable=_mean([t["included_native"] for t in reach]),
        settings=settings,
        trials=trials,
    )


@torch.no_grad()
def evaluate_install(
    model: ReadoutModelLike,
    sae_or_direction: SAELike | Tensor,
    prompts: Int[Tensor, "batch pos"],
    targets: Sequence[int] | None = None,
    *,
    layer: int | None = None,
    head: int | None = None,
    positions: int = 3,
    scale: float = 3.0,
    direction: str = "first_order",
    rank_band: tuple[int, int] = (100, 1000),
    n_targets: int = 2,
    max_new_tokens: int = 20,
    seed: int = 0,
    progress: bool = True,
    allow_other_model: bool = False,
) -> InstallResult:
    """Install a target direction during greedy decoding and count target inclusion.

    For each prompt and target token T (default: `n_targets` tokens whose rank under the unedited
    model's next-token distribution at the end of the prompt lies in `rank_band`), the write of the
    head at `positions` consecutive positions s, starting with the first generated token, gets

        scale * ||k_s v_s^T||_F * sign(k^_s . q_s) k^_s v*^T        (additive)

    added: the norm of the native write without its strength (beta for Qwen3.5, dt for Mamba-2),
    as the paper defines it (App. I.6); the native key, signed so that the installed term reads
    positively at s; and v* per position, by `direction`: `"first_order"` (default: the value
    direction that raises log p(T) over the window fastest to first order through the per-head
    norm, gate, later layers and final norm, computed on the unedited continuation; see
    `install_geometry`) or `"direct"` (W_O^T W_U[T] normalised, the paper's direct path). A `[d_v]`
    tensor instead of an SAE installs that fixed direction (give `layer` and `head`).

    The `max_new_tokens` greedy continuation is checked for T against the unedited one; the
    target's rank is compared at the first edited position in both runs (same input tokens), and
    the logit gap to the top token there is reported beside the most this head can change it.
    """
    check_model(model, sae_or_direction, allow_other_model)
    if direction not in INSTALL_DIRECTIONS:
        raise ValueError(f"direction must be one of {INSTALL_DIRECTIONS}, not {direction!r}")
    if isinstance(sae_or_direction, Tensor):
        if layer is None or head is None:
            raise ValueError("installing a direction tensor needs layer= and head=")
        fixed_dir = sae_or_direction.float()
    else:
        layer = sae_layer(sae_or_direction) if layer is None else layer
        head = sae_or_direction.cfg.head if head is None else head
        fixed_dir = None
    gen = torch.Generator().manual_seed(seed)
    trials = []
    native_out = _greedy(model, prompts, max_new_tokens)
    first_logits = model(prompts)[:, -1].float()
    for b in tqdm(range(prompts.shape[0]), desc="install", disable=not progress):
        ranks = first_logits[b].argsort(descending=True).argsort()
        if targets is None:
            band = ((ranks >= rank_band[0]) & (ranks < rank_band[1])).nonzero()[:, 0]
            pick = band[torch.randperm(len(band), generator=gen)[:n_targets]].tolist()
        else:
            pick = list(targets)
        for target in pick:
            trial = _trial(
                model, prompts[b : b + 1], native_out[b : b + 1], target, int(ranks[target]),
                (layer, head), fixed_dir, direction, positions, scale, max_new_tokens,
            )  # fmt: skip
            trials.append(dict(prompt=b, **trial))
    settings = dict(
        layer=layer,
        head=head,
        positions=positions,
        scale=scale,
        direction="fixed" if fixed_dir is not None else direction,
        key="native k^ signed by k^.q",
        norm="||k v^T||_F (no write strength)",
        rank_band=list(rank_band),
        n_targets=n_targets,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    return _install_result(trials, settings)
