"""Sweeps: one pass of the model feeds one SAE per cell (layer, head), all trained together.

:func:`sweep` reads the model once per block batch for every cell (a :class:`ModelSource` with
``cells``), and trains the cells' SAEs as one :class:`StackedSAE`: every parameter is stacked over
the cells (``[C, ...]``), the per-cell losses are summed (they share no parameter, so each cell's
gradient is its own loss's), one backward pass and one Adam step update all of them.

Per-cell randomness, chosen so that a cell of a sweep is the SAE that :func:`writesae.train`
gives for that cell alone with the same seed and data:

* every cell's SAE is initialised with ``WriteSAE(cfg, seed=seed)``, as alone;
* the shuffle buffer draws one permutation per refill for all cells: the permutation depends only
  on the seed and the number of buffered samples, which is the same for every cell;
* every cell has its own resampling generator, seeded with ``seed`` as alone;
* dead-atom counters, AuxK and resampling are per cell (``since_fired`` is ``[C, n_atoms]``).

Under ``torchrun`` the sweep is data-parallel like ``train`` (see :mod:`writesae.distributed`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from writesae import distributed as dp
from writesae.activations import ModelSource
from writesae.checkpoint import TrainingInterrupted
from writesae.config import TrainConfig, WriteSAEConfig
from writesae.fileio import atomic_dir
from writesae.saes import BaseSAE, WriteSAE
from writesae.samples import map_samples
from writesae.train import (
    StepResult,
    TrainMetrics,
    batch_fve,
    cycle_batches,
    fired_atoms,
    lr_at,
    resample_dead,
    signals_to,
    training_step_loss,
)

__all__ = [
    "StackedSAE",
    "sweep",
    "train_stack",
    "save_sweep",
    "parse_cells",
    "cell_folder",
    "SWEEP_STATE",
]

logger = logging.getLogger(__name__)

Cell = tuple[int, int]
SWEEP_STATE = "sweep_state.pt"


class _Apply(nn.Module):
    """Runs ``fn(sae, *args)``: the module :func:`torch.func.functional_call` swaps tensors into."""

    def __init__(self, sae: BaseSAE):
        super().__init__()
        self.sae = sae

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.sae, *args)


class StackedSAE(nn.Module):
    """SAEs of one class and equal shapes, each parameter stacked over the cells ``[C, ...]``.

    Cell ``c``'s SAE is the template SAE with every parameter ``p`` replaced by ``p[c]``
    (:meth:`run`); :meth:`cell` returns it as a standalone SAE with its own config.
    """

    def __init__(self, saes: Sequence[BaseSAE]):
        super().__init__()
        if not saes:
            raise ValueError("StackedSAE: no SAEs to stack")
        first = saes[0]
        shapes = {n: p.shape for n, p in first.named_parameters()}
        for s in saes[1:]:
            if (
                type(s) is not type(first)
                or {n: p.shape for n, p in s.named_parameters()} != shapes
            ):
                raise ValueError("StackedSAE: the SAEs differ in class or parameter shapes")
        self.names = list(shapes)
        self.stacked = nn.ParameterList(
            nn.Parameter(torch.stack([s.get_parameter(n).detach() for s in saes]))
            for n in self.names
        )
        self.cfgs = [s.cfg for s in saes]
        self._apply_to = [_Apply(copy.deepcopy(first))]  # in a list: not a submodule

    def __len__(self) -> int:
        return len(self.cfgs)

    def views(self) -> list[dict[str, Tensor]]:
        """Per cell, its parameters as views of the stacks (one unbind per stack, so the backward
        pass stacks the cells' gradients in one operation)."""
        per_param = [p.unbind(0) for p in self.stacked]
        return [
            {f"sae.{n}": t[c] for n, t in zip(self.names, per_param, strict=True)}
            for c in range(len(self))
        ]

    def run(self, views: dict[str, Tensor], fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(sae, *args)`` with the SAE's parameters replaced by ``views``."""
        return functional_call(self._apply_to[0], views, (fn, *args))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Every cell's decoder renormalised (the SAE's rule applied to the stacks at once)."""
        whole = {f"sae.{n}": p for n, p in zip(self.names, self.stacked, strict=True)}
        self.run(whole, lambda sae: sae.normalize_decoder_())

    def cell(self, c: int) -> BaseSAE:
        """Cell ``c`` as a standalone SAE (a copy) with its own config."""
        sae = copy.deepcopy(self._apply_to[0].sae)
        sae.cfg = self.cfgs[c]
        with torch.no_grad():
            for n, p in zip(self.names, self.stacked, strict=True):
                sae.get_parameter(n).copy_(p[c])
        return sae.eval()


@dataclass
class _State:
    """What a sweep carries from step to step (and saves in its checkpoint)."""

    step: int
    since_fired: Tensor  # [C, n_atoms] steps since each atom last fired
    gens: list[torch.Generator]  # one resampling generator per cell
    metrics: list[TrainMetrics]


def _moments(opt: torch.optim.Optimizer, stack: StackedSAE, views: dict[str, Tensor], c: int):
    """The function that finds a cell view's Adam moments (its slice of the stacked state)."""
    which = {id(v): i for i, v in enumerate(views.values())}

    def find(param: Tensor) -> dict[str, Tensor]:
        state = opt.state.get(stack.stacked[which[id(param)]], {})
        return {k: state[k][c] for k in ("exp_avg", "exp_avg_sq") if k in state}

    return find


def _step(
    stack: StackedSAE,
    opt: torch.optim.Optimizer,
    batch: dict[Cell, Any],
    cells: list[Cell],
    st: _State,
    cfg: TrainConfig,
) -> list[StepResult]:
    """One optimiser step of every cell; dead counters and resampling updated per cell."""
    for g in opt.param_groups:
        g["lr"] = lr_at(st.step, cfg)
    device = st.since_fired.device
    batch = map_samples(batch, lambda t: t.to(device))  # the buffer stays on the host
    views = stack.views()
    dead = st.since_fired >= cfg.dead_steps
    results = [
        stack.run(views[c], training_step_loss, dp.local(batch[cell]), dead[c], cfg)
        for c, cell in enumerate(cells)
    ]
    bad = [cells[c] for c, r in enumerate(results) if not math.isfinite(float(r.loss.detach()))]
    if bad:
        raise FloatingPointError(
            f"sweep: the loss is not finite at step {st.step} for cells {bad}; lower the "
            "learning rate, or check the data for inf/NaN"
        )
    opt.zero_grad(set_to_none=True)
    torch.stack([r.loss for r in results]).sum().backward()
    dp.average_grads(stack.parameters())
    opt.step()
    stack.normalize_decoder_()
    with torch.no_grad():
        n = stack.cfgs[0].n_atoms
        fired = dp.any_rank(torch.stack([fired_atoms(r.out, n) for r in results]))
        st.since_fired = torch.where(fired, 0, st.since_fired + 1)
        dead = st.since_fired >= cfg.dead_steps
        every = min(cfg.resample_every, max(1, cfg.n_steps // 4)) if cfg.resample_every else 0
        if every and (st.step + 1) % every == 0:
            views = stack.views()
            for c in torch.nonzero(dead.any(-1)).flatten().tolist():
                args = (opt, batch[cells[c]], dp.gather(results[c].sq_err.detach()), dead[c])
                more = (cfg, st.gens[c], _moments(opt, stack, views[c], c))
                st.metrics[c].n_resampled += stack.run(views[c], resample_dead, *args, *more)
                st.since_fired[c, dead[c]] = 0
    return results


def _record(
    st: _State,
    batch: dict[Cell, Any],
    cells: list[Cell],
    results: list[StepResult],
    cfg: TrainConfig,
) -> None:
    """Append every cell's metrics after a step (FVE over the global batch)."""
    dead = (st.since_fired >= cfg.dead_steps).double().mean(-1).tolist()
    for c, (cell, r) in enumerate(zip(cells, results, strict=True)):
        with torch.no_grad():
            fve = batch_fve(batch[cell], dp.gather(r.sq_err.detach()).cpu())  # host batch
            l0_local = (r.out.codes != 0).sum(-1).double().mean()
            l0, mse, aux = dp.mean_over_ranks([l0_local, r.mse.detach(), r.aux.detach()])
        m = st.metrics[c]
        for name, v in (("step", st.step), ("fve", fve), ("l0", l0), ("dead_fraction", dead[c])):
            getattr(m, name).append(v)
        m.mse.append(mse)
        m.aux_loss.append(aux)
        m.lr.append(lr_at(st.step - 1, cfg))


def _save_state(path: Path, stack: StackedSAE, opt, cfg: TrainConfig, st: _State) -> None:
    """Checkpoint of the whole sweep (rank 0 writes, everyone waits)."""
    if dp.is_main():
        state = {
            "cfgs": [c.to_dict() for c in stack.cfgs],
            "train_cfg": {k: v for k, v in asdict(cfg).items() if k != "progress"},
            "stack": {k: v.detach().clone() for k, v in stack.state_dict().items()},
            "optimizer": opt.state_dict(),
            "step": st.step,
            "since_fired": st.since_fired.clone(),
            "generators": [g.get_state() for g in st.gens],
            "metrics": [asdict(m) for m in st.metrics],
        }
        with atomic_dir(path, overwrite=True, what="checkpoint") as tmp:
            torch.save(state, tmp / SWEEP_STATE)
    dp.barrier()


def _load_state(path: Path, stack: StackedSAE, opt, cfg: TrainConfig, st: _State) -> None:
    f = path / SWEEP_STATE
    if not f.is_file():
        raise FileNotFoundError(f"resume: no sweep checkpoint at {f}; run without resume")
    state = torch.load(f, map_location="cpu", weights_only=True)
    if state["cfgs"] != [c.to_dict() for c in stack.cfgs] or state["train_cfg"] != {
        k: v for k, v in asdict(cfg).items() if k != "progress"
    }:
        raise ValueError(f"{f}: the checkpoint is of another sweep (cells or settings differ)")
    with torch.no_grad():
        stack.load_state_dict(state["stack"])
    opt.load_state_dict(state["optimizer"])
    st.step, st.since_fired = state["step"], state["since_fired"].to(st.since_fired.device)
    for g, s in zip(st.gens, state["generators"], strict=True):
        g.set_state(s)
    st.metrics = [TrainMetrics(**m) for m in state["metrics"]]


def train_stack(
    stack: StackedSAE,
    cells: list[Cell],
    source: Iterable[Any],
    cfg: TrainConfig,
    checkpoint: Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> list[TrainMetrics]:
    """Train a :class:`StackedSAE` on batches ``{cell: batch}``; checkpoints and signals as in
    :func:`writesae.train` (``checkpoint_every`` steps, else every 300 s)."""
    if resume and checkpoint is None:
        raise ValueError("train_stack: resume=True needs checkpoint= (the folder to resume from)")
    opt = torch.optim.Adam(stack.parameters(), lr=lr_at(0, cfg), betas=(0.9, 0.999), fused=True)
    n, device = stack.cfgs[0].n_atoms, stack.stacked[0].device
    gens = [torch.Generator().manual_seed(cfg.seed) for _ in cells]
    st = _State(
        0,
        torch.zeros(len(cells), n, dtype=torch.long, device=device),
        gens,
        [TrainMetrics() for _ in cells],
    )
    stack.normalize_decoder_()
    if resume:
        _load_state(checkpoint, stack, opt, cfg, st)
    done, t0, last = st.step, time.perf_counter(), time.monotonic()
    elapsed = [m.elapsed_s for m in st.metrics]
    stop: list[int] = []
    with signals_to(stop, checkpoint is not None):
        # a sweep's source (a ModelSource with cells) gives dicts {cell: batch}
        for i, batch in enumerate(cast(Iterator[dict[Cell, Any]], cycle_batches(source))):
            if i < done:
                continue  # replayed to reach the checkpoint's position in the source
            if st.step >= cfg.n_steps:
                break
            results = _step(stack, opt, batch, cells, st, cfg)
            st.step += 1
            for c, m in enumerate(st.metrics):
                m.n_samples += dp.world_size() * results[c].sq_err.shape[0]
                m.n_steps, m.elapsed_s = st.step, elapsed[c] + time.perf_counter() - t0
            if st.step % cfg.log_every == 0 or st.step == cfg.n_steps:
                _record(st, batch, cells, results, cfg)
            if checkpoint is None or st.step >= cfg.n_steps:
                continue
            due = (
                (st.step % checkpoint_every == 0)
                if checkpoint_every
                else (time.monotonic() - last >= 300.0)
            )
            stopping, due = dp.agree(bool(stop), due)
            if stopping or due:
                _save_state(checkpoint, stack, opt, cfg, st)
                last = time.monotonic()
            if stopping:
                raise TrainingInterrupted(st.step, checkpoint, stop[0] if stop else signal.SIGTERM)
    if st.step < cfg.n_steps:
        logger.warning("sweep: the source ran out after %d of %d steps", st.step, cfg.n_steps)
    return st.metrics


def parse_cells(model: Any, layers: str | Sequence[int] | None, heads: str | Sequence[int] | None):
    """The cells ``(layer, head)`` of the given layers x heads (None or "all": every one)."""
    rec = list(model.cfg.recurrent_layers)

    def pick(spec, every: list[int], what: str) -> list[int]:
        if spec is None or spec == "all":
            return every
        vals = [int(x) for x in spec.split(",")] if isinstance(spec, str) else list(spec)
        bad = [v for v in vals if v not in every]
        if bad:
            raise ValueError(f"sweep: {what} {bad} not available; choose among {every}")
        return vals

    layers = pick(layers, rec, "layers")
    heads = pick(heads, list(range(model.cfg.n_heads)), "heads")
    return [(layer, head) for layer in layers for head in heads]


def sweep(
    model: Any,
    cells: Sequence[Cell] | str = "all",
    texts: Iterable[Any] | None = None,
    *,
    kind: str = "state",
    n_atoms: int = 512,
    k: int = 16,
    cfg: TrainConfig | None = None,
    model_name: str | None = None,
    context_len: int = 128,
    buffer_size: int = 16384,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    **overrides: Any,
) -> dict[Cell, tuple[BaseSAE, TrainMetrics]]:
    """Train one WriteSAE per cell from one pass of ``model`` over ``texts``.

    Args:
        model: a hooked recurrent model.
        cells: ``[(layer, head), ...]`` or ``"all"`` (every head of every recurrent layer).
        texts: strings or token sequences (e.g. :func:`writesae.corpus.documents`), packed into
            blocks of ``context_len`` tokens.
        kind: ``"state"`` or ``"write"`` input for every cell.
        cfg: training settings (``overrides`` replace single fields); ``cfg.seed`` seeds every
            cell's SAE, the shared shuffle and every cell's resampling.
        checkpoint: as in :func:`writesae.train`, for the whole sweep.
        checkpoint_every: as in :func:`writesae.train`.
        resume: as in :func:`writesae.train`.

    The SAEs train on the model's device (e.g. ``model.to("cuda")``); the shuffle buffer stays
    on the host and each step's batch is copied to the device.

    Returns:
        ``{cell: (sae, metrics)}``; each SAE equals the one ``train`` gives for its cell alone.
    """
    from hooked_recurrent.validation import model_fingerprint

    cfg = replace(cfg or TrainConfig(), **overrides)
    dp.init()
    device = next(model.parameters()).device
    cells = (
        cast(list[Cell], parse_cells(model, None, None))
        if cells == "all"
        else [cast(Cell, tuple(c)) for c in cells]
    )
    fp, name = model_fingerprint(model), model_name or getattr(model.cfg, "model_name", None)
    saes = [
        WriteSAE(
            WriteSAEConfig(
                d_k=model.cfg.d_k,
                d_v=model.cfg.d_v,
                n_atoms=n_atoms,
                k=k,
                hook_name=f"blocks.{layer}.attn.hook_{kind}",
                head=head,
                input_kind=kind,
                model_name=name,
                model_fingerprint=fp,
                n_heads=model.cfg.n_heads,
            ),
            seed=cfg.seed,
        )  # fmt: skip
        for layer, head in cells
    ]
    source = ModelSource(
        model, texts, *cells[0], kind=kind, batch_size=cfg.batch_size, buffer_size=buffer_size,
        context_len=context_len, seed=cfg.seed, cells=cells, device=device,
    )  # fmt: skip
    stack = StackedSAE(saes).to(device)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    metrics = train_stack(stack, cells, source, cfg, ckpt, checkpoint_every, resume)
    return {cell: (stack.cell(c), metrics[c]) for c, cell in enumerate(cells)}


def cell_folder(cell: Cell) -> str:
    """The sub-folder of a sweep's output holding a cell's SAE: ``layer{l}_head{h}``."""
    return f"layer{cell[0]}_head{cell[1]}"


def save_sweep(
    result: dict[Cell, tuple[BaseSAE, TrainMetrics]], out: str | Path, overwrite: bool = False
) -> Path:
    """Save every cell's SAE in its own folder (``cfg.json`` with its provenance, weights,
    ``training.json``) and ``sweep.json`` listing them; rank 0 writes."""
    out = Path(out)
    if dp.is_main():
        with atomic_dir(out, overwrite, "sweep folder") as tmp:
            for cell, (sae, metrics) in result.items():
                (tmp / cell_folder(cell)).mkdir()
                sae.save_into(tmp / cell_folder(cell))
                (tmp / cell_folder(cell) / "training.json").write_text(
                    json.dumps(metrics.final, indent=2)
                )
            index = {cell_folder(c): {"layer": c[0], "head": c[1]} for c in result}
            (tmp / "sweep.json").write_text(json.dumps(index, indent=2))
    dp.barrier()
    return out
