"""Training loop for WriteSAE / FlatSAE: Adam, warm-up + cosine, AuxK, dead-atom resampling.

Objective per step (writesae_method.md section 3.2), with ``d_in = d_k d_v``::

    L = mean_b ||X_b - X_hat_b||_F^2 / d_in  +  aux_coef * L_aux  (+ l1_coef * mean_b ||c_b||_1)
    L_aux = mean_b ||e_b - sum_{j in TopK_aux(dead)} ReLU(p_bj) A_j||_F^2 / d_in,
    e_b = X_b - X_hat_b (detached)

Choices where the paper and the reference code disagree (method file sections 2.4, 3.2, 3.3):

* ``aux_coef`` defaults to 1/32 (Gao et al.); paper 1e-2, code 1.0. Configurable.
* The AuxK reconstruction omits the decoder bias (Gao et al.; the code includes it), since the
  residual ``e`` already has the bias removed.
* Decoder atoms are renormalised to unit Frobenius norm after *every* step (the code does it every
  100 steps); no gradient projection. Bilinear encoder factors are not renormalised (code).
* Resampling follows the code: every ``resample_every`` steps (clipped to ``n_steps // 4``), dead
  atoms take the top singular pair of batch samples drawn with probability proportional to
  their squared error; encoder rows get ``resample_enc_scale`` times the mean alive row norm;
  encoder bias and Adam moments of the touched rows are zeroed.
* "Fraction of variance explained" is ``1 - sum ||X - X_hat||^2 / sum ||X - mean_batch X||^2``
  (per-entry batch mean), not the code's scalar-variance version.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from writesae.activations import WriteFactors
from writesae.config import TrainConfig
from writesae.sae import BaseSAE, SAEOutput, WriteSAE, _scratch

__all__ = ["TrainMetrics", "train", "lr_at", "batch_fve", "StepResult", "training_step_loss"]

logger = logging.getLogger(__name__)

Batch = Tensor | WriteFactors


@dataclass
class TrainMetrics:
    """Metrics recorded every ``log_every`` steps (and at the last step)."""

    step: list[int] = field(default_factory=list)
    fve: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    dead_fraction: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    n_resampled: int = 0
    n_steps: int = 0
    n_samples: int = 0
    elapsed_s: float = 0.0

    @property
    def samples_per_s(self) -> float:
        """Training throughput over the whole run."""
        return self.n_samples / self.elapsed_s if self.elapsed_s > 0 else math.nan

    @property
    def final(self) -> dict[str, float]:
        """Last recorded value of every per-step metric."""
        names = ("step", "fve", "l0", "dead_fraction", "mse", "aux_loss", "lr")
        return {n: getattr(self, n)[-1] for n in names if getattr(self, n)}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` (0-based).

    ``lr * step / warmup`` for ``step < warmup``, then cosine from ``lr`` to ``min_lr``::

        lr_t = min_lr + (lr - min_lr) * (1 + cos(pi * (t - warmup) / (n_steps - warmup))) / 2
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.n_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


def _as_batch(b: Any) -> Batch:
    if isinstance(b, WriteFactors | Tensor):
        return b
    if isinstance(b, tuple | list) and len(b) == 2:
        return WriteFactors(b[0], b[1])
    if isinstance(b, dict) and "key" in b:
        return WriteFactors(b["key"], b["value"])
    raise TypeError(
        f"a batch must be a [B, d_k, d_v] tensor or (key, value) factors, got {type(b)}"
    )


def _batch_size(b: Batch) -> int:
    return b.key.shape[0] if isinstance(b, WriteFactors) else b.shape[0]


@torch.no_grad()
def batch_fve(b: Batch, sq_err: Float[Tensor, " B"]) -> float:
    """``1 - sum_b err_b / sum_b ||X_b - mean X||_F^2`` (from factors if ``b`` is a write)."""
    if isinstance(b, WriteFactors):
        k, v = b.key.double(), b.value.double()
        total = (k.pow(2).sum(-1) * v.pow(2).sum(-1)).sum()
        mean = k.T @ v / k.shape[0]  # one d_k x d_v matrix per batch, not per sample
        var = total - k.shape[0] * mean.pow(2).sum()
    else:
        x = b.double()
        var = (x - x.mean(0)).pow(2).sum()
    return float(1 - sq_err.double().sum() / var.clamp_min(1e-30))


@dataclass
class StepResult:
    """Loss and its parts for one training step (`training_step_loss`)."""

    loss: Tensor
    mse: Tensor
    aux: Tensor
    sq_err: Tensor
    out: SAEOutput


def _active(out: SAEOutput, n: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the nonzero codes, padded with zeros to a common length."""
    if out.values is not None:
        return out.values, out.indices
    m = max(1, int((out.codes != 0).sum(-1).max().item()))
    _, idx = out.codes.abs().topk(min(m, n), dim=-1)
    return out.codes.gather(-1, idx), idx


