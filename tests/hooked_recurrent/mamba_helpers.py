"""Tiny random Mamba-2 models built in the tests (no downloads), and a brute-force reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAMBA_CONFIGS = {
    # 2 groups, chunk 16 (sequences of 50 leave a partial chunk), 8 heads
    "g2": dict(
        hidden_size=64,
        num_hidden_layers=3,
        state_size=16,
        expand=2,
        head_dim=16,
        num_heads=8,
        n_groups=2,
        conv_kernel=4,
        chunk_size=16,
    ),
    # 4 groups of one head each, d_state != headdim, chunk 7, conv 3, tied embeddings
    "g4_tied": dict(
        hidden_size=32,
        num_hidden_layers=2,
        state_size=12,
        expand=2,
        head_dim=16,
        num_heads=4,
        n_groups=4,
        conv_kernel=3,
        chunk_size=7,
        tie_word_embeddings=True,
    ),
    # 2 groups of 3 heads, biases on the projections, no conv bias, dt clamped, expand 3
    "bias": dict(
        hidden_size=40,
        num_hidden_layers=2,
        state_size=8,
        expand=3,
        head_dim=20,
        num_heads=6,
        n_groups=2,
        conv_kernel=4,
        chunk_size=6,
        use_bias=True,
        use_conv_bias=False,
        time_step_limit=(0.01, 2.0),
    ),
}


def mamba_config(name: str = "g2", vocab: int = 101, **over):
    from transformers import Mamba2Config

    kw = dict(
        vocab_size=vocab,
        layer_norm_epsilon=1e-5,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        residual_in_fp32=True,
    )
    kw.update(MAMBA_CONFIGS[name])
    kw.update(over)
    return Mamba2Config(**kw)


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random norm weights, D, dt_bias, A_log and conv bias (HF initialises some to constants)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(-2.0, 1.5, generator=g))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) - 1.0)
            elif name.endswith(".D"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("conv1d.bias") or name.endswith("proj.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def mamba_hf(name: str = "g2", seed: int = 0, vocab: int = 101, **over):
    from transformers import Mamba2ForCausalLM

    torch.manual_seed(seed)
    m = Mamba2ForCausalLM(mamba_config(name, vocab, **over)).eval()
    randomise(m, seed)
    return m


def brute_mamba2_mixer(m, u: torch.Tensor, layer: int, edit=None) -> torch.Tensor:
    """One Mamba-2 mixer by a plain loop over tokens, from a Hugging Face mixer's weights and
    shape attributes (Mamba-2, Bamba, Nemotron-H, ...), in float64; `u` is its input `[b, T, d]`.

    `edit(layer, t, name, value)` may return a replacement for any of "k" (B per head), "v" (x),
    "dt", "decay", "write" (B (dt x)^T) or "state" (S_t, [head, d_state, headdim], key side
    first) of one token; it is called with the batch-wide tensor of that token. "state" is called
    with the state of the trajectory without state edits, and assigns: where the returned value
    differs from it, the state is the returned value (the package's `hook_state` semantics).
    """
    H, P, N, G = m.num_heads, m.head_dim, m.ssm_state_size, m.n_groups
    Di = H * P
    eps = getattr(m.norm, "variance_epsilon", None)
    lo, hi = (float(x) for x in m.time_step_limit)
    edit = edit or (lambda layer, t, name, value: value)
    u = u.double() * getattr(m, "ssm_in_multiplier", 1.0)  # Falcon-H1's muP multipliers
    Bsz, T, _ = u.shape
    proj = u @ m.in_proj.weight.double().T
    if m.in_proj.bias is not None:
        proj = proj + m.in_proj.bias.double()
    if hasattr(m, "mup_vector"):
        proj = proj * m.mup_vector.double()
    z, xBC, dtr = proj.split([Di, Di + 2 * G * N, H], -1)
    K = m.conv1d.weight.shape[-1]
    w = m.conv1d.weight.double()[:, 0]  # [C, K]
    xp = F.pad(xBC, (0, 0, K - 1, 0))
    conv = sum(xp[:, j : j + T] * w[:, j] for j in range(K))
    if m.conv1d.bias is not None:
        conv = conv + m.conv1d.bias.double()
    x, Bg, Cg = F.silu(conv).split([Di, G * N, G * N], -1)
    A = -m.A_log.double().exp()
    S = torch.zeros(Bsz, H, N, P, dtype=torch.float64)
    S_nat = S  # the trajectory without state edits: what hook_state is given
    ys = []
    for t in range(T):
        xt = x[:, t].view(Bsz, H, P)
        Bt = Bg[:, t].view(Bsz, G, N).repeat_interleave(H // G, 1)
        Ct = Cg[:, t].view(Bsz, G, N).repeat_interleave(H // G, 1)
        Bt = edit(layer, t, "k", Bt)
        xt = edit(layer, t, "v", xt)
        dt = F.softplus(dtr[:, t] + m.dt_bias.double()).clamp(lo, hi)
        dt = edit(layer, t, "dt", dt)
        decay = edit(layer, t, "decay", torch.exp(dt * A))
        W = edit(layer, t, "write", Bt[..., :, None] * (dt[..., None] * xt)[..., None, :])
        S = decay[..., None, None] * S + W
        S_nat = decay[..., None, None] * S_nat + W
        X = edit(layer, t, "state", S_nat)
        assigned = (X != S_nat).flatten(2).any(-1)[..., None, None]
        S = torch.where(assigned, X, S)
        read = torch.einsum("bhnp,bhn->bhp", S, Ct)
        ys.append(read + m.D.double()[:, None] * xt)
    y = torch.stack(ys, 1).reshape(Bsz, T, Di)
    if not hasattr(m.norm, "weight"):  # Falcon-H1 without mamba_rms_norm: the gate alone
        y = y * F.silu(z)
    else:  # gate, then the grouped RMSNorm (Falcon-H1's norm_before_gate: the other way round)
        before = getattr(m.norm, "norm_before_gate", False)
        y = y if before else y * F.silu(z)
        yg = y.view(Bsz, T, G, Di // G)
        y = (yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + eps)).view(Bsz, T, Di)
        y = m.norm.weight.double() * y
        y = y * F.silu(z) if before else y
    out = y @ m.out_proj.weight.double().T
    if m.out_proj.bias is not None:
        out = out + m.out_proj.bias.double()
    return out


def brute_force_logits(hf, tokens: torch.Tensor, edit=None) -> torch.Tensor:
    """Mamba-2 logits by a plain loop over tokens, from the HF model's weights (float64); `edit`
    as in `brute_mamba2_mixer`."""
    eps = hf.config.layer_norm_epsilon
    bb = hf.backbone

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    h = bb.embeddings.weight.double()[tokens]
    for li, block in enumerate(bb.layers):
        h = h + brute_mamba2_mixer(block.mixer, rms(h, block.norm.weight.double()), li, edit)
    h = rms(h, bb.norm_f.weight.double())
    return h @ hf.lm_head.weight.double().T
