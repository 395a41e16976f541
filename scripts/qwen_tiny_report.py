"""Print the Qwen3.5 parity and closed-form numbers quoted in the notes, on the test suite's tiny
random configs (the tests assert the thresholds; this shows the values).

    python scripts/qwen_tiny_report.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "hooked_recurrent"))

from qwen_helpers import QWEN_CONFIGS, qwen_hf  # noqa: E402

from hooked_recurrent import HookedRecurrentModel  # noqa: E402
from writesae import WriteSAE, WriteSAEConfig  # noqa: E402
from writesae.evaluate import evaluate_closed_form  # noqa: E402


@torch.no_grad()
def parity(name: str) -> str:
    hf = qwen_hf(name, seed=3)
    m = HookedRecurrentModel.from_hf_model(hf)
    toks = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(0))
    out = {}
    handles = [
        layer.register_forward_hook(
            lambda mod, i, o, k=k: out.__setitem__(k, o[0] if isinstance(o, tuple) else o)
        )
        for k, layer in enumerate(hf.model.layers)
    ]
    ref = hf(toks, use_cache=True)
    for h in handles:
        h.remove()
    states = [f"blocks.{l}.attn.hook_state" for l in m.cfg.recurrent_layers]
    logits, c = m.run_with_cache(
        toks, names_filter=lambda n: n.endswith("hook_resid_post") or n in states
    )
    d_logit = (logits - ref.logits).abs().max().item()
    d_res = max(
        (c[f"blocks.{l}.hook_resid_post"] - out[l]).abs().max().item()
        for l in range(m.cfg.n_layers)
    )
    d_state = max(
        (
            c[f"blocks.{l}.attn.hook_state"][:, -1]
            - ref.past_key_values.layers[l].recurrent_states[0]
        )
        .abs()
        .max()
        .item()
        for l in m.cfg.recurrent_layers
    )
    short = toks[:, :12]
    _, c12 = m.run_with_cache(short, names_filter=states)
    past, d_pos = None, 0.0
    for t in range(12):
        past = hf(short[:, t : t + 1], past_key_values=past, use_cache=True).past_key_values
        for l in m.cfg.recurrent_layers:
            d = c12[f"blocks.{l}.attn.hook_state"][:, t] - past.layers[l].recurrent_states[0]
            d_pos = max(d_pos, d.abs().max().item())
    return (
        f"{name}: logits {d_logit:.1e}, resid_post {d_res:.1e}, final state {d_state:.1e}, "
        f"per-position state (T=12) {d_pos:.1e}"
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
