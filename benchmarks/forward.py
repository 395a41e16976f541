"""Forward-pass cost, side by side in one run: Hugging Face, ours, TransformerLens's bridge.

    python benchmarks/forward.py [--rounds 7]

Setup (the issue's): 2 threads, d_model 256, 4 layers (Qwen3.5: 3 Gated DeltaNet + 1 attention),
batch 4, seq 256, float32, median of interleaved rounds after one warm-up round.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import bench_qwen, bridge_for, interleaved_medians, rank1_write_edit, table  # noqa: E402

from hooked_recurrent import HookedRecurrentModel  # noqa: E402

B, T, VOCAB = 4, 256, 512


def qwen_rows(rounds: int) -> str:
    hf = bench_qwen(VOCAB)
    ours = HookedRecurrentModel.from_hf_model(hf)
    bridge = bridge_for(hf, VOCAB)
    tokens = torch.randint(0, VOCAB - 3, (B, T))
    edit = [("blocks.1.attn.hook_write", rank1_write_edit(T // 2))]
    meds = interleaved_medians(
        {
            "HF Qwen3_5ForCausalLM forward": lambda: hf(tokens, use_cache=False).logits,
            "ours forward": lambda: ours(tokens),
            "ours run_with_cache()": lambda: ours.run_with_cache(tokens),
            "ours run_with_hooks, rank-1 hook_write edit (1 layer, 1 position)": lambda: (
                ours.run_with_hooks(tokens, fwd_hooks=edit)
            ),
            "TransformerBridge forward": lambda: bridge(tokens, return_type="logits"),
            "TransformerBridge run_with_cache()": lambda: bridge.run_with_cache(tokens),
        },
        rounds=rounds,
    )
    return table(
        "Qwen3.5 (B=4, T=256, d_model=256, 4 layers)", meds, "HF Qwen3_5ForCausalLM forward"
    )


def _family_rows(name: str, rounds: int) -> str | None:
    path = Path(__file__).parent / f"forward_{name}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"forward_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.rows(rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", choices=["qwen3_5", "mamba2", "rwkv7"], default=None)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, rounds={args.rounds}\n")
    if args.only in (None, "qwen3_5"):
        print(qwen_rows(args.rounds), "\n", flush=True)
    for fam in ("mamba2", "rwkv7"):
        if args.only in (None, fam):
            rows = _family_rows(fam, args.rounds)
            if rows is not None:
                print(rows, "\n", flush=True)


if __name__ == "__main__":
    main()
