"""Tiny random Mamba-1 / Falcon-Mamba models built in the tests (no downloads), and a brute-force
float64 reference written from the Hugging Face weights (not the package's code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAMBA1_CONFIGS = {
    # Mamba-1, tied embeddings, conv 4; sequences of 50 are not a multiple of the chunk (8)
    "mamba": dict(
        model_type="mamba",
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        expand=2,
        conv_kernel=4,
        time_step_rank=3,
    ),
    # Falcon-Mamba (weightless RMSNorm on dt, B, C), untied, biases on the projections, no conv
    # bias, expand 3, conv 3
    "falcon_bias": dict(
        model_type="falcon_mamba",
        hidden_size=24,
        num_hidden_layers=3,
        state_size=6,
        expand=3,
        conv_kernel=3,
        time_step_rank=5,
        use_bias=True,
        use_conv_bias=False,
        tie_word_embeddings=False,
        mixer_rms_eps=1e-5,
    ),
}


def mamba1_hf(name: str = "mamba", seed: int = 0, vocab: int = 101, **over):
    """A tiny random `MambaForCausalLM` / `FalconMambaForCausalLM` with randomised norm weights,
    A_log, D, dt bias and biases (HF initialises several to constants)."""
    from transformers import (
        FalconMambaConfig,
        FalconMambaForCausalLM,
        MambaConfig,
        MambaForCausalLM,
    )

    kw = dict(MAMBA1_CONFIGS[name])
    falcon = kw.pop("model_type") == "falcon_mamba"
    kw.update(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=1, **over)
    torch.manual_seed(seed)
    if falcon:
        m = FalconMambaForCausalLM(FalconMambaConfig(**kw)).eval()
    else:
        m = MambaForCausalLM(MambaConfig(**kw)).eval()
    return randomise_mamba1(m, seed)


def randomise_mamba1(m, seed: int):
    """`m` (a Mamba-1 model, or a hybrid with Mamba-1 layers) with its norm weights, A_log, D, dt
    bias and biases drawn at random (Hugging Face initialises several to constants); returns
    `m`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if pname.endswith("norm.weight") or pname.endswith("norm_f.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif pname.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(-2.0, 1.5, generator=g))
            elif pname.endswith("dt_proj.bias"):
                p.copy_(torch.randn(p.shape, generator=g) - 1.0)
            elif pname.endswith(".D"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif pname.endswith("conv1d.bias") or pname.endswith("_proj.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m


def brute_force_logits(hf, tokens: torch.Tensor, edit=None) -> torch.Tensor:
    """Mamba-1 / Falcon-Mamba logits by a plain loop over tokens (float64).

    `edit(layer, t, name, value)` may return a replacement for "x" ([b, d_inner]), "k" (B,
    [b, d_state]), "dt" ([b, d_inner]), "v" (dt * x), "decay" ([b, d_state, d_inner]), "write"
    (B (dt x)^T) or "state" (S_t [b, d_state, d_inner], key side first) of one token. "state" is
    called with the trajectory without state edits and assigns where the value differs (the
    package's `hook_state` semantics).
    """
    cfg = hf.config
    N, R, Di = cfg.state_size, cfg.time_step_rank, cfg.intermediate_size
    eps = cfg.layer_norm_epsilon
    falcon = cfg.model_type == "falcon_mamba"
    bb = hf.backbone
    edit = edit or (lambda layer, t, name, value: value)

    def rms(x, w=None, e=eps):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + e)
        return y if w is None else w * y

    def lin(x, layer):
        y = x @ layer.weight.double().T
        return y if layer.bias is None else y + layer.bias.double()

    h = bb.embeddings.weight.double()[tokens]
    Bsz, T = tokens.shape
    for li, block in enumerate(bb.layers):
        m = block.mixer
        x_all, z = lin(rms(h, block.norm.weight.double()), m.in_proj).split([Di, Di], -1)
        K = m.conv1d.weight.shape[-1]
        w = m.conv1d.weight.double()[:, 0]
        xp = F.pad(x_all, (0, 0, K - 1, 0))
        conv = sum(xp[:, j : j + T] * w[:, j] for j in range(K))
        if m.conv1d.bias is not None:
            conv = conv + m.conv1d.bias.double()
        x_all = F.silu(conv)
        A = -m.A_log.double().exp()  # [d_inner, d_state]
        S = S_nat = torch.zeros(Bsz, N, Di, dtype=torch.float64)
        ys = []
        for t in range(T):
            x = edit(li, t, "x", x_all[:, t])
            dtr, Bt, Ct = (x @ m.x_proj.weight.double().T).split([R, N, N], -1)
            if falcon:
                dtr, Bt, Ct = (rms(a, e=cfg.mixer_rms_eps) for a in (dtr, Bt, Ct))
            Bt = edit(li, t, "k", Bt)
            dt = edit(li, t, "dt", F.softplus(lin(dtr, m.dt_proj)))
            v = edit(li, t, "v", dt * x)
            decay = edit(li, t, "decay", torch.exp(dt[:, None, :] * A.T))
            W = edit(li, t, "write", Bt[:, :, None] * v[:, None, :])
            S = decay * S + W
            S_nat = decay * S_nat + W
            X = edit(li, t, "state", S_nat)
            S = torch.where((X != S_nat).flatten(1).any(-1)[:, None, None], X, S)
            ys.append((S * Ct[:, :, None]).sum(1) + m.D.double() * x)
        y = torch.stack(ys, 1) * F.silu(z)
        h = h + lin(y, m.out_proj)
    return rms(h, bb.norm_f.weight.double()) @ hf.lm_head.weight.double().T
