"""Forward-pass cost, side by side in one run: Hugging Face, ours, TransformerLens's bridge.

    python benchmarks/forward.py [--rounds 15] [--only FAMILY]

Setup (the issue's): 2 threads, d_model 256, 4 layers (Qwen3.5: 3 Gated DeltaNet + 1 attention;
Qwen3-Next the same with sparse MoE MLPs, `common.bench_qwen3_next`; Kimi Linear: 3 KDA + 1 MLA,
MoE, `common.bench_kimi`), batch 4, seq 256, float32,
median of interleaved rounds after one warm-up round. The write edit is timed with the hook
editing in place and returning its input (the TransformerLens idiom) and, for comparison, with a
hook that returns an edited copy.
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
    bench_kimi,
    bench_mamba1,
    bench_qwen,
    bench_qwen3_next,
    bridge_for,
    interleaved_medians,
    rank1_write_edit,
)

from hooked_recurrent import HookedRecurrentModel  # noqa: E402

B, T, VOCAB = 4, 256, 512
WRITE_HOOK = "blocks.1.attn.hook_write"


def inplace_write_edit(position: int, head: int = 0, scale: float = 0.1):
    """The TransformerLens idiom: add scale * u w^T to one head's write in place, return it."""

    def hook(x, hook):
        u = torch.ones(x.shape[-2]) / x.shape[-2] ** 0.5
        w = torch.ones(x.shape[-1]) / x.shape[-1] ** 0.5
        x[:, position, head] += scale * torch.outer(u, w)
        return x

    return hook


def qwen_rows(rounds: int) -> list[dict]:
    hf = bench_qwen(VOCAB)
    tokens = torch.randint(0, VOCAB - 3, (B, T))
    rows = gdn_rows(hf, "Qwen3.5", tokens, rounds, bridge=bridge_for(hf, VOCAB))
    return rows + backward_rows(HookedRecurrentModel.from_hf_model(hf), tokens, rounds)


def qwen3_next_rows(rounds: int) -> list[dict]:
    hf = bench_qwen3_next(VOCAB)
    return gdn_rows(hf, "Qwen3-Next (MoE)", torch.randint(0, VOCAB - 3, (B, T)), rounds)


def mamba1_rows(rounds: int) -> list[dict]:
    hf = bench_mamba1(VOCAB)
    return gdn_rows(hf, "Mamba-1", torch.randint(0, VOCAB - 3, (B, T)), rounds)


def kimi_rows(rounds: int) -> list[dict]:
    hf = bench_kimi(VOCAB)
    return gdn_rows(hf, "Kimi Linear", torch.randint(0, VOCAB - 3, (B, T)), rounds)


def jamba_rows(rounds: int) -> list[dict]:
    """A random Jamba: d_model 256, 4 layers (3 Mamba-1, then attention), expand 2, state 16;
    SwiGLU MLPs of 1024 at the even layers, MoE (4 experts of 1024, top-2) at the odd ones."""
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(0)
    cfg = JambaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=4,
        attn_layer_offset=3,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=16,
        pad_token_id=VOCAB - 2,
        eos_token_id=VOCAB - 1,
        bos_token_id=VOCAB - 1,
    )
    hf = JambaForCausalLM(cfg).eval()
    return gdn_rows(hf, "Jamba", torch.randint(0, VOCAB - 3, (B, T)), rounds)


