"""Shared benchmark helpers: threads, interleaved timing, tiny model builders, an offline bridge."""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(2)


def interleaved_times(
    fns: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 1, grad: bool = False
) -> dict[str, list[float]]:
    """Seconds of every timed round per function; each round runs every function once, in turn
    (under `torch.no_grad()` unless `grad`), after `warmup` untimed rounds. The one timing loop of
    the benchmarks."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.set_grad_enabled(grad):
        for r in range(rounds + warmup):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
                del out
                if r >= warmup:
                    times[name].append(dt)
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 1, grad: bool = False
) -> dict[str, float]:
    """Median seconds per function of `interleaved_times`."""
    times = interleaved_times(fns, rounds, warmup, grad)
    return {k: statistics.median(v) for k, v in times.items()}


def word_tokenizer(vocab: int):
    """A throwaway word-level tokenizer saved to disk and reloaded (TransformerBridge needs one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    v = {f"t{i}": i for i in range(vocab - 3)}
    v.update({"<unk>": vocab - 3, "<pad>": vocab - 2, "<eos>": vocab - 1})
    tk = Tokenizer(models.WordLevel(vocab=v, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<eos>",
    )
    d = tempfile.mkdtemp()
    fast.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def bridge_for(hf_model, vocab: int):
    """TransformerLens 4.3's TransformerBridge on a deep copy of `hf_model`, booted offline."""
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401  (registers the source)
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        "local-tiny",
        hf_model=copy.deepcopy(hf_model),
        tokenizer=word_tokenizer(vocab),
        device="cpu",
        dtype=torch.float32,
    )


def rank1_write_edit(position: int, head: int = 0, scale: float = 0.1):
    """A hook adding scale * u w^T to one head's write at one position."""

    def hook(x, hook):
        x = x.clone()
        u = torch.ones(x.shape[-2]) / x.shape[-2] ** 0.5
        w = torch.ones(x.shape[-1]) / x.shape[-1] ** 0.5
        x[:, position, head] += scale * torch.outer(u, w)
        return x

    return hook


def bench_qwen(vocab: int = 512):
    """The Qwen3.5 of the benchmarks: d_model 256, 3 Gated DeltaNet + 1 attention layer."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    cfg = Qwen3_5TextConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    return Qwen3_5ForCausalLM(cfg).eval()


def bench_qwen3_next(vocab: int = 512):
    """The Qwen3-Next of the benchmarks: `bench_qwen`'s shapes, every MLP a sparse MoE (16
    experts of width 128, 4 per token, a shared expert of width 256), random routers."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3NextConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=256,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = Qwen3NextForCausalLM(cfg).eval()
    with torch.no_grad():  # routers start at zero, where every token would tie
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model


def bench_kimi(vocab: int = 512):
    """The Kimi Linear of the benchmarks: d_model 256, 3 KDA (4 heads of 64) + 1 MLA layer, a
    dense first block, then MoE (top-2 of 8 experts of width 128, one shared expert)."""
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    torch.manual_seed(0)
    cfg = KimiLinearConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=128,
        q_lora_rank=None,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
        num_local_experts=8,
        num_experts_per_tok=2,
        linear_attn_config={"head_dim": 64, "num_heads": 4, "short_conv_kernel_size": 4},
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    return KimiLinearForCausalLM(cfg).eval()


def bench_mamba1(vocab: int = 512):
    """The Mamba-1 of the benchmarks: d_model 256, 4 layers, expand 2, state 16."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    cfg = MambaConfig(
        vocab_size=vocab,
        hidden_size=256,
        num_hidden_layers=4,
        state_size=16,
        expand=2,
        pad_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        bos_token_id=vocab - 1,
    )
    return MambaForCausalLM(cfg).eval()
