"""Training loop for WriteSAE / FlatSAE: Adam, warm-up + cosine, AuxK, dead-atom resampling.

Objective per step (the paper's training setup, Table 8, and its reference code; AuxK as in Gao
et al.), with ``d_in = d_k d_v``::

    L = mean_b ||X_b - X_hat_b||_F^2 / d_in  +  aux_coef * L_aux  (+ l1_coef * mean_b ||c_b||_1)
    L_aux = mean_b ||e_b - sum_{j in TopK_aux(dead)} ReLU(p_bj) A_j||_F^2 / d_in,
    e_b = X_b - X_hat_b (detached)

Choices where the paper and its reference code disagree:

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

import contextlib
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from hooked_recurrent.memory import scratch
from writesae import distributed as dp
from writesae.activations import WriteFactors
from writesae.checkpoint import TrainingInterrupted, load_checkpoint, save_checkpoint
from writesae.config import TrainConfig
from writesae.factor_loss import aux_rank1_sq_error
from writesae.saes import BaseSAE, SAEOutput, WriteSAE

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
    "signals_to",
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
    def final(self) -> dict[str, int | float]:
        """Last recorded value of every per-step metric (the step an int, the rest floats)."""
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
    # the batch as factors (fb) or as matrices (xb); the other is None
    fb, xb = (b, None) if isinstance(b, WriteFactors) else (None, b)
    factors = fb is not None
    if factors:
        out, sq_err = sae.factor_loss(fb.key, fb.value)
    else:
        out = sae.run(xb)
        sq_err = sae.sq_error(xb, out)
    mse = sq_err.mean() / d_in
    aux = torch.zeros((), dtype=mse.dtype)
    if cfg.aux_coef > 0 and dead is not None and bool(dead.any()):
        ka = min(cfg.aux_k, int(dead.sum()))
        # choose the aux atoms without autograd; recompute only their pre-activations with it
        zi = out.pre.detach().masked_fill(~dead, -math.inf).topk(ka, dim=-1).indices
        if factors:
            z = torch.relu(sae.pre_acts_factors_at(fb.key, fb.value, zi))
        else:
            z = torch.relu(sae.pre_acts_at(xb, zi))
        if factors and isinstance(sae, WriteSAE):
            vals, idx = _active(out, n)
            aux_err = aux_rank1_sq_error(
                fb.key, fb.value, vals, idx, z, zi, dead, sq_err, sae.W_dec_key, sae.W_dec_value,
                sae.b_dec,
            )  # fmt: skip
        else:
            x = fb.key[..., :, None] * fb.value[..., None, :] if factors else xb
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


@torch.no_grad()
def resample_dead(
    sae: BaseSAE,
    opt: torch.optim.Optimizer,
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
        # a flat SAE's parameters (nn.Module attribute access types them as Tensor | Module)
        W_dec, W_enc = cast(Tensor, sae.W_dec), cast(Tensor, sae.W_enc)
        W_dec[dead_idx] = vec
        W_enc[:, dead_idx] = (s * mean_alive_norm(W_enc, 0) * vec).T
        touched += [(W_dec, 0), (W_enc, 1)]
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


def _check_train_args(
    sae: BaseSAE,
    checkpoint: str | Path | None,
    checkpoint_every: int | None,
    checkpoint_every_s: float,
    resume: bool,
) -> None:
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
    if any(p.dtype == torch.float16 for p in sae.parameters()):
        raise ValueError(
            "train: float16 parameters do not train with Adam (its eps = 1e-8 and squared "
            "gradients underflow in float16; the first step gives NaN); use float32 or bfloat16"
        )


@dataclass
class _Run:
    """The state of a training run that a checkpoint saves."""

    opt: torch.optim.Optimizer
    gen: torch.Generator
    since_fired: Tensor
    metrics: TrainMetrics
    step: int = 0

    def save(self, path: Path, sae: BaseSAE, cfg: TrainConfig, elapsed_s: float) -> None:
        """Checkpoint the run to ``path`` (its elapsed time first)."""
        self.metrics.elapsed_s = elapsed_s
        if dp.is_main():  # one writer; the others wait until the checkpoint is complete
            save_checkpoint(
                path,
                sae,
                self.opt,
                cfg,
                self.step,
                self.since_fired,
                self.gen,
                asdict(self.metrics),
            )
        dp.barrier()


def _start(sae: BaseSAE, cfg: TrainConfig, ckpt: Path | None, resume: bool) -> _Run:
    """A fresh run (optimiser, generator, counters), or the one saved in ``ckpt``."""
    # fused: one kernel per parameter instead of ~10 small ops
    opt = torch.optim.Adam(sae.parameters(), lr=lr_at(0, cfg), betas=(0.9, 0.999), fused=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    run = _Run(opt, gen, torch.zeros(sae.cfg.n_atoms, dtype=torch.long), TrainMetrics())
    sae.normalize_decoder_()
    sae.train()
    if resume:
        state = load_checkpoint(ckpt, sae, cfg)
        with torch.no_grad():
            sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["optimizer"])
        run.since_fired = state["since_fired"]
        gen.set_state(state["generator"])
        run.metrics = TrainMetrics(**state["metrics"])
        run.step = state["step"]
        logger.info("resuming from %s at step %d", ckpt, run.step)
    return run


def _optimise(
    run: _Run, sae: BaseSAE, b: Batch, cfg: TrainConfig, resample_every: int
) -> tuple[StepResult, float, Tensor]:
    """One optimiser step on batch ``b``, then the dead-atom counters and resampling; returns
    the step's loss terms, its learning rate and the dead atoms after it."""
    lr = lr_at(run.step, cfg)
    for g in run.opt.param_groups:
        g["lr"] = lr
    dead = run.since_fired >= cfg.dead_steps
    res = training_step_loss(sae, dp.local(b), dead, cfg)  # this rank's rows of the batch
    if not math.isfinite(float(res.loss.detach())):
        raise FloatingPointError(
            f"train: the loss is {float(res.loss.detach())} at step {run.step} (learning rate "
            f"{lr:g}); lower the learning rate, or check the batch for inf/NaN"
        )
    run.opt.zero_grad(set_to_none=True)
    res.loss.backward()
    dp.average_grads(sae.parameters())
    run.opt.step()
    sae.normalize_decoder_()
    with torch.no_grad():
        fired = dp.any_rank(fired_atoms(res.out, sae.cfg.n_atoms))
        run.since_fired = torch.where(fired, torch.zeros_like(run.since_fired), run.since_fired + 1)
        dead = run.since_fired >= cfg.dead_steps
        if resample_every and (run.step + 1) % resample_every == 0 and bool(dead.any()):
            sq_err = dp.gather(res.sq_err.detach())  # the global batch's errors
            nres = resample_dead(sae, run.opt, b, sq_err, dead, cfg, run.gen)
            run.since_fired[dead] = 0
            run.metrics.n_resampled += nres
            logger.info("step %d: resampled %d dead atoms", run.step + 1, nres)
    run.metrics.n_samples += _batch_size(b)
    run.step += 1
    return res, lr, dead