def _fired(out: SAEOutput, n: int) -> Tensor:
    """Which atoms have a non-zero code in the batch, bool [n_atoms]."""
    if out.values is not None:  # per-sample TopK: only the listed atoms can be non-zero
        hit = out.indices[out.values != 0]
        return torch.zeros(n, dtype=torch.bool, device=hit.device).index_fill_(0, hit, True)
    return (out.codes != 0).reshape(-1, n).any(0)


def training_step_loss(sae: BaseSAE, b: Batch, dead: Tensor | None, cfg: TrainConfig) -> StepResult:
    """Loss of one batch (module docstring); ``dead`` is a bool mask [n_atoms] or None."""
    n, d_in = sae.cfg.n_atoms, sae.cfg.d_in
    factors = isinstance(b, WriteFactors)
    if factors:
        out, sq_err = sae.factor_loss(b.key, b.value)
    else:
        out = sae.run(b)
        sq_err = sae.sq_error(b, out)
    mse = sq_err.mean() / d_in
    aux = torch.zeros((), dtype=mse.dtype)
    if cfg.aux_coef > 0 and dead is not None and bool(dead.any()):
        ka = min(cfg.aux_k, int(dead.sum()))
        # choose the aux atoms without autograd; recompute only their pre-activations with it
        zi = out.pre.detach().masked_fill(~dead, -math.inf).topk(ka, dim=-1).indices
        if factors:
            z = torch.relu(sae.pre_acts_factors_at(b.key, b.value, zi))
        else:
            z = torch.relu(sae.pre_acts_at(b, zi))
        if factors and isinstance(sae, WriteSAE):
            vals, idx = _active(out, n)
            aux_err = _aux_factor_sq_error(sae, b, vals, idx, z, zi, dead, sq_err)
        else:
            x = b.key[..., :, None] * b.value[..., None, :] if factors else b
            recon = out.recon
            if recon is None:
                vals, idx = _active(out, n)
                recon = sae.decode_sparse(vals, idx)
            e = x.to(recon.dtype) - recon.detach()
            aux_err = (e - sae.decode_sparse(z, zi, bias=False)).pow(2).sum((-2, -1))
        aux = aux_err.mean() / d_in
    loss = mse + cfg.aux_coef * aux
    if cfg.l1_coef > 0:
        loss = loss + cfg.l1_coef * out.codes.abs().sum(-1).mean()
    return StepResult(loss, mse, aux, sq_err, out)


