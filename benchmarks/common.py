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


def interleaved_medians(
    fns: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 1, grad: bool = False
) -> dict[str, float]:
    """Median seconds per function; each round runs every function once, in turn (under
    `torch.no_grad()` unless `grad`)."""
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
