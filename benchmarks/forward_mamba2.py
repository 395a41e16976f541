"""Mamba-2 forward-pass timing: Hugging Face vs hooked_recurrent vs TransformerLens's bridge.

Setup (as in the issue and the peer review's `t2_timing.py`): 2 CPU threads, a random
`Mamba2ForCausalLM` with d_model 256, 4 layers, expand 2, 8 heads of 64, state 64, 1 group,
chunk 64, vocabulary 512; batch 4, 256 tokens. Each round runs every condition once, in turn
(interleaved), and the table reports the median over rounds (round 0, the warm-up, is dropped),
with the ratio to the Hugging Face forward.

    python benchmarks/forward_mamba2.py [rounds]

`rows(rounds)` returns the table rows, for `benchmarks/forward.py`.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bridge_for, interleaved_times  # noqa: E402

VOCAB = 512
BATCH, SEQ = 4, 256
EDIT_LAYER, EDIT_HEAD, EDIT_POS = 2, 3, 100


def mamba2_hf(seed: int = 0, hidden: int = 256, layers: int = 4, vocab: int = VOCAB):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    cfg = Mamba2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        expand=2,
        head_dim=64,
        num_heads=(2 * hidden) // 64,
        n_groups=1,
        state_size=64,
        conv_kernel=4,
        chunk_size=64,
        pad_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        bos_token_id=vocab - 1,
        tie_word_embeddings=False,
    )
    return Mamba2ForCausalLM(cfg).eval()


def rows(rounds: int = 7) -> list[dict]:
    """Time every condition `rounds` times, interleaved; one dict per condition.

    Keys: `condition`, `median_ms`, `min_ms`, `ratio` (median / HF forward median),
    `min_ratio` (min / HF forward min).
    """
    from hooked_recurrent import HookedRecurrentModel

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    logging.getLogger("hooked_recurrent").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(1)
    toks = torch.randint(0, VOCAB - 3, (BATCH, SEQ))
    hf = mamba2_hf()
    ours = HookedRecurrentModel.from_hf_model(hf)
    bridge = bridge_for(hf, VOCAB)  # boots on a deep copy, with a tokenizer saved to disk

    g = torch.Generator().manual_seed(2)
    u = torch.randn(64, generator=g)  # d_state
    w = torch.randn(64, generator=g)  # headdim

    def write_edit_in_place(x, hook):  # rank-1 addition to one head's write at one position
        x[:, EDIT_POS, EDIT_HEAD] += 0.1 * u[:, None] * w[None, :]
        return x

    def write_edit_clone(x, hook):  # the same, on a copy (the hook allocates its own tensor)
        x = x.clone()
        x[:, EDIT_POS, EDIT_HEAD] += 0.1 * u[:, None] * w[None, :]
        return x

    hook = f"blocks.{EDIT_LAYER}.attn.hook_write"
    conds: list[tuple[str, Callable]] = [
        ("HF Mamba2ForCausalLM forward", lambda: hf(toks, use_cache=False).logits),
        ("ours: forward", lambda: ours(toks)),
        ("ours: run_with_cache()", lambda: ours.run_with_cache(toks)),
        (
            "ours: rank-1 hook_write edit (in place)",
            lambda: ours.run_with_hooks(toks, fwd_hooks=[(hook, write_edit_in_place)]),
        ),
        (
            "ours: rank-1 hook_write edit (hook clones)",
            lambda: ours.run_with_hooks(toks, fwd_hooks=[(hook, write_edit_clone)]),
        ),
        ("TL TransformerBridge forward", lambda: bridge(toks, return_type="logits")),
        ("TL TransformerBridge run_with_cache()", lambda: bridge.run_with_cache(toks)),
    ]
    times = interleaved_times(dict(conds), rounds=rounds, warmup=1)
    base = statistics.median(times[conds[0][0]])
    base_min = min(times[conds[0][0]])
    return [
        dict(
            condition=name,
            median_ms=1e3 * statistics.median(ts),
            min_ms=1e3 * min(ts),
            ratio=statistics.median(ts) / base,
            min_ratio=min(ts) / base_min,  # steadier than the median on a shared, busy machine
        )
        for name, ts in times.items()
    ]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    table = rows(rounds)
    print(
        f"Mamba-2, 2 threads, batch {BATCH} x {SEQ} tokens, d_model 256, 4 layers; "
        f"median of {rounds} interleaved rounds"
    )
    print(f"{'condition':48s} {'median ms':>10s} {'min ms':>8s} {'x HF':>6s} {'min x HF':>9s}")
    for r in table:
        print(
            f"{r['condition']:48s} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {r['ratio']:6.2f} "
            f"{r['min_ratio']:9.2f}"
        )


if __name__ == "__main__":
    main()
