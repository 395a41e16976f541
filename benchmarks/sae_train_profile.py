"""Where a WriteSAE training step from factors spends its time: torch.profiler, per operator.

Same SAE and data as ``benchmarks/sae_train.py`` (d_k = d_v = 128, 2048 atoms, k = 32, write
input from its factors). Trains a few steps to warm up, then profiles ``--steps`` steps and prints
the operators by their own time per step, grouped by input shapes (so the two encoder products,
the two Gram products and the two backward products show up as separate rows). The profiler
adds its own overhead to every operator, so the total is above ``sae_train.py``'s step time.

    PYTHONPATH=. python benchmarks/sae_train_profile.py [--batch 256] [--steps 40]
"""

from __future__ import annotations

import argparse

import torch
from sae_train import writes_and_sae
from torch.profiler import ProfilerActivity, profile

import writesae
from writesae import TensorSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=25, help="operators to list")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    key, value, sae = writes_and_sae()
    kw = dict(lr=3e-4, warmup_steps=0, progress=False, log_every=10**9)
    src = TensorSource((key, value), batch_size=args.batch, seed=0)
    writesae.train(sae, src, n_steps=5, **kw)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        writesae.train(sae, src, n_steps=args.steps, **kw)

    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
    print(f"factor step, batch {args.batch}, {args.threads} threads: {total:.1f} ms of operator")
    print("self time per step under the profiler\n")
    print("| operator | calls per step | ms per step | share | input shapes |")
    print("|---|---:|---:|---:|---|")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]
    for e in top:
        ms = e.self_cpu_time_total / args.steps / 1e3
        shapes = str(e.input_shapes)[:70]
        print(f"| {e.key} | {e.count / args.steps:.1f} | {ms:.2f} | {ms / total:.0%} | {shapes} |")


if __name__ == "__main__":
    main()
