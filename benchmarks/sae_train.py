"""WriteSAE training throughput: write input from its factors vs materialised d_k x d_v matrices.

Same SAE (one initialisation, copied), same data (rank-1 writes ``k v^T``), same trainer
(``writesae.train``: Adam, AuxK, resampling, renormalisation); only the input representation
differs. The materialised matrices are built before timing, so the comparison is the SAE step only.

    PYTHONPATH=. python benchmarks/sae_train.py            # d_k = d_v = 128, 2048 atoms, k = 32

One run measures batch 256 (the trainer's default and the paper's) and batch 512: a factor step has
a part that does not grow with the batch (decoder-bias products over all atoms, Adam), so the
ratio grows with the batch; ``--batch`` takes any list of sizes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import time

import torch

import writesae
from writesae import TensorSource, WriteSAE, WriteSAEConfig

# OpenMP runs with the defaults a user gets (libgomp: idle threads spin briefly, then sleep). On a
# machine shared with other busy processes, spinning threads can slow small operations many-fold;
# there, run with OMP_WAIT_POLICY=PASSIVE (the header line says which policy was in force).


def timed_steps(sae: WriteSAE, data, steps: int, batch: int, seed: int) -> tuple[float, float]:
    """(samples per wall second, CPU seconds per step) of ``steps`` training steps.

    The CPU time of the process is reported too: on a shared machine the wall time depends on
    the other processes, the CPU time much less (with one thread it is the work done).
    """
    kw = dict(lr=3e-4, warmup_steps=0, progress=False, log_every=10**9)
    src = TensorSource(data, batch_size=batch, seed=seed)
    writesae.train(sae, src, n_steps=1, **kw)  # Adam state allocation, first-call overheads
    t0, c0 = time.perf_counter(), time.process_time()
    m = writesae.train(sae, src, n_steps=steps, **kw)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    assert m.n_steps == steps
    return steps * batch / dt, dc / steps


def writes_and_sae(
    d_k: int = 128, d_v: int = 128, n_atoms: int = 2048, k: int = 32, samples: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, WriteSAE]:
    """The benchmark's data (``samples`` random writes as key and value factors, keys of random
    scale) and its SAE (write input, seed 0); ``benchmarks/sae_train_profile.py`` uses the same."""
    g = torch.Generator().manual_seed(0)
    key = torch.randn(samples, d_k, generator=g) * torch.rand(samples, 1, generator=g)
    value = torch.randn(samples, d_v, generator=g)
    cfg = WriteSAEConfig(
        d_k=d_k, d_v=d_v, n_atoms=n_atoms, k=k, hook_name="blocks.9.attn.hook_write", head=4,
        input_kind="write",
    )  # fmt: skip
    return key, value, WriteSAE(cfg, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-k", type=int, default=128)
    ap.add_argument("--d-v", type=int, default=128)
    ap.add_argument("--n-atoms", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 512], help="batch sizes")
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--steps-factors", type=int, default=40, help="timed steps per round")
    ap.add_argument("--steps-matrices", type=int, default=4, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians reported")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    key, value, sae = writes_and_sae(args.d_k, args.d_v, args.n_atoms, args.k, args.samples)
    mats = key[:, :, None] * value[:, None, :]
    ratios = {b: run_batch(args, sae, key, value, mats, b) for b in args.batch}
    print(
        "summary, ratio factors / materialised (wall-clock samples/s, target >= 10): "
        + ", ".join(f"batch {b}: {r:.1f}x" for b, r in ratios.items())
    )


def run_batch(args, sae, key, value, mats, batch: int) -> float:
    """One interleaved comparison at one batch size; prints its table, returns the ratio."""
    sae_f, sae_m = copy.deepcopy(sae), copy.deepcopy(sae)
    sae_m.cfg = dataclasses.replace(sae.cfg, input_kind="state")  # train checks the input kind
    # interleaved rounds, so that a change in machine load hits both inputs alike
    runs_f, runs_m = [], []
    for r in range(args.rounds):
        runs_f.append(timed_steps(sae_f, (key, value), args.steps_factors, batch, r))
        runs_m.append(timed_steps(sae_m, mats, args.steps_matrices, batch, r))
    sps_f = statistics.median(r[0] for r in runs_f)
    sps_m = statistics.median(r[0] for r in runs_m)
    cpu_f = statistics.median(r[1] for r in runs_f)
    cpu_m = statistics.median(r[1] for r in runs_m)

    print(
        f"sae_train: d_k={args.d_k} d_v={args.d_v} n_atoms={args.n_atoms} k={args.k} "
        f"batch={batch} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"cpu={platform.processor() or platform.machine()} "
        f"load1={os.getloadavg()[0]:.1f} cores={os.cpu_count()} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    print()
    print(
        "| input | steps timed | samples/s (median) | wall ms/step | CPU ms/step "
        "| samples/s per round |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for name, sps, cpu, runs, steps in (
        ("factors (k, v)", sps_f, cpu_f, runs_f, args.steps_factors),
        ("materialised k v^T", sps_m, cpu_m, runs_m, args.steps_matrices),
    ):
        per = ", ".join(f"{r[0]:,.0f}" for r in runs)
        ms = 1e3 * batch / sps
        cpu_ms = 1e3 * cpu
        print(
            f"| {name} | {steps} x {args.rounds} | {sps:,.0f} | {ms:.1f} | {cpu_ms:.1f} | {per} |"
        )
    print()
    print(
        f"ratio factors / materialised, wall-clock samples/s: {sps_f / sps_m:.1f}x (target >= 10)"
    )
    print(f"ratio materialised / factors, CPU time per step:    {cpu_m / cpu_f:.1f}x")
    return sps_f / sps_m


if __name__ == "__main__":
    main()