def gdn_rows(
    hf, label: str, tokens, rounds: int, bridge=None, hook: str = WRITE_HOOK, copy: bool = True
) -> list[dict]:
    """Forward, run_with_cache and one write edit at `hook` of ours against the HF model (with
    `copy`, also the edit by a hook that returns a copy; and the TransformerBridge, when given)."""
    ours = HookedRecurrentModel.from_hf_model(hf)
    in_place = [(hook, inplace_write_edit(T // 2))]
    clone = [(hook, rank1_write_edit(T // 2))]
    base = f"HF `{type(hf).__name__}` forward"
    runs = {
        base: (lambda: hf(tokens, use_cache=False).logits, None),
        "ours, forward": (lambda: ours(tokens), 1.1),
        "ours, `run_with_cache()`": (lambda: ours.run_with_cache(tokens), 1.3),
        "ours, rank-1 `hook_write` edit, 1 layer, 1 position (in place)": (
            lambda: ours.run_with_hooks(tokens, fwd_hooks=in_place),
            1.5,
        ),
    }
    if copy:
        runs["ours, the same edit, the hook returning a copy"] = (
            lambda: ours.run_with_hooks(tokens, fwd_hooks=clone),
            None,
        )
    if bridge is not None:
        runs["TransformerBridge forward"] = (lambda: bridge(tokens, return_type="logits"), None)
        runs["TransformerBridge `run_with_cache()` (its state hooks silent)"] = (
            lambda: bridge.run_with_cache(tokens),
            None,
        )
    meds = interleaved_medians({k: f for k, (f, _) in runs.items()}, rounds=rounds)
    return [
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


def backward_rows(ours, tokens, rounds: int, name: str = "blocks.1.attn.hook_write") -> list:
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


def nemotron_h_rows(rounds: int) -> list[dict]:
    """A random Nemotron-H: d_model 256, 4 blocks (Mamba-2, MLP, Mamba-2, attention), 8 Mamba
    heads of 64, state 64, 1 group, chunk 64; the edit on the first Mamba-2 block."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    cfg = NemotronHConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        layers_block_type=["linear_attention", "mlp", "linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=1024,
        ssm_state_size=64,
        mamba_num_heads=8,
        mamba_head_dim=64,
        n_groups=1,
        chunk_size=64,
    )
    hf = NemotronHForCausalLM(cfg).eval()
    tokens = torch.randint(0, VOCAB - 3, (B, T))
    return gdn_rows(hf, "Nemotron-H", tokens, rounds, hook="blocks.0.attn.hook_write", copy=False)


def zamba2_rows(rounds: int) -> list[dict]:
    """A random Zamba2: d_model 256, 4 layers (Mamba-2, hybrid, Mamba-2, hybrid: one shared
    block with per-layer adapters, RoPE), 8 Mamba heads of 64, state 64, chunk 64; the edit on
    block 1's mixer."""
    from transformers import Zamba2Config, Zamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Zamba2Config(
        vocab_size=VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
        num_attention_heads=8,
        intermediate_size=1024,
        n_mamba_heads=8,
        mamba_d_state=64,
        chunk_size=64,
        adapter_rank=32,
        use_shared_attention_adapter=True,
        use_mem_rope=True,
    )
    hf = Zamba2ForCausalLM(cfg).eval()
    return gdn_rows(hf, "Zamba2", torch.randint(0, VOCAB - 3, (B, T)), rounds)


def xlstm_rows(rounds: int) -> list[dict]:
    """A random xLSTM: d_model 256, 4 mLSTM blocks of 4 heads (d_k 32, d_v 64), chunk 64; the
    edit on the first block."""
    from transformers import xLSTMConfig, xLSTMForCausalLM

    torch.manual_seed(0)
    cfg = xLSTMConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        num_heads=4,
        qk_dim_factor=0.5,
        v_dim_factor=1.0,
        chunk_size=64,
    )
    hf = xLSTMForCausalLM(cfg).eval()
    tokens = torch.randint(0, VOCAB - 3, (B, T))
    return gdn_rows(hf, "xLSTM", tokens, rounds, hook="blocks.0.attn.hook_write", copy=False)


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
    families = {
        "qwen3_5": qwen_rows,
        "qwen3_next": qwen3_next_rows,
        "kimi_linear": kimi_rows,
        "mamba2": mamba2_rows,
        "rwkv7": rwkv7_rows,
        "nemotron_h": nemotron_h_rows,
        "mamba1": mamba1_rows,
        "jamba": jamba_rows,
        "zamba2": zamba2_rows,
        "xlstm": xlstm_rows,
    }
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--only", choices=list(families), default=None)
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, rounds={args.rounds}, "
        f"load average {os.getloadavg()[0]:.2f}\n"
    )
    rows: list[dict] = []
    for fam, fn in families.items():
        if args.only in (None, fam):
            rows += fn(args.rounds)
    print(markdown(rows))


if __name__ == "__main__":
    main()
