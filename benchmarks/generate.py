"""Generation cost per new token, side by side in one run: ours against Hugging Face `generate`.

    python benchmarks/generate.py [--rounds 5] [--new 32]

Per-token time = (time to generate new+1 tokens - time to generate 1 token) / new, so the prompt's
prefill cancels out. Rows: prompt length 64 and 1024 (a recurrent model's step must not grow with
the prompt), with and without a hook on `hook_write` of one layer (it fires on every step), and
Hugging Face's greedy `generate` on the same weights where transformers has the family. 2 threads,
batch 1, d_model 256, 4 layers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import bench_qwen, interleaved_medians  # noqa: E402

from hooked_recurrent import HookedRecurrentModel  # noqa: E402

VOCAB = 512


def qwen():
    hf = bench_qwen(VOCAB)
    return "Qwen3.5", hf, HookedRecurrentModel.from_hf_model(hf)


def mamba2():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        expand=2,
        head_dim=64,
        num_heads=8,
        n_groups=1,
        state_size=64,
        conv_kernel=4,
        chunk_size=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    hf = Mamba2ForCausalLM(cfg).eval()
    return "Mamba-2", hf, HookedRecurrentModel.from_hf_model(hf)


def rwkv7():
    from hooked_recurrent.pretrained import rwkv7 as fam

    model = fam.random_model(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, head_dim=64, seed=0
    )
    return "RWKV-7", None, model


def per_token(fn_new, fn_one, new: int) -> float:
    return (fn_new - fn_one) / new


def run(builder, rounds: int, new: int) -> str:
    name, hf, ours = builder()
    layer = ours.cfg.recurrent_layers[0]
    touch = [(f"blocks.{layer}.attn.hook_write", lambda x, hook: x * 1.0)]
    if hf is not None:
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
    fns = {}
    for P in (64, 1024):
        prompt = torch.randint(1, VOCAB, (1, P), generator=torch.Generator().manual_seed(P))
        for n in (1, new + 1):
            fns[f"ours P={P} n={n}"] = lambda p=prompt, n=n: ours.generate(
                p, n, stop_at_eos=False, verbose=False
            )
            fns[f"ours+hook P={P} n={n}"] = lambda p=prompt, n=n: ours.generate(
                p, n, stop_at_eos=False, verbose=False, fwd_hooks=touch
            )
            if hf is not None:
                fns[f"HF P={P} n={n}"] = lambda p=prompt, n=n: hf.generate(
                    p, max_new_tokens=n, min_new_tokens=n, do_sample=False
                )
    med = interleaved_medians(fns, rounds=rounds)
    rows = [
        f"### {name} (batch 1, {new} new tokens)",
        "",
        "| prompt | ours ms/token | ours + hook_write hook | hook / plain |"
        + (" HF generate ms/token | ours / HF |" if hf is not None else ""),
        "|---:|---:|---:|---:|" + ("---:|---:|" if hf is not None else ""),
    ]
    per = {}
    for P in (64, 1024):
        o = per_token(med[f"ours P={P} n={new + 1}"], med[f"ours P={P} n=1"], new)
        h = per_token(med[f"ours+hook P={P} n={new + 1}"], med[f"ours+hook P={P} n=1"], new)
        per[P] = o
        line = f"| {P} | {o * 1e3:.2f} | {h * 1e3:.2f} | {h / o:.2f} |"
        if hf is not None:
            t = per_token(med[f"HF P={P} n={new + 1}"], med[f"HF P={P} n=1"], new)
            line += f" {t * 1e3:.2f} | {o / t:.2f} |"
        rows.append(line)
    rows.append("")
    rows.append(f"Prompt 1024 / prompt 64, ours per token: {per[1024] / per[64]:.2f}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--only", choices=["qwen3_5", "mamba2", "rwkv7"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, rounds={args.rounds}\n")
    for key, builder in (("qwen3_5", qwen), ("mamba2", mamba2), ("rwkv7", rwkv7)):
        if args.only in (None, key):
            try:
                print(run(builder, args.rounds, args.new), "\n", flush=True)
            except (ImportError, AttributeError) as e:
                print(f"### {key}: skipped ({e})\n")


if __name__ == "__main__":
    main()
