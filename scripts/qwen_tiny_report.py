"""Print the Qwen3.5 parity and closed-form numbers quoted in the notes, on the test suite's tiny
random configs (the tests assert the thresholds; this shows the values). The parity numbers come
from the helpers of tests/hooked_recurrent/test_qwen3_5_parity.py, with its tokens and seeds.

    python scripts/qwen_tiny_report.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "hooked_recurrent"))

import test_qwen3_5_parity as tp  # noqa: E402
from qwen_helpers import QWEN_CONFIGS, qwen_hf  # noqa: E402

from hooked_recurrent import HookedRecurrentModel  # noqa: E402
from writesae import WriteSAE, WriteSAEConfig  # noqa: E402
from writesae.evaluate import evaluate_closed_form  # noqa: E402


def parity(name: str) -> str:
    """The numbers test_qwen3_5_parity.py asserts, from its own helpers, tokens and seeds."""
    hf = qwen_hf(name, seed=3)
    m = HookedRecurrentModel.from_hf_model(hf)
    d = tp.parity_diffs(hf, m, tp.tokens_for(hf, tp.T))
    d_pos = tp.per_position_state_diff(hf, m, tp.tokens_for(hf, 12))
    return (
        f"{name}: logits {d['logits']:.1e} (<= 1e-4), resid_post {d['resid_post']:.1e} "
        f"(<= 1e-4), final state {d['final_state']:.1e} (<= 1e-5), returned state "
        f"{d['returned_state']:.1e} (<= 1e-5), per-position state (T=12) {d_pos:.1e} (<= 1e-5)"
    )


def closed_form() -> str:
    m = HookedRecurrentModel.from_hf_model(qwen_hf("gqa", seed=5))
    sae = WriteSAE(
        WriteSAEConfig(
            d_k=16, d_v=24, n_atoms=64, k=4, hook_name="blocks.1.attn.hook_state", head=1
        ),
        seed=0,
    )
    toks = torch.randint(0, 97, (8, 24), generator=torch.Generator().manual_seed(0))
    parts = []
    for prop in ("gate", "exact"):
        r = evaluate_closed_form(
            m, sae, toks, n_atoms=4, read_offset=2, propagator=prop, progress=False
        )
        parts.append(
            f"{prop}: R^2 {r.r2:.3f}, fitted-scale R^2 {r.r2_fitted_scale:.3f}, "
            f"sign agreement {r.sign_agreement:.2f}"
        )
    return "tiny random Qwen3.5 closed form (layer 1, head 1, 4 atoms): " + "; ".join(parts)


if __name__ == "__main__":
    torch.set_num_threads(2)
    for name in QWEN_CONFIGS:
        print(parity(name))
    print(closed_form())