def _aux_factor_sq_error(
    sae: WriteSAE,
    b: WriteFactors,
    vals: Tensor,
    idx: Tensor,
    z: Tensor,
    zi: Tensor,
    dead: Tensor,
    sq_err: Tensor,
) -> Tensor:
    """AuxK error ``||e - sum_j z_j A_j||^2`` from factors, ``e = k v^T - X_hat`` detached.

    Expanded as ``||e||^2 - 2 <e, D> + ||D||^2`` with ``||e||^2`` = the main error and::

        <e, D> = sum_j z_j [ (k.u_j)(v.w_j) - u_j^T B w_j - sum_i c_i (u_i.u_j)(w_i.w_j) ]
        ||D||^2 = z^T (G_u * G_w) z      over the aux atoms j

    The Gram matrices are built once per batch over the dead atoms (and active x dead), then
    gathered per sample, so the cost does not grow as k_aux^2 (d_k + d_v) per sample.
    """
    n = sae.cfg.n_atoms
    dead_idx = dead.nonzero().squeeze(-1)
    slot = torch.full((n,), -1, dtype=torch.long)
    slot[dead_idx] = torch.arange(dead_idx.numel())
    zs = slot[zi]  # positions of the aux atoms among the dead ones
    u, w = sae.W_dec_key, sae.W_dec_value
    ud, wd = u[dead_idx], w[dead_idx]
    g_dead = (ud @ ud.T) * (wd @ wd.T)  # [n_dead, n_dead], live
    g_cross = (u.detach() @ ud.T) * (w.detach() @ wd.T)  # [n, n_dead], active side detached
    dt = z.dtype
    k, v = b.key.to(dt), b.value.to(dt)
    kv = (k @ ud.T) * (v @ wd.T)  # [B, n_dead]: (k.u_j)(v.w_j)
    ed = kv.gather(-1, zs)
    ubw = sae.bias_inner()
    if ubw is not None:
        # B is detached in e; the aux atom side u_j, w_j stays live
        ubw_live = ((u @ sae.b_dec.detach()) * w).sum(-1)
        ed = ed - ubw_live[zi]
    cross = g_cross[idx]  # [B, m, n_dead]
    cross = cross.gather(-1, zs[:, None, :].expand(-1, idx.shape[-1], -1))  # [B, m, k_aux]
    ed = ed - (vals.detach()[:, :, None] * cross).sum(1)
    gz = g_dead[zs[:, :, None], zs[:, None, :]]  # [B, k_aux, k_aux]
    quad = (gz * z[:, :, None] * z[:, None, :]).sum((-2, -1))
    return (sq_err.detach() - 2 * (z * ed).sum(-1) + quad).clamp_min(0.0)


@torch.no_grad()
def _resample(
    sae: BaseSAE,
    opt: torch.optim.Adam,
    b: Batch,
    sq_err: Tensor,
    dead: Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
) -> int:
    """Re-initialise dead atoms from high-error samples of the batch (module docstring)."""
    dead_idx = dead.nonzero().squeeze(-1)
    nd = dead_idx.numel()
    if nd == 0:
        return 0
    p = sq_err.detach().double().clamp_min(0)
    p = p + 1e-12 if float(p.sum()) <= 0 else p
    pick = torch.multinomial(p, nd, replacement=True, generator=gen)
    alive = ~dead
    dt = next(sae.parameters()).dtype
    if isinstance(b, WriteFactors):
        u1 = b.key[pick].to(dt)
        w1 = b.value[pick].to(dt)
        mats = None
    else:
        mats = b[pick].to(dt)
        uu, _, vh = torch.linalg.svd(mats.double(), full_matrices=False)
        u1, w1 = uu[..., :, 0].to(dt), vh[..., 0, :].to(dt)
    u1 = u1 / u1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w1 = w1 / w1.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def mean_alive_norm(t: Tensor, dim: int) -> Tensor:
        norms = t.norm(dim=dim)
        return norms[alive].mean() if bool(alive.any()) else torch.ones((), dtype=t.dtype)

    touched: list[tuple[Tensor, int]] = []  # (parameter, atom axis)
    s = cfg.resample_enc_scale
    if isinstance(sae, WriteSAE):
        sae.W_dec_key[dead_idx] = u1
        sae.W_dec_value[dead_idx] = w1
        touched += [(sae.W_dec_key, 0), (sae.W_dec_value, 0)]
        if sae.cfg.encoder == "bilinear":
            sae.W_enc_key[dead_idx] = s * mean_alive_norm(sae.W_enc_key, 1) * u1
            sae.W_enc_value[dead_idx] = s * mean_alive_norm(sae.W_enc_value, 1) * w1
            touched += [(sae.W_enc_key, 0), (sae.W_enc_value, 0)]
        else:
            atom = (u1[:, :, None] * w1[:, None, :]).flatten(-2)
            sae.W_enc[:, dead_idx] = (s * mean_alive_norm(sae.W_enc, 0) * atom).T
            touched.append((sae.W_enc, 1))
    else:
        if mats is None:
            mats = u1[:, :, None] * w1[:, None, :]
        vec = mats.flatten(-2)
        vec = vec / vec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sae.W_dec[dead_idx] = vec
        sae.W_enc[:, dead_idx] = (s * mean_alive_norm(sae.W_enc, 0) * vec).T
        touched += [(sae.W_dec, 0), (sae.W_enc, 1)]
    sae.b_enc[dead_idx] = 0
    touched.append((sae.b_enc, 0))
    for param, axis in touched:
        state = opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(axis, dead_idx, 0.0)
    return nd


