"""Cost of the substitution evaluation and of the first-order closed form against plain forwards.

    python benchmarks/evaluate.py [--firings 1000] [--edits 1000]

The substitution test compares four conditions (native, atom, deletion, random) at each firing.
It reuses the clean prefix: prompts advance from one evaluated position to the next with the
stateful forward, and the four conditions are one batched recurrent step from that state. The
reference cost is one plain forward pass of the firing's prompt per firing, batched the same way
(16 prompts per call); the one-prompt-per-call cost is printed too. Model: a randomly initialised
Qwen3.5 of the shipped size (d_model 128, 4 layers, 3 Gated DeltaNet), prompts of 64 tokens, 16
evaluated positions per prompt, 2 threads.

The first-order closed form (`closed_form_logit_shift(..., method="first_order")`) is timed for
`--edits` edits (8 atoms x edits/8 prompts, edited and read at position 32, every logit's
derivative), everything included (the layer's cache, the prefix state, the read response and the
forward pass with dual tensors), against one plain forward of the edit's prompt per edit, 16
prompts per call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

import torch  # noqa: E402

from hooked_recurrent import HookedRecurrentModel  # noqa: E402
from writesae import WriteSAE, WriteSAEConfig  # noqa: E402
from writesae.evaluate import closed_form_logit_shift, evaluate_substitution  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--firings", type=int, default=1000)
    ap.add_argument("--edits", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import train_toy_models as T

    model = HookedRecurrentModel.from_hf_model(T.build_qwen(0).eval())
    layer = model.cfg.recurrent_layers[1]
    sae = WriteSAE(
        WriteSAEConfig(
            d_k=model.cfg.d_k,
            d_v=model.cfg.d_v,
            n_atoms=256,
            k=8,
            hook_name=f"blocks.{layer}.attn.hook_state",
            head=0,
        ),
        seed=0,
    )
    per_prompt, T_len = 16, 64
    n_prompts = -(-args.firings // per_prompt)
    tokens = torch.randint(
        0, model.cfg.d_vocab, (n_prompts, T_len), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        model(tokens[:16])  # warm-up
        t0 = time.perf_counter()
        res = evaluate_substitution(
            model,
            sae,
            tokens,
            max_firings=args.firings,
            positions_per_prompt=per_prompt,
            progress=False,
        )
        t_eval = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate_substitution(
            model,
            sae,
            tokens,
            max_firings=args.firings,
            positions_per_prompt=per_prompt,
            best_atom=True,
            planted_cosines=(0.1, 0.5, 0.9),
            sweep_scales=("coefficient", 0.1),
            progress=False,
        )
        t_report = time.perf_counter() - t0
        # one plain forward per firing, batched like the evaluation (16 prompts per call)
        rows = torch.tensor([b for b, _ in res.firings])
        t0 = time.perf_counter()
        for i in range(0, len(rows), 16):
            model(tokens[rows[i : i + 16]])
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in rows[:100].tolist():
            model(tokens[b : b + 1])
        t_single = (time.perf_counter() - t0) * len(rows) / 100
    print(f"firings evaluated: {res.n} ({n_prompts} prompts x {per_prompt} positions, T={T_len})")
    print("| run | seconds | ratio |")
    print("|---|---:|---:|")
    print(
        f"| substitution evaluation (4 conditions per firing) | {t_eval:.2f} | "
        f"{t_eval / t_plain:.2f} |"
    )
    print(
        f"| the same with the report's controls (best atom, 3 planted, 2 more scales: 10 "
        f"conditions) | {t_report:.2f} | {t_report / t_plain:.2f} |"
    )
    print(f"| plain forward per firing, 16 prompts per call | {t_plain:.2f} | 1.00 |")
    print(
        f"| plain forward per firing, 1 prompt per call (extrapolated from 100) | "
        f"{t_single:.2f} | {t_single / t_plain:.2f} |"
    )

    n_atoms = 8
    n_p = -(-args.edits // n_atoms)
    prompts = (
        tokens[:n_p]
        if n_p <= len(tokens)
        else torch.randint(
            0, model.cfg.d_vocab, (n_p, T_len), generator=torch.Generator().manual_seed(1)
        )
    )
    with torch.no_grad():
        t0 = time.perf_counter()
        pred = closed_form_logit_shift(
            model,
            sae,
            layer,
            0,
            list(range(n_atoms)),
            32,
            torch.arange(model.cfg.d_vocab),
            tokens=prompts,
            method="first_order",
        )
        t_cf = time.perf_counter() - t0
        rows = torch.arange(n_p).repeat(n_atoms)
        t0 = time.perf_counter()
        for i in range(0, len(rows), 16):
            model(prompts[rows[i : i + 16]])
        t_plain_cf = time.perf_counter() - t0
    print()
    print(
        f"first-order closed form: {pred.shape[0] * pred.shape[1]} edits, "
        f"all {pred.shape[2]} logits"
    )
    print("| run | seconds | ratio |")
    print("|---|---:|---:|")
    print(f"| first-order closed form (one dual forward) | {t_cf:.2f} | {t_cf / t_plain_cf:.2f} |")
    print(f"| plain forward per edit, 16 prompts per call | {t_plain_cf:.2f} | 1.00 |")


if __name__ == "__main__":
    main()
