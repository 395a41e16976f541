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

from hooked_recurrent.pretrained.rwkv7 import random_blinkdl_state_dict  # noqa: E402

HEAD_SIZE = 64  # the rwkv package hard-codes GroupNorm eps 64e-5, right only at head size 64

RWKV_CONFIGS = {
    # 2 heads, 3 layers
    "c128": dict(C=128, L=3, vocab=101, Dw=16, Da=16, Dv=8, Dg=32, ffn=512),
    # 3 heads, 4 layers, odd LoRA ranks, ffn not 4C
    "c192": dict(C=192, L=4, vocab=77, Dw=24, Da=12, Dv=20, Dg=40, ffn=640),
}


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
