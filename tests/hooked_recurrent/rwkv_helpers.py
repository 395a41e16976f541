"""Tiny random BlinkDL RWKV-7 `.pth` files and the `rwkv` package as the reference (no downloads).

The `rwkv` package reads its mode from the environment when `rwkv.model` is first imported, so
this module sets RWKV_V7_ON=1 (RWKV-7), RWKV_JIT_ON=1 and RWKV_CUDA_ON=0 before importing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ["RWKV_V7_ON"] = "1"
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ["RWKV_CUDA_ON"] = "0"

HEAD_SIZE = 64  # the rwkv package hard-codes GroupNorm eps 64e-5, right only at head size 64

RWKV_CONFIGS = {
    # 2 heads, 3 layers
    "c128": dict(C=128, L=3, vocab=101, Dw=16, Da=16, Dv=8, Dg=32, ffn=512),
    # 3 heads, 4 layers, odd LoRA ranks, ffn not 4C
    "c192": dict(C=192, L=4, vocab=77, Dw=24, Da=12, Dv=20, Dg=40, ffn=640),
}


def random_blinkdl_state_dict(
    C: int, L: int, vocab: int, Dw: int, Da: int, Dv: int, Dg: int, ffn: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random weights in BlinkDL names and shapes, scaled so every term of RWKV-7 matters.

    Decays spread over the whole range (w0 ~ N(0, 2)), in-context rates and value-residual mixes
    away from 0 and 1, LoRA matrices non-zero, norms not identity.
    """
    g = torch.Generator().manual_seed(seed)

    def rn(*shape: int, s: float = 1.0, m: float = 0.0) -> torch.Tensor:
        return m + s * torch.randn(*shape, generator=g)

    def ru(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    H = C // HEAD_SIZE
    sd = {
        "emb.weight": rn(vocab, C),
        "blocks.0.ln0.weight": rn(C, s=0.2, m=1.0),
        "blocks.0.ln0.bias": rn(C, s=0.1),
        "ln_out.weight": rn(C, s=0.2, m=1.0),
        "ln_out.bias": rn(C, s=0.1),
        "head.weight": rn(vocab, C, s=C**-0.5),
    }
    for i in range(L):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"] = rn(C, s=0.2, m=1.0)
            sd[b + ln + ".bias"] = rn(C, s=0.1)
        a = b + "att."
        for c in "rwkvag":
            sd[a + "x_" + c] = ru(1, 1, C)
        for c, D, s0 in (("w", Dw, 2.0), ("a", Da, 1.0), ("v", Dv, 1.0)):
            sd[a + c + "0"] = rn(1, 1, C, s=s0)
            sd[a + c + "1"] = rn(C, D, s=C**-0.5)
            sd[a + c + "2"] = rn(D, C, s=D**-0.5)
        sd[a + "g1"] = rn(C, Dg, s=C**-0.5)
        sd[a + "g2"] = rn(Dg, C, s=Dg**-0.5)
        sd[a + "k_k"] = rn(1, 1, C, s=0.3, m=0.8)
        sd[a + "k_a"] = rn(1, 1, C, s=0.3, m=1.0)
        sd[a + "r_k"] = rn(H, HEAD_SIZE, s=0.1)
        for p in ("receptance", "key", "value", "output"):
            sd[a + p + ".weight"] = rn(C, C, s=C**-0.5)
        sd[a + "ln_x.weight"] = rn(C, s=0.2, m=1.0)
        sd[a + "ln_x.bias"] = rn(C, s=0.1)
        f = b + "ffn."
        sd[f + "x_k"] = ru(1, 1, C)
        sd[f + "key.weight"] = rn(ffn, C, s=C**-0.5)
        sd[f + "value.weight"] = rn(C, ffn, s=ffn**-0.5)
    return sd


def write_blinkdl(folder: Path, name: str = "c128", seed: int = 0) -> tuple[Path, dict]:
    """Write `RWKV-x070-test-{name}.pth` into `folder`; returns (path, state dict)."""
    sd = random_blinkdl_state_dict(**RWKV_CONFIGS[name], seed=seed)
    path = Path(folder) / f"RWKV-x070-test-{name}-{seed}.pth"
    torch.save(sd, path)
    return path, sd


def rwkv_package_model(path: Path):
    """The `rwkv` package's RWKV-7 on CPU in fp32 (it appends '.pth' to the name itself)."""
    from rwkv.model import RWKV

    return RWKV(model=str(path)[: -len(".pth")], strategy="cpu fp32")
