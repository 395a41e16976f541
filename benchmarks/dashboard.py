"""Time the atom dashboard: 512 atoms over 100,000 tokens of the shipped Qwen3.5 model.

    python benchmarks/dashboard.py [--sae DIR] [--n-tokens 100000] [--threads 2] [--out DIR]

Model: `tiny-qwen3.5-shakespeare` (`HookedRecurrentModel.from_pretrained`, as `writesae demo`
loads it). Corpus: the shipped held-out sample, then the training sample, in sequences of
`--context` tokens, cut at the first whole sequence that reaches `--n-tokens`. SAE: `--sae` (a
saved WriteSAE, e.g. `writesae-demo/sae`), or else a randomly initialised WriteSAE of 512 atoms,
k = 16, on the cell the demo picks (its cost is that of a trained one: the same model pass, the
same number of active atoms per token). Reports the wall time of `writesae.dashboard(...)`
(everything: the model pass, the encoding, the first-order value side, the files) and the size of
the folder. Targets: 2 minutes, 20 MB.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402, F401  (offline environment, 2 threads)
import torch  # noqa: E402

from hooked_recurrent import HookedRecurrentModel  # noqa: E402
from hooked_recurrent.pretrained import sample_text  # noqa: E402
from writesae import WriteSAE, WriteSAEConfig, dashboard  # noqa: E402
from writesae.evaluate import memory_cell  # noqa: E402

MODEL = "tiny-qwen3.5-shakespeare"


def _sae(model, tokens, path: str | None, n_atoms: int, k: int):
    if path:
        return WriteSAE.load(path), f"loaded from {path}"
    layers = model.cfg.recurrent_layers
    layer, head, _ = memory_cell(model, tokens[:32], layers[len(layers) // 2 :])
    cfg = WriteSAEConfig(
        d_k=model.cfg.d_k,
        d_v=model.cfg.d_v,
        n_atoms=n_atoms,
        k=k,
        hook_name=f"blocks.{layer}.attn.hook_state",
        head=head,
        model_name=MODEL,
    )
    return WriteSAE(cfg, seed=0), "random init"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sae", default=None)
    ap.add_argument("--n-tokens", type=int, default=100_000)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--n-atoms", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="Keep the dashboard here (default: a tmp dir).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = HookedRecurrentModel.from_pretrained(MODEL).eval()
    ids = torch.cat([model.to_tokens(sample_text(w))[0] for w in ("heldout", "train")])
    rows = math.ceil(args.n_tokens / args.context)
    if rows * args.context > len(ids):
        raise SystemExit(f"the shipped text has {len(ids)} tokens, fewer than {args.n_tokens}")
    tokens = ids[: rows * args.context].view(rows, args.context)
    sae, how = _sae(model, tokens, args.sae, args.n_atoms, args.k)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        t0 = time.perf_counter()
        dashboard(sae, model, tokens, out, model_name=MODEL)
        dt = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    n = sae.cfg.n_atoms
    print(
        f"dashboard: {n} atoms ({how}, k={sae.cfg.k}, {sae.cfg.hook_prefix} head "
        f"{sae.cfg.head}) over {tokens.numel()} tokens ({rows} x {args.context}), "
        f"{args.threads} thread(s): {dt:.1f} s (target <= 120 s), folder {size / 2**20:.2f} MB "
        f"(target < 20 MB)"
    )


if __name__ == "__main__":
    main()