def _batches(source: Iterable[Any]) -> Iterator[Batch]:
    """Cycle through ``source``; re-iterate it when exhausted (one epoch per pass)."""
    while True:
        got = False
        for b in source:
            got = True
            yield _as_batch(b)
        if not got:
            return
        if iter(source) is source:  # a one-shot iterator cannot be replayed
            return


def train(
    sae: BaseSAE,
    source: Iterable[Any],
    cfg: TrainConfig | None = None,
    **overrides: Any,
) -> TrainMetrics:
    """Train ``sae`` in place on batches from ``source``.

    Args:
        sae: a :class:`WriteSAE` or :class:`FlatSAE`.
        source: iterable of batches: ``[B, d_k, d_v]`` tensors, :class:`WriteFactors`, or
            ``(key [B, d_k], value [B, d_v])`` pairs (see :mod:`writesae.activations`). It is
            re-iterated when exhausted; a one-shot iterator ends training early.
        cfg: hyper-parameters; ``overrides`` replace single fields, e.g.
            ``train(sae, src, n_steps=10)``.

    Returns:
        :class:`TrainMetrics` with FVE, L0 and dead fraction every ``log_every`` steps.
    """
    cfg = replace(cfg or TrainConfig(), **overrides)
    if any(p.dtype == torch.float16 for p in sae.parameters()):
        raise ValueError(
            "train: float16 parameters do not train with Adam (its eps = 1e-8 and squared "
            "gradients underflow in float16; the first step gives NaN); use float32 or bfloat16"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    # fused: one kernel per parameter instead of ~10 small ops (matters on busy CPUs)
    opt = torch.optim.Adam(sae.parameters(), lr=lr_at(0, cfg), betas=(0.9, 0.999), fused=True)
    n = sae.cfg.n_atoms
    since_fired = torch.zeros(n, dtype=torch.long)
    resample_every = min(cfg.resample_every, max(1, cfg.n_steps // 4)) if cfg.resample_every else 0
    metrics = TrainMetrics()
    sae.normalize_decoder_()
    sae.train()
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.n_steps, disable=not cfg.progress, desc="train SAE", unit="step")
    step = 0
    for b in _batches(source):
        if step >= cfg.n_steps:
            break
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        dead = since_fired >= cfg.dead_steps
        res = training_step_loss(sae, b, dead, cfg)
        if not math.isfinite(float(res.loss.detach())):
            raise FloatingPointError(
                f"train: the loss is {float(res.loss.detach())} at step {step} (learning rate "
                f"{lr:g}); lower the learning rate, or check the batch for inf/NaN"
            )
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        opt.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            fired = _fired(res.out, n)
            since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + 1)
            dead = since_fired >= cfg.dead_steps
            if resample_every and (step + 1) % resample_every == 0 and bool(dead.any()):
                nres = _resample(sae, opt, b, res.sq_err, dead, cfg, gen)
                since_fired[dead] = 0
                metrics.n_resampled += nres
                logger.info("step %d: resampled %d dead atoms", step + 1, nres)
        metrics.n_samples += _batch_size(b)
        step += 1
        if step % cfg.log_every == 0 or step == cfg.n_steps:
            with torch.no_grad():
                fve = batch_fve(b, res.sq_err)
                l0 = float((res.out.codes != 0).sum(-1).double().mean())
            metrics.step.append(step)
            metrics.fve.append(fve)
            metrics.l0.append(l0)
            metrics.dead_fraction.append(float(dead.double().mean()))
            metrics.mse.append(float(res.mse.detach()))
            metrics.aux_loss.append(float(res.aux.detach()))
            metrics.lr.append(lr)
            bar.set_postfix(
                fve=f"{fve:.3f}", l0=f"{l0:.1f}", dead=f"{metrics.dead_fraction[-1]:.2f}"
            )
        bar.update(1)
    bar.close()
    _scratch.clear()  # memory the factor loss kept between steps
    metrics.n_steps = step
    metrics.elapsed_s = time.perf_counter() - t0
    if step < cfg.n_steps:
        logger.warning("source ran out after %d of %d steps", step, cfg.n_steps)
    sae.eval()
    return metrics
