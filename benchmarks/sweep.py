"""Scaling out: a sweep of 8 cells against 8 separate runs, 1 process x 2 threads against
2 processes x 1 thread (torchrun, gloo), and the extraction rate.

    PYTHONPATH=. python benchmarks/sweep.py                 # shipped tiny-qwen3.5-shakespeare
    PYTHONPATH=. python benchmarks/sweep.py --steps 120 --kind state
    PYTHONPATH=. python benchmarks/sweep.py --width 512 --layers 8   # random weights, wider model

The ratio of item 1 is set by how a model pass compares with an SAE step: a sweep saves 7 of 8
model passes and none of the 8 SAE steps. On the shipped tiny model (d_model 128, 4 layers) a pass
over a batch costs about as much as four SAE steps, which bounds the ratio near 3.6; ``--width``
and ``--layers`` build a Qwen3.5 of that shape with random weights (the shipped tokenizer, the
same per-head state size 32 x 32, so the SAEs are the same size) to show the regime of real
checkpoints, where the pass dominates.

One run, side by side in one script:

1. ``writesae.sweep`` of 8 cells spread over the layers and heads (one model pass feeds all)
   against 8 ``writesae.train`` runs of one cell each from a ``ModelSource`` (8 model passes,
   each up to its cell's layer), same seed, data and settings, in this
   process with 2 threads; reported: seconds, the ratio, and the largest parameter difference
   between a swept cell and the same cell trained alone (target: ratio >= 4, difference
   <= 1e-5).
2. Samples per second per cell of the same sweep (training loop only, ``TrainMetrics``) in one
   process with 2 threads against ``torchrun --nproc_per_node 2`` with 1 thread per process
   (the script relaunches itself with ``--worker``); target: the 2-process rate >= 0.8 x the
   1-process rate.
3. Extraction (``save_shards`` of a ``ModelSource``, state input, one cell) in tokens per second,
   in both settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import writesae
from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.pretrained import sample_text
from writesae import ModelSource, TrainConfig, WriteSAE, WriteSAEConfig
from writesae import distributed as dp

MODEL = "tiny-qwen3.5-shakespeare"


def wider(shipped: HookedRecurrentModel, width: int, layers: int) -> HookedRecurrentModel:
    """A Qwen3.5 of ``width`` x ``layers`` (every fourth layer attention, as shipped) with random
    weights, the shipped tokenizer and the shipped per-head sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hooked_recurrent.pretrained import _resolve

    cfg = AutoConfig.from_pretrained(_resolve(MODEL))
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = width, 3 * width, layers
    kinds = ("linear_attention", "linear_attention", "full_attention", "linear_attention")
    cfg.layer_types = [kinds[i % 4] for i in range(layers)]
    cfg.num_attention_heads = cfg.linear_num_value_heads = width // 32
    cfg.linear_num_key_heads = cfg.num_key_value_heads = width // 64
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    return HookedRecurrentModel.from_hf_model(hf, tokenizer=shipped.tokenizer).eval()


def setup(args: argparse.Namespace):
    """The model, its training text as blocks of ``args.context`` tokens, and 8 cells."""
    torch.manual_seed(0)
    m = HookedRecurrentModel.from_pretrained(MODEL).eval()
    if args.width:
        m = wider(m, args.width, args.layers)
    ids = m.to_tokens(sample_text("train"))[0]
    rows = len(ids) // args.context
    blocks = ids[: rows * args.context].view(rows, args.context)
    grid = [(layer, h) for layer in m.cfg.recurrent_layers for h in range(m.cfg.n_heads)]
    # 8 cells spread evenly over the (layer, head) grid, as a sweep over the model's layers
    cells = [grid[round(i * (len(grid) - 1) / 7)] for i in range(8)]
    return m, blocks, cells


def train_cfg(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        n_steps=args.steps, batch_size=args.batch, lr=1e-3, seed=0, progress=False, log_every=10**9
    )


def run_sweep(args, m, blocks, cells) -> tuple[float, dict]:
    t0 = time.perf_counter()
    res = writesae.sweep(
        m, cells, blocks, kind=args.kind, n_atoms=args.atoms, k=args.k, cfg=train_cfg(args),
        context_len=args.context, buffer_size=args.buffer,
    )  # fmt: skip
    return time.perf_counter() - t0, res


