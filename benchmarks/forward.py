"""Forward-pass cost, side by side in one run: Hugging Face, ours, TransformerLens's bridge.

    python benchmarks/forward.py [--rounds 15] [--only FAMILY]

Setup (the issue's): 2 threads, d_model 256, 4 layers (Qwen3.5: 3 Gated DeltaNet + 1 attention;
Mamba-1: expand 2, state 16), batch 4, seq 256, float32, median of interleaved rounds after one
warm-up round. The write edit is timed with the hook editing in place and returning its input
(the TransformerLens idiom) and, for comparison, with a hook that returns an edited copy.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    bench_mamba1,
    bench_qwen,
    bridge_for,
    interleaved_medians,
    rank1_write_edit,
)
from torch import Tensor  # noqa: E402

from hooked_recurrent import HookedRecurrentModel  # noqa: E402

B, T, VOCAB = 4, 256, 512


def inplace_write_edit(position: int, head: int = 0, scale: float = 0.1):
    """The TransformerLens idiom: add scale * u w^T to one head's write in place, return it."""

    def hook(x, hook):
        u = torch.ones(x.shape[-2]) / x.shape[-2] ** 0.5
        w = torch.ones(x.shape[-1]) / x.shape[-1] ** 0.5
        x[:, position, head] += scale * torch.outer(u, w)
        return x

    return hook


def hf_rows(label: str, hf, name: str, rounds: int) -> tuple[list[dict], object, Tensor]:
    """The rows of one family against its `transformers` model: forward, `run_with_cache()`, a
    rank-1 edit of the `hook_write` called `name` (in place, and on a copy), and TransformerLens's
    bridge. Returns (rows, our model, the tokens)."""
    ours = HookedRecurrentModel.from_hf_model(hf)
    bridge = bridge_for(hf, VOCAB)
    tokens = torch.randint(0, VOCAB - 3, (B, T))
    in_place = [(name, inplace_write_edit(T // 2))]
    clone = [(name, rank1_write_edit(T // 2))]
    base = f"HF `{type(hf).__name__}` forward"
    runs = {
        base: (lambda: hf(tokens, use_cache=False).logits, None),
        "ours, forward": (lambda: ours(tokens), 1.1),
        "ours, `run_with_cache()`": (lambda: ours.run_with_cache(tokens), 1.3),
        "ours, rank-1 `hook_write` edit, 1 layer, 1 position (in place)": (
            lambda: ours.run_with_hooks(tokens, fwd_hooks=in_place),
            1.5,
        ),
        "ours, the same edit, the hook returning a copy": (
            lambda: ours.run_with_hooks(tokens, fwd_hooks=clone),
            None,
        ),
        "TransformerBridge forward": (lambda: bridge(tokens, return_type="logits"), None),
        "TransformerBridge `run_with_cache()` (its state hooks silent)": (
            lambda: bridge.run_with_cache(tokens),
            None,
        ),
    }
    meds = interleaved_medians({k: f for k, (f, _) in runs.items()}, rounds=rounds)
    rows = [
        dict(
            model=label,
            run=k,
            ms=1e3 * meds[k],
            against=None if k == base else "HF",
            ratio=meds[k] / meds[base],
            target=runs[k][1],
        )
        for k in runs
    ]
    return rows, ours, tokens


def qwen_rows(rounds: int) -> list[dict]:
    name = "blocks.1.attn.hook_write"
    rows, ours, tokens = hf_rows("Qwen3.5", bench_qwen(VOCAB), name, rounds)
    return rows + backward_rows(ours, tokens, name, rounds)


def mamba1_rows(rounds: int) -> list[dict]:
    return hf_rows("Mamba-1", bench_mamba1(VOCAB), "blocks.2.attn.hook_write", rounds)[0]


def backward_rows(ours, tokens, name: str, rounds: int) -> list[dict]:
    """backward() of one logit, with a backward hook on one `hook_write` (it gets the adjoint
    state dL/dS_t of every position) against the same backward without hooks."""
    got = []

    def plain():
        ours.zero_grad(set_to_none=True)
        ours(tokens)[0, -1, 5].backward()

    def hooked():
        ours.zero_grad(set_to_none=True)
        with ours.hooks(bwd_hooks=[(name, lambda g, hook: got.append(g.shape))]):
            ours(tokens)[0, -1, 5].backward()

    base = "ours, forward + backward() of one logit"
    runs = {base: plain, "the same with a backward hook on one `hook_write`": hooked}
    meds = interleaved_medians(runs, rounds=rounds, grad=True)
    assert got, "the backward hook never fired"
    return [
        dict(
            model="Qwen3.5",
            run=k,
            ms=1e3 * meds[k],
            against=None if k == base else "ours backward",
            ratio=meds[k] / meds[base],
            target=None if k == base else 1.5,
        )
        for k in runs
    ]


def _load(name: str):
    path = Path(__file__).parent / f"forward_{name}.py"
    spec = importlib.util.spec_from_file_location(f"forward_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mamba2_rows(rounds: int) -> list[dict]:
    targets = {
        "ours: forward": 1.1,
        "ours: run_with_cache()": 1.3,
        "ours: rank-1 hook_write edit (in place)": 1.5,
    }
    out = []
    for r in _load("mamba2").rows(rounds):
        base = r["condition"].startswith("HF")
        out.append(
            dict(
                model="Mamba-2",
                run=r["condition"],
                ms=r["median_ms"],
                against=None if base else "HF",
                ratio=r["ratio"],
                target=targets.get(r["condition"]),
            )
        )
    return out


def rwkv7_rows(rounds: int) -> list[dict]:
    out = []
    for r in _load("rwkv7").rows(rounds):
        against = {"rwkv package": "package", "ours: forward": "ours"}.get(r["against"])
        out.append(
            dict(
                model="RWKV-7",
                run=r["case"],
                ms=r["median_ms"],
                against=against,
                ratio=r["ratio"] if r["ratio"] is not None else 1.0,
                target=r["target"],
            )
        )
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | run | median ms | ratio | target | met |",
        "|---|---|---:|---:|---:|:---:|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" + (f" to {r['against']}" if r["against"] else "")
        target = f"<= {r['target']}" if r["target"] else ""
        met = ("yes" if r["ratio"] <= r["target"] else "**no**") if r["target"] else ""
        lines.append(f"| {r['model']} | {r['run']} | {r['ms']:.1f} | {ratio} | {target} | {met} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--only", choices=["qwen3_5", "mamba2", "rwkv7", "mamba"], default=None)
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, rounds={args.rounds}, "
        f"load average {os.getloadavg()[0]:.2f}\n"
    )
    rows: list[dict] = []
    families = (
        ("qwen3_5", qwen_rows),
        ("mamba2", mamba2_rows),
        ("rwkv7", rwkv7_rows),
        ("mamba", mamba1_rows),
    )
    for fam, fn in families:
        if args.only in (None, fam):
            rows += fn(args.rounds)
    print(markdown(rows))


if __name__ == "__main__":
    main()
