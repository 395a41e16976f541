"""RWKV-7 forward timing, side by side with the `rwkv` package (BlinkDL's CPU reference).

One small random model (C=256, 4 heads of 64, 4 layers, vocab 1024), one sequence of 256 tokens,
2 threads (env BENCH_THREADS), fp32, no grad. Each round times, interleaved: the rwkv package's
full-sequence forward (`model.forward(tokens, None, full_output=True)`, TorchScript, one token at
a time), our forward (chunked recurrence), our `run_with_cache()` (every hook except the matrix
ones), and our forward with one rank-1 edit of `hook_write` at one position of one head of one
layer, made in place as a TransformerLens hook would, propagated exactly to the later tokens. The
table gives the median over the rounds and the ratio to our forward (to the package for our
forward itself).

    python benchmarks/forward_rwkv7.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
from common import interleaved_times

SEQ, BATCH = 256, 1
CONFIG = dict(C=256, L=4, vocab=1024, Dw=32, Da=32, Dv=16, Dg=64, ffn=1024)


def _rwkv_package_model(path: Path):
    """The `rwkv` package's RWKV-7 on CPU in fp32 (it appends '.pth' to the name itself)."""
    os.environ["RWKV_V7_ON"] = "1"  # read when rwkv.model is first imported
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV

    return RWKV(model=str(path)[: -len(".pth")], strategy="cpu fp32")


def rows(rounds: int = 5) -> list[dict]:
    """Benchmark rows: name, median seconds, ratio, what the ratio is against, and the target."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from hooked_recurrent import HookedRecurrentModel
    from hooked_recurrent.pretrained.rwkv7 import random_blinkdl_state_dict

    with tempfile.TemporaryDirectory() as d:
        sd = random_blinkdl_state_dict(**CONFIG, seed=0)
        path = Path(d) / "RWKV-x070-bench.pth"
        torch.save(sd, path)
        ref = _rwkv_package_model(path)
        model = HookedRecurrentModel.from_pretrained(str(path)).eval()
    tokens = torch.randint(
        0, CONFIG["vocab"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0)
    )
    ids = tokens[0].tolist()
    layer, head, pos = CONFIG["L"] // 2, 1, SEQ // 2
    u, w = torch.randn(64), torch.randn(64)

    def edit(write, hook):  # TransformerLens style: edit in place
        write[:, pos, head] += torch.outer(u, w)
        return write

    def run_ref():
        return ref.forward(ids, None, full_output=True)[0]

    def run_ours():
        return model(tokens)

    def run_cache():
        return model.run_with_cache(tokens)[0]

    def run_edit():
        return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_write", edit)])

    cases = {
        "rwkv package forward (full_output)": run_ref,
        "ours: forward": run_ours,
        "ours: run_with_cache()": run_cache,
        "ours: rank-1 hook_write edit": run_edit,
    }
    with torch.no_grad():
        diff = (run_ours()[0] - run_ref()).abs().max().item()
    # two warm-up rounds: TorchScript profiling runs twice
    times = interleaved_times(cases, rounds=rounds, warmup=2)
    med = {k: statistics.median(v) for k, v in times.items()}
    ours = med["ours: forward"]
    targets = {
        "ours: forward": ("rwkv package", 1.0),
        "ours: run_with_cache()": ("ours: forward", 1.3),
        "ours: rank-1 hook_write edit": ("ours: forward", 1.5),
    }
    out = []
    for name, t in med.items():
        against, target = targets.get(name, ("", None))
        base = med["rwkv package forward (full_output)"] if against == "rwkv package" else ours
        out.append(
            dict(
                family="rwkv7",
                case=name,
                seq=SEQ,
                median_ms=1e3 * t,
                ratio=(t / base) if target else None,
                against=against,
                target=target,
                logits_max_abs_diff=diff if name == "ours: forward" else None,
            )
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    r = rows(args.rounds)
    print(
        f"RWKV-7, C={CONFIG['C']}, {CONFIG['L']} layers, seq {SEQ}, batch {BATCH}, "
        f"{torch.get_num_threads()} threads, "
        f"median of {args.rounds} interleaved rounds"
    )
    print("| case | median ms | ratio | against | target |\n|---|---|---|---|---|")
    for row in r:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else ""
        target = f"<= {row['target']}" if row["target"] else ""
        print(f"| {row['case']} | {row['median_ms']:.1f} | {ratio} | {row['against']} | {target} |")
    diff = next(x["logits_max_abs_diff"] for x in r if x["logits_max_abs_diff"] is not None)
    print(f"\nlogits max abs diff, ours vs rwkv package: {diff:.2e}")


if __name__ == "__main__":
    main()
