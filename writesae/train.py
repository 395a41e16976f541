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
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from writesae import distributed as dp
from writesae.activations import WriteFactors
from writesae.config import TrainConfig
from writesae.sae import BaseSAE, SAEOutput, WriteSAE, _scratch

__all__ = [
    "TrainMetrics",
    "train",
    "lr_at",
    "batch_fve",
    "StepResult",
    "training_step_loss",
    "TrainingInterrupted",
    "fired_atoms",
    "resample_dead",
    "cycle_batches",
]

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


def _as_batch(b: Any) -> Batch | dict:
    if isinstance(b, WriteFactors | Tensor):
        return b
    if isinstance(b, dict) and "key" not in b:  # a sweep's batch: {cell: batch}
        return {c: _as_batch(v) for c, v in b.items()}
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


def fired_atoms(out: SAEOutput, n: int) -> Tensor:
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
def resample_dead(
    sae: BaseSAE,
    opt: torch.optim.Adam,
    b: Batch,
    sq_err: Tensor,
    dead: Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    moments: Callable[[Tensor], dict[str, Tensor]] | None = None,
) -> int:
    """Re-initialise dead atoms from high-error samples of the batch (module docstring).

    ``moments(param)`` gives the optimiser state of a parameter (default ``opt.state``); a sweep
    passes one that finds a cell's slice of the stacked state.
    """
    dead_idx = dead.nonzero().squeeze(-1)
    nd = dead_idx.numel()
    if nd == 0:
        return 0
    p = sq_err.detach().double().clamp_min(0)
    p = p + 1e-12 if float(p.sum()) <= 0 else p
    pick = torch.multinomial(p.cpu(), nd, replacement=True, generator=gen).to(p.device)
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
        state = moments(param) if moments is not None else opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(axis, dead_idx, 0.0)
    return nd


def cycle_batches(source: Iterable[Any]) -> Iterator[Batch]:
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


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after a checkpoint was written.

    Attributes:
        step: the number of steps done (and saved).
        checkpoint: the checkpoint folder; ``train(..., checkpoint=it, resume=True)`` continues.
        signum: the signal received.
    """

    def __init__(self, step: int, checkpoint: Path, signum: int):
        super().__init__(f"training interrupted at step {step}; checkpoint in {checkpoint}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


CHECKPOINT_FILE = "train_state.pt"


def _cfg_for_resume(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("progress")
    return d


def _save_checkpoint(
    path: Path,
    sae: BaseSAE,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    step: int,
    since_fired: Tensor,
    gen: torch.Generator,
    metrics: TrainMetrics,
) -> None:
    from writesae.fileio import atomic_dir

    state = {
        "step": step,
        "sae_cfg": sae.cfg.to_dict(),
        "train_cfg": _cfg_for_resume(cfg),
        "sae": {k: v.detach().clone() for k, v in sae.state_dict().items()},
        "optimizer": opt.state_dict(),
        "since_fired": since_fired.clone(),
        "generator": gen.get_state(),
        "metrics": asdict(metrics),
    }
    with atomic_dir(path, overwrite=True, what="checkpoint") as tmp:
        torch.save(state, tmp / CHECKPOINT_FILE)


def _load_checkpoint(path: Path, sae: BaseSAE, cfg: TrainConfig) -> dict[str, Any]:
    f = path / CHECKPOINT_FILE
    if not f.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {f}; run without --resume to start")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{f}: cannot read the checkpoint ({e})") from e
    if state["sae_cfg"] != sae.cfg.to_dict():
        diff = sorted(k for k, v in sae.cfg.to_dict().items() if state["sae_cfg"].get(k) != v)
        raise ValueError(f"{f}: the checkpoint is of another SAE config (differs in {diff})")
    if state["train_cfg"] != _cfg_for_resume(cfg):
        diff = sorted(k for k, v in _cfg_for_resume(cfg).items() if state["train_cfg"].get(k) != v)
        raise ValueError(f"{f}: the checkpoint has other training settings (differs in {diff})")
    return state


def _source_cell(source: Any) -> dict[str, Any]:
    """The (layer, head, input kind) a source says its samples come from, where it says."""
    meta = getattr(source, "meta", None)
    if isinstance(meta, dict):
        out = {k: meta[k] for k in ("layer", "head") if k in meta}
        kind = meta.get("input_kind", meta.get("kind"))
        return {**out, "kind": kind} if kind else out
    if all(hasattr(source, a) for a in ("layer", "head", "kind", "model")):
        return {"layer": source.layer, "head": source.head, "kind": source.kind}
    return {}


def _check_source(sae: BaseSAE, source: Any) -> None:
    """The source's cell and input kind are the SAE's."""
    cell = _source_cell(source)
    layer = re.fullmatch(r"blocks\.(\d+)\..*", sae.cfg.hook_prefix)
    want = {
        "layer": int(layer.group(1)) if layer else None,
        "head": sae.cfg.head,
        "kind": sae.cfg.input_kind,
    }
    for k, v in cell.items():
        if want.get(k) is not None and v is not None and v != want[k]:
            raise ValueError(
                f"train: the source holds {k} {v!r} but the SAE is for {k} {want[k]!r} "
                f"({sae.cfg.hook_name}, head {sae.cfg.head}, input_kind {sae.cfg.input_kind!r})"
            )


def _check_batch(sae: BaseSAE, b: Batch) -> None:
    """The first batch has the SAE's input kind and shapes."""
    c = sae.cfg
    if isinstance(b, WriteFactors):
        if c.input_kind != "write":
            raise ValueError(
                "train: the source gives write factors (key, value) but the SAE has "
                f"input_kind={c.input_kind!r}; use input_kind='write'"
            )
        if b.key.shape[-1:] != (c.d_k,) or b.value.shape[-1:] != (c.d_v,):
            raise ValueError(
                f"train: factors of shapes {tuple(b.key.shape)}, {tuple(b.value.shape)}; the SAE "
                f"needs [B, {c.d_k}] and [B, {c.d_v}]"
            )
    else:
        if c.input_kind != "state":
            raise ValueError(
                "train: the source gives state matrices but the SAE has input_kind='write' "
                "(write factors); use input_kind='state' or extract with kind='write'"
            )
        if b.ndim != 3 or tuple(b.shape[-2:]) != (c.d_k, c.d_v):
            raise ValueError(
                f"train: batch of shape {tuple(b.shape)}; the SAE needs [B, {c.d_k}, {c.d_v}]"
            )