def _record(
    metrics: TrainMetrics, step: int, b: Batch, res: StepResult, lr: float, dead: Tensor
) -> dict[str, str]:
    """Append the step's FVE, L0, dead fraction, losses and learning rate to ``metrics``."""
    with torch.no_grad():
        fve = batch_fve(b, dp.gather(res.sq_err.detach()).cpu())
        l0 = (res.out.codes != 0).sum(-1).double().mean()
        l0, mse, aux = dp.mean_over_ranks([l0, res.mse.detach(), res.aux.detach()])
    metrics.step.append(step)
    metrics.fve.append(fve)
    metrics.l0.append(l0)
    metrics.dead_fraction.append(float(dead.double().mean()))
    metrics.mse.append(mse)
    metrics.aux_loss.append(aux)
    metrics.lr.append(lr)
    return dict(fve=f"{fve:.3f}", l0=f"{l0:.1f}", dead=f"{metrics.dead_fraction[-1]:.2f}")


@contextlib.contextmanager
def signals_to(stop: list[int], on: bool) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM append their number to ``stop`` (when ``on`` and in the
    main thread) instead of interrupting."""
    handlers: dict[int, Any] = {}
    if on and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        yield
    finally:
        for signum, h in handlers.items():
            signal.signal(signum, h)


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
    _check_train_args(sae, checkpoint, checkpoint_every, checkpoint_every_s, resume)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    _check_source(sae, source)
    if dp.init() and sae.cfg.activation == "batchtopk":
        raise ValueError("train: batchtopk selects over the whole batch; use topk with torchrun")
    resample_every = min(cfg.resample_every, max(1, cfg.n_steps // 4)) if cfg.resample_every else 0
    run = _start(sae, cfg, ckpt, resume)
    done_before, elapsed_before = run.step, run.metrics.elapsed_s
    t0, last_save = time.perf_counter(), time.monotonic()
    show = cfg.progress and dp.is_main()  # one bar under torchrun
    bar = tqdm(total=cfg.n_steps, initial=run.step, disable=not show, desc="train SAE", unit="step")
    stop: list[int] = []
    try:
        with signals_to(stop, ckpt is not None):
            for i, b in enumerate(cycle_batches(source)):
                if i == 0:
                    _check_batch(sae, b)
                if i < done_before:
                    continue  # replayed to reach the checkpoint's position in the source
                if run.step >= cfg.n_steps:
                    break
                res, lr, dead = _optimise(run, sae, b, cfg, resample_every)
                if run.step % cfg.log_every == 0 or run.step == cfg.n_steps:
                    bar.set_postfix(**_record(run.metrics, run.step, b, res, lr, dead))
                bar.update(1)
                if ckpt is None or run.step >= cfg.n_steps:
                    continue
                elapsed = elapsed_before + time.perf_counter() - t0
                due = (
                    run.step % checkpoint_every == 0
                    if checkpoint_every is not None
                    else time.monotonic() - last_save >= checkpoint_every_s
                )
                stopping, due = dp.agree(bool(stop), due)  # every rank stops at the same step
                if stopping:
                    run.save(ckpt, sae, cfg, elapsed)
                    raise TrainingInterrupted(run.step, ckpt, stop[0] if stop else signal.SIGTERM)
                if due:
                    run.save(ckpt, sae, cfg, elapsed)
                    last_save = time.monotonic()
    finally:
        bar.close()
        scratch.clear()  # memory the factor loss kept between steps
    return _finish(sae, run, cfg, elapsed_before + time.perf_counter() - t0, stop)


def _finish(
    sae: BaseSAE, run: _Run, cfg: TrainConfig, elapsed_s: float, stop: list[int]
) -> TrainMetrics:
    if run.step == 0:
        raise ValueError(
            f"train: the source gave no batch (batch_size {cfg.batch_size}): it holds fewer "
            "samples than one batch; use more data or a smaller batch size"
        )
    run.metrics.n_steps = run.step
    run.metrics.elapsed_s = elapsed_s
    if run.step < cfg.n_steps:
        logger.warning("source ran out after %d of %d steps", run.step, cfg.n_steps)
    if stop:  # the signal came during the last step: the run is complete, say so and stop
        logger.warning("signal %d received during the last step; training is complete", stop[0])
    sae.eval()
    return run.metrics