def run_alone(args, m, blocks, cell) -> WriteSAE:
    layer, head = cell
    cfg = WriteSAEConfig(
        d_k=m.cfg.d_k, d_v=m.cfg.d_v, n_atoms=args.atoms, k=args.k, head=head,
        hook_name=f"blocks.{layer}.attn.hook_{args.kind}", input_kind=args.kind,
    )  # fmt: skip
    sae = WriteSAE(cfg, seed=0)
    src = ModelSource(
        m, blocks, layer, head, kind=args.kind, batch_size=args.batch, buffer_size=args.buffer,
        context_len=args.context, seed=0,
    )  # fmt: skip
    writesae.train(sae, src, train_cfg(args))
    return sae


def extraction_rate(args, m, blocks) -> float:
    """Tokens per second of extracting one cell's states to shards (all ranks together)."""
    layer = m.cfg.recurrent_layers[-1]
    src = ModelSource(
        m, blocks[: args.extract_blocks], layer, 0, kind="state", context_len=args.context,
        share=False, drop_last=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        d = dp.gather_objects(d)[0]  # rank 0's folder (one machine)
        dp.barrier()
        t0 = time.perf_counter()
        writesae.save_shards(src, Path(d) / "shards")
        dt = time.perf_counter() - t0
        dp.barrier()
    return src.tokens_seen / dt


def model_name(args: argparse.Namespace) -> str:
    if not args.width:
        return MODEL
    return f"random Qwen3.5 d_model {args.width} x {args.layers} layers ({MODEL}'s tokenizer)"


def per_cell_rate(result: dict) -> float:
    """Median over cells of samples per second of the training loop."""
    rates = sorted(mt.samples_per_s for _, mt in result.values())
    return rates[len(rates) // 2]


def worker(args: argparse.Namespace) -> None:
    dp.init()
    m, blocks, cells = setup(args)
    _, res = run_sweep(args, m, blocks, cells)
    rate = extraction_rate(args, m, blocks)
    if dp.is_main():
        print("RESULT " + json.dumps({"per_cell": per_cell_rate(res), "extract": rate}))


def two_processes(args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        __file__, "--worker", *sys.argv[1:],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise RuntimeError(f"torchrun failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line[0][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--atoms", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--kind", default="write", choices=("write", "state"))
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--buffer", type=int, default=4096)
    p.add_argument("--extract-blocks", type=int, default=256)
    p.add_argument("--width", type=int, default=0, help="random Qwen3.5 of this d_model")
    p.add_argument("--layers", type=int, default=8, help="its number of layers (with --width)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    torch.set_num_threads(2)
    m, blocks, cells = setup(args)
    load = os.getloadavg()[0]
    t_sweep, res = run_sweep(args, m, blocks, cells)
    t0, diff = time.perf_counter(), 0.0
    for cell in cells:
        sae = run_alone(args, m, blocks, cell)
        swept = res[cell][0]
        diff = max(diff, *((p - swept.get_parameter(n)).abs().max().item()
                          for n, p in sae.named_parameters()))  # fmt: skip
    t_alone = time.perf_counter() - t0
    one = {"per_cell": per_cell_rate(res), "extract": extraction_rate(args, m, blocks)}
    two = two_processes(args)
    print(
        f"torch {torch.__version__}, {model_name(args)}, {len(cells)} cells {cells}, "
        f"input {args.kind}, "
        f"{args.atoms} atoms, k={args.k}, batch {args.batch}, {args.steps} steps, context "
        f"{args.context}; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    print("\n| measure | value | ratio | target | met |\n|---|---:|---:|---:|:---:|")
    ratio = t_alone / t_sweep
    print(f"| 8 separate runs, s | {t_alone:.1f} | | | |")
    print(f"| sweep of 8 cells, s | {t_sweep:.1f} | {ratio:.2f}x faster | >= 4 | "
          f"{'yes' if ratio >= 4 else '**no**'} |")  # fmt: skip
    print(f"| max abs parameter difference, sweep vs alone | {diff:.2e} | | <= 1e-5 | "
          f"{'yes' if diff <= 1e-5 else '**no**'} |")  # fmt: skip
    r = two["per_cell"] / one["per_cell"]
    print(f"| samples/s per cell, 1 process x 2 threads | {one['per_cell']:.0f} | 1.00 | | |")
    print(f"| samples/s per cell, 2 processes x 1 thread | {two['per_cell']:.0f} | {r:.2f} | "
          f">= 0.8 | {'yes' if r >= 0.8 else '**no**'} |")  # fmt: skip
    r = two["extract"] / one["extract"]
    print(f"| extraction tokens/s, 1 process x 2 threads | {one['extract']:.0f} | 1.00 | | |")
    print(f"| extraction tokens/s, 2 processes x 1 thread | {two['extract']:.0f} | {r:.2f} | | |")


if __name__ == "__main__":
    main()