def train(
    sae: BaseSAE,
    source: Iterable[Any],
    cfg: TrainConfig | None = None,
    *,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    checkpoint_every_s: float = 300.0,
    resume: bool = False,
    **overrides: Any,
) -> TrainMetrics:
    """Train ``sae`` in place on batches from ``source``.

    Args:
        sae: a :class:`WriteSAE` or :class:`FlatSAE`.
        source: iterable of batches: ``[B, d_k, d_v]`` tensors, :class:`WriteFactors`, or
            ``(key [B, d_k], value [B, d_v])`` pairs (see :mod:`writesae.activations`). It is
            re-iterated when exhausted; a one-shot iterator ends training early. A source that
            records its cell (``ShardSource``, ``ModelSource``) must match the SAE's.
        cfg: hyper-parameters; ``overrides`` replace single fields, e.g.
            ``train(sae, src, n_steps=10)``.
        checkpoint: a folder for training checkpoints (SAE, optimiser, RNG and step), written
            whole (temporary sibling, then rename) every ``checkpoint_every`` steps, or every
            ``checkpoint_every_s`` seconds when that is None, and on SIGINT / SIGTERM (then
            :class:`TrainingInterrupted` is raised). None: no checkpoints, signals as usual.
        resume: continue from ``checkpoint``: the source is replayed from its start and the done
            steps' batches skipped, so a deterministic source (same seed) gives parameters
            bit-identical to an uninterrupted run.

    Returns:
        :class:`TrainMetrics` with FVE, L0 and dead fraction every ``log_every`` steps.
    """
    cfg = replace(cfg or TrainConfig(), **overrides)
    if checkpoint_every is not None and (
        not isinstance(checkpoint_every, int)
        or isinstance(checkpoint_every, bool)
        or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every={checkpoint_every!r}; expected None or an int >= 1")
    if not (isinstance(checkpoint_every_s, int | float) and checkpoint_every_s > 0):
        raise ValueError(f"checkpoint_every_s={checkpoint_every_s!r}; expected a number > 0")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint= (the folder to resume from)")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if any(p.dtype == torch.float16 for p in sae.parameters()):
        raise ValueError(
            "train: float16 parameters do not train with Adam (its eps = 1e-8 and squared "
            "gradients underflow in float16; the first step gives NaN); use float32 or bfloat16"
        )
    _check_source(sae, source)
    if dp.init() and sae.cfg.activation == "batchtopk":
        raise ValueError("train: batchtopk selects over the whole batch; use topk with torchrun")
    gen = torch.Generator().manual_seed(cfg.seed)
    # fused: one kernel per parameter instead of ~10 small ops (matters on busy CPUs)
    opt = torch.optim.Adam(sae.parameters(), lr=lr_at(0, cfg), betas=(0.9, 0.999), fused=True)
    n = sae.cfg.n_atoms
    since_fired = torch.zeros(n, dtype=torch.long)
    resample_every = min(cfg.resample_every, max(1, cfg.n_steps // 4)) if cfg.resample_every else 0
    metrics = TrainMetrics()
    sae.normalize_decoder_()
    sae.train()
    step = 0
    if resume:
        state = _load_checkpoint(ckpt, sae, cfg)
        with torch.no_grad():
            sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["optimizer"])
        since_fired = state["since_fired"]
        gen.set_state(state["generator"])
        metrics = TrainMetrics(**state["metrics"])
        step = state["step"]
        logger.info("resuming from %s at step %d", ckpt, step)
    done_before, elapsed_before = step, metrics.elapsed_s
    t0 = time.perf_counter()
    last_save = time.monotonic()
    bar = tqdm(
        total=cfg.n_steps,
        initial=step,
        disable=not (cfg.progress and dp.is_main()),
        desc="train SAE",
        unit="step",
    )
    stop: list[int] = []
    handlers: dict[int, Any] = {}
    if ckpt is not None and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))

    def save() -> None:
        metrics.elapsed_s = elapsed_before + time.perf_counter() - t0
        if dp.is_main():  # one writer; the others wait until the checkpoint is complete
            _save_checkpoint(ckpt, sae, opt, cfg, step, since_fired, gen, metrics)
        dp.barrier()

    try:
        batches = cycle_batches(source)
        for i, b in enumerate(batches):
            if i == 0:
                _check_batch(sae, b)
            if i < done_before:
                continue  # replayed to reach the checkpoint's position in the source
            if step >= cfg.n_steps:
                break
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            dead = since_fired >= cfg.dead_steps
            res = training_step_loss(sae, dp.local(b), dead, cfg)
            if not math.isfinite(float(res.loss.detach())):
                raise FloatingPointError(
                    f"train: the loss is {float(res.loss.detach())} at step {step} (learning rate "
                    f"{lr:g}); lower the learning rate, or check the batch for inf/NaN"
                )
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            dp.average_grads(sae.parameters())
            opt.step()
            sae.normalize_decoder_()
            with torch.no_grad():
                fired = dp.any_rank(fired_atoms(res.out, n))
                since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + 1)
                dead = since_fired >= cfg.dead_steps
                if resample_every and (step + 1) % resample_every == 0 and bool(dead.any()):
                    sq_err = dp.gather(res.sq_err.detach())  # the global batch's errors
                    nres = resample_dead(sae, opt, b, sq_err, dead, cfg, gen)
                    since_fired[dead] = 0
                    metrics.n_resampled += nres
                    logger.info("step %d: resampled %d dead atoms", step + 1, nres)
            metrics.n_samples += _batch_size(b)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.n_steps:
                with torch.no_grad():
                    fve = batch_fve(b, dp.gather(res.sq_err.detach()))
                    l0 = (res.out.codes != 0).sum(-1).double().mean()
                    l0, mse, aux = dp.mean_over_ranks([l0, res.mse.detach(), res.aux.detach()])
                metrics.step.append(step)
                metrics.fve.append(fve)
                metrics.l0.append(l0)
                metrics.dead_fraction.append(float(dead.double().mean()))
                metrics.mse.append(mse)
                metrics.aux_loss.append(aux)
                metrics.lr.append(lr)
                bar.set_postfix(
                    fve=f"{fve:.3f}", l0=f"{l0:.1f}", dead=f"{metrics.dead_fraction[-1]:.2f}"
                )
            bar.update(1)
            if ckpt is not None and step < cfg.n_steps:
                due = (
                    step % checkpoint_every == 0
                    if checkpoint_every is not None
                    else time.monotonic() - last_save >= checkpoint_every_s
                )
                stopping, due = dp.agree(bool(stop), due)  # every rank stops at the same step
                if stopping:
                    save()
                    raise TrainingInterrupted(step, ckpt, stop[0] if stop else signal.SIGTERM)
                if due:
                    save()
                    last_save = time.monotonic()
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
        bar.close()
        _scratch.clear()  # memory the factor loss kept between steps
    if step == 0:
        raise ValueError(
            f"train: the source gave no batch (batch_size {cfg.batch_size}): it holds fewer "
            "samples than one batch; use more data or a smaller batch size"
        )
    metrics.n_steps = step
    metrics.elapsed_s = elapsed_before + time.perf_counter() - t0
    if step < cfg.n_steps:
        logger.warning("source ran out after %d of %d steps", step, cfg.n_steps)
    if stop:  # the signal came during the last step: the run is complete, say so and stop
        logger.warning("signal %d received during the last step; training is complete", stop[0])
    sae.eval()
    return metrics
