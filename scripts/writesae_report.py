"""Print the WriteSAE numbers behind the tests' thresholds (the tests assert them; this shows the
values), computed by the helpers the tests themselves call, with their configs and seeds:

* planted-dictionary recovery and the equal-size FlatSAE (tests/writesae/test_recovery.py),
* substitution through the hook against the brute-force recurrence on a tiny random Qwen3.5
  (tests/writesae/test_qwen3_5_substitution.py),
* save / load: codes of the loaded SAE against the saved one, for both SAE classes.

    python scripts/writesae_report.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
tests = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(tests / "writesae"), str(tests / "hooked_recurrent")]

import test_qwen3_5_substitution as ts  # noqa: E402
import test_recovery as tr  # noqa: E402

from writesae import FlatSAE, WriteSAE, WriteSAEConfig, load_sae  # noqa: E402


def main() -> None:
    r = tr.recovery()
    print(
        "recovery (test_planted_dictionary_recovery_and_flat_baseline): mean best |cosine| "
        f"{r['cosine']:.4f} (>= 0.9); FVE WriteSAE {r['fve']:.4f} with "
        f"{r['sae'].n_parameters} parameters vs FlatSAE {r['flat_fve']:.4f} with "
        f"{r['flat'].n_parameters} ({r['flat'].cfg.n_atoms} atoms)"
    )
    ours, ref, clean, fired = ts.substitution_vs_brute_force()
    print(
        "substitution (test_substitute_matches_brute_force_recurrence): max |hook - brute force| "
        f"{(ours - ref).abs().max():.1e} (<= 1e-4) over {len(fired)} firing positions; "
        f"max change against the clean logits {(ours - clean).abs().max():.2f}"
    )
    cfg = dict(d_k=6, d_v=5, n_atoms=12, k=3, hook_name="blocks.2.attn.hook_state", head=1)
    x = torch.randn(20, 6, 5, generator=torch.Generator().manual_seed(0))
    for sae in (
        WriteSAE(WriteSAEConfig(**cfg), seed=0),
        FlatSAE(WriteSAEConfig(**cfg, kind="flat"), seed=0),
    ):
        with tempfile.TemporaryDirectory() as d:
            sae.save(d)
            loaded = load_sae(d)
        same = torch.equal(loaded.encode(x), sae.encode(x))
        print(f"save/load {type(sae).__name__}: codes of 20 inputs identical: {same}")


if __name__ == "__main__":
    main()
