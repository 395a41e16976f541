"""Tiny random Qwen3.5 models built in the tests (no downloads)."""

from __future__ import annotations

import torch

QWEN_CONFIGS = {
    # value heads = 2 x key heads, d_k != d_v, partial rotary 0.25
    "gqa": dict(
        hidden_size=64,
        num_hidden_layers=4,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        partial_rotary_factor=0.25,
    ),
    # equal heads, rotary 0.5, attention first
    "equal": dict(
        hidden_size=48,
        num_hidden_layers=3,
        linear_num_key_heads=3,
        linear_num_value_heads=3,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=24,
        partial_rotary_factor=0.5,
        layer_types=["full_attention", "linear_attention", "linear_attention"],
    ),
    # 4x value heads, tied embeddings, conv kernel 3
    "tied": dict(
        hidden_size=32,
        num_hidden_layers=2,
        linear_num_key_heads=1,
        linear_num_value_heads=4,
        linear_key_head_dim=12,
        linear_value_head_dim=8,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        partial_rotary_factor=0.25,
        linear_conv_kernel_dim=3,
        tie_word_embeddings=True,
        layer_types=["linear_attention", "full_attention"],
    ),
}


def qwen_text_config(name: str = "gqa", vocab: int = 97, **over):
    from transformers import Qwen3_5TextConfig

    kw = dict(
        vocab_size=vocab,
        intermediate_size=80,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    kw.update(QWEN_CONFIGS[name])
    kw.update(over)
    partial = kw.pop("partial_rotary_factor")
    cfg = Qwen3_5TextConfig(**kw)
    cfg.rope_parameters = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": partial,
    }
    cfg._attn_implementation = "eager"
    return cfg


def randomise(model: torch.nn.Module, seed: int = 0, slow_decay: bool = True) -> None:
    """Random norm weights (HF initialises them to constants) and decays that keep memory."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("A_log") and slow_decay:
                p.copy_(torch.empty(p.shape).uniform_(-4.0, -1.0, generator=g))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g))


def qwen_hf(name: str = "gqa", seed: int = 0, vocab: int = 97, **over):
    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(seed)
    m = Qwen3_5ForCausalLM(qwen_text_config(name, vocab, **over)).eval()
    randomise(m, seed)
    return m
