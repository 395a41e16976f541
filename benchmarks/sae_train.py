"""WriteSAE training throughput: write input from its factors vs materialised d_k x d_v matrices.

Same SAE (one initialisation, copied), same data (rank-1 writes ``k v^T``), same trainer
(``writesae.train``: Adam, AuxK, resampling, renormalisation); only the input representation
differs. The materialised matrices are built before timing, so the comparison is the SAE step only.

    PYTHONPATH=. python benchmarks/sae_train.py            # d_k = d_v = 128, 2048 atoms, k = 32
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch

import writesae
from writesae import TensorSource, WriteSAE, WriteSAEConfig


def run(sae: WriteSAE, data, steps: int, batch: int, warmup: int) -> float:
    """Samples per second of ``steps`` training steps, after ``warmup`` untimed steps."""
    kw = dict(lr=3e-4, warmup_steps=0, progress=False, log_every=10**9)
    writesae.train(
        copy.deepcopy(sae), TensorSource(data, batch_size=batch, seed=0), n_steps=warmup, **kw
    )
    t0 = time.perf_counter()
    m = writesae.train(sae, TensorSource(data, batch_size=batch, seed=0), n_steps=steps, **kw)
    dt = time.perf_counter() - t0
    assert m.n_steps == steps
    return steps * batch / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-k", type=int, default=128)
    ap.add_argument("--d-v", type=int, default=128)
    ap.add_argument("--n-atoms", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--steps-factors", type=int, default=60)
    ap.add_argument("--steps-matrices", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    key = torch.randn(args.samples, args.d_k, generator=g) * torch.rand(
        args.samples, 1, generator=g
    )
    value = torch.randn(args.samples, args.d_v, generator=g)
    mats = key[:, :, None] * value[:, None, :]
    cfg = WriteSAEConfig(
        d_k=args.d_k,
        d_v=args.d_v,
        n_atoms=args.n_atoms,
        k=args.k,
        hook_name="blocks.9.attn.hook_write",
        head=4,
        input_kind="write",
    )
    sae = WriteSAE(cfg, seed=0)

    sps_f = run(copy.deepcopy(sae), (key, value), args.steps_factors, args.batch, warmup=2)
    sps_m = run(copy.deepcopy(sae), mats, args.steps_matrices, args.batch, warmup=1)

    print(
        f"sae_train: d_k={args.d_k} d_v={args.d_v} n_atoms={args.n_atoms} k={args.k} "
        f"batch={args.batch} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"cpu={platform.processor() or platform.machine()} "
        f"load1={os.getloadavg()[0]:.1f} cores={os.cpu_count()}"
    )
    print()
    print("| input | steps timed | samples/s | ms/step |")
    print("|---|---:|---:|---:|")
    for name, sps, steps in (
        ("factors (k, v)", sps_f, args.steps_factors),
        ("materialised k v^T", sps_m, args.steps_matrices),
    ):
        print(f"| {name} | {steps} | {sps:,.0f} | {1e3 * args.batch / sps:.1f} |")
    print()
    print(f"ratio factors / materialised: {sps_f / sps_m:.1f}x (target >= 10)")


if __name__ == "__main__":
    main()
