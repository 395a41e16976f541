"""Print the Mamba-2, RWKV-7 and Qwen3.5 parity and edit-propagation numbers quoted in the notes,
on the test suite's tiny random models (the tests assert the thresholds; this shows the values).

Every number is computed by the helper the test itself calls (tests/hooked_recurrent/test_*.py),
with the test's configs, seeds and tokens; each line names the test it mirrors and, in
parentheses, the bound that test asserts. Qwen3.5 parity and the closed form are in
qwen_tiny_report.py.

    python scripts/parity_report.py
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "hooked_recurrent"))

import test_mamba2 as tm  # noqa: E402
import test_qwen3_5_propagation as tq  # noqa: E402
import test_rwkv7 as tr  # noqa: E402  (imports rwkv_helpers: sets RWKV_V7_ON=1 before rwkv)
from mamba_helpers import mamba_hf  # noqa: E402
from qwen_helpers import qwen_hf  # noqa: E402
from rwkv_helpers import RWKV_CONFIGS, rwkv_package_model, write_blinkdl  # noqa: E402

from hooked_recurrent import HookedRecurrentModel  # noqa: E402
from hooked_recurrent.pretrained.rwkv7 import to_fla_state_dict  # noqa: E402


def e(x: float) -> str:
    return f"{x:.1e}"


class Edits:
    """Edit-propagation results of one test, grouped by hook: the max difference to the brute
    force, whether every earlier-position check was torch.equal, and the smallest effect."""

    def __init__(self, test: str, bound: str, effect_bound: str, effect: str):
        self.test, self.bound, self.effect_bound, self.effect = test, bound, effect_bound, effect
        self.rows: dict[str, list[tuple[float, list[bool], float]]] = defaultdict(list)

    def add(self, hook: str, diff: float, earlier: list[bool], effect: float) -> None:
        self.rows[hook].append((diff, earlier, effect))

    def print(self) -> None:
        print(f"  {self.test}:")
        for hook, rows in self.rows.items():
            diff = max(r[0] for r in rows)
            checks = [eq for r in rows for eq in r[1]]
            effect = min(r[2] for r in rows)
            print(
                f"    {hook:<10} {len(rows):>2} cases: max |logits - brute force| {e(diff)} "
                f"(<= {self.bound}); earlier positions torch.equal to clean: "
                f"{sum(checks)}/{len(checks)}; smallest {self.effect} {e(effect)} "
                f"(> {self.effect_bound})"
            )


@torch.no_grad()
def mamba() -> None:
    print("Mamba-2 vs Hugging Face Mamba2ForCausalLM (tests/hooked_recurrent/test_mamba2.py)")
    single = Edits(
        "test_edits_propagate_like_brute_force (3 configs x layers 0, -1)",
        "1e-4",
        "1e-5",
        "max |logits after t - clean|",
    )
    multi = Edits(
        "test_multi_position_edits_propagate_like_brute_force (3 configs x layers 0, -1 x "
        f"{', '.join(tm.MULTI_EDITS)})",
        "1e-4",
        "1e-5",
        "max |logits after the last edit - clean|",
    )
    for name in tm.CONFIGS:
        torch.manual_seed(0)
        hf = mamba_hf(name, seed=tm.CONFIGS.index(name))
        model = HookedRecurrentModel.from_hf_model(hf)
        d = tm.hf_parity(hf, model)
        print(
            f"  test_logits_hidden_states_and_final_state_match_hf[{name}]: logits "
            f"{e(d['logits'])} (<= 1e-4); hook_resid_post vs HF hidden states, max over "
            f"{len(d['resid_post'])} blocks {e(max(d['resid_post']))} (<= 1e-4); final SSM "
            f"state (transposed) vs HF cache, max over blocks {e(max(d['state']))} (<= 1e-5)"
        )
        states = tm.decode_state_diffs(hf, model)
        print(
            f"  test_per_position_states_match_hf_decode[{name}]: hook_state vs HF one-token "
            f"decode states, 16 positions, max over blocks {e(max(states))} (<= 1e-5)"
        )
        for layer in (0, -1):
            for _, hook, diff, earlier, effect in tm.single_edit_results(hf, model, layer):
                single.add(hook, diff, [earlier], effect)
            for case in tm.MULTI_EDITS:
                for hook in ("hook_write", "hook_state"):
                    diff, earlier, effect = tm.multi_edit_result(hf, model, layer, case, hook)
                    multi.add(hook, diff, earlier, effect)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        *_, diff = tm.load_mamba_ssm_layout(Path(folder))
    print(
        "  test_mamba_ssm_layout_loads: mamba_ssm-layout checkpoint (tied, padded vocab), "
        f"logits vs HF {e(diff)} (<= 1e-4)"
    )
    single.print()
    multi.print()


@torch.no_grad()
def rwkv() -> None:
    print(
        "RWKV-7 vs the rwkv package (RWKV_V7_ON=1, cpu fp32) (tests/hooked_recurrent/test_rwkv7.py)"
    )
    for name in sorted(RWKV_CONFIGS):
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as folder:
            path, sd = write_blinkdl(Path(folder), name, seed=1)
            with contextlib.redirect_stdout(io.StringIO()):  # the package's loading banner
                ref = rwkv_package_model(path)
            ours = HookedRecurrentModel.from_pretrained(str(path)).eval()
        C = RWKV_CONFIGS[name]["C"]
        d = tr.package_parity(sd, ref, ours)
        print(
            f"  test_parity_with_rwkv_package[{name}] (C={C}): logits over all 80 positions "
            f"{e(d['logits'])} (<= 1e-4); final states vs the package's, max over "
            f"{len(d['S'])} layers: S {e(max(d['S']))}, shift {e(max(d['shift']))}, "
            f"mlp_shift {e(max(d['mlp_shift']))} (each <= 1e-5)"
        )
        for fuse_norm in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                model, fla, diff, same = tr.load_fla_layout(sd, ref, ours, Path(folder), fuse_norm)
            back = to_fla_state_dict(model.state_dict(), model.cfg)
            round_trip = back.keys() == fla.keys() and all(
                torch.equal(back[k], fla[k]) for k in fla
            )
            note = "asserted" if not fuse_norm else "not asserted"
            print(
                f"  test_fla_layout_loads_with_same_logits[{name}, fuse_norm={fuse_norm}]: logits "
                f"vs package {e(diff)} (<= 1e-4); logits torch.equal to the .pth load's: {same} "
                f"({note}); to_fla_state_dict round trip torch.equal: {round_trip}"
            )

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path, sd = write_blinkdl(Path(folder), "c128", seed=2)
        model = HookedRecurrentModel.from_pretrained(str(path)).eval()
    single = Edits(
        f"test_edit_propagates_like_brute_force (c128, {len(tr.PROPAGATION_CASES)} cases, "
        "vs the float64 token-by-token reference_forward)",
        "1e-4",
        "1e-4",
        "min over t' > t of max |logits - clean|",
    )
    for hook, kind, layer in tr.PROPAGATION_CASES:
        diff, earlier, effect = tr.single_edit_result(sd, model, hook, kind, layer)
        single.add(hook, diff, [earlier], effect)
    multi = Edits(
        f"test_multi_position_edits_propagate_like_brute_force (c128, {', '.join(tr.MULTI_EDITS)})",
        "1e-4",
        "1e-4",
        "min over t' > last edit of max |logits - clean|",
    )
    for case in tr.MULTI_EDITS:
        for hook in ("hook_write", "hook_state"):
            diffs, earlier, effect = tr.multi_edit_result(sd, model, hook, case)
            multi.add(hook, max(diffs), earlier, effect)
    single.print()
    multi.print()


@torch.no_grad()
def qwen() -> None:
    print(
        "Qwen3.5 edit propagation vs a token-by-token Gated DeltaNet in the HF model "
        "(tests/hooked_recurrent/test_qwen3_5_propagation.py)"
    )
    torch.manual_seed(0)
    hf = qwen_hf("gqa", seed=5)
    model = HookedRecurrentModel.from_hf_model(hf)
    single = Edits(
        f"test_edit_matches_brute_force (gqa, layer {tq.LAYER}, {len(tq.EDITS)} cases)",
        "1e-4",
        "1e-3",
        "max |logits after POS - clean|",
    )
    for case in tq.EDITS:
        diff, earlier, effect = tq.single_edit_result(hf, model, case)
        single.add(case.split(":")[0], diff, [earlier], effect)
    multi = Edits(
        f"test_multi_position_edits_match_brute_force (gqa, {len(tq.MULTI_CASES)} case/chunk "
        "pairs x copy, in place)",
        "1e-4",
        "1e-3",
        "max |logits - clean| at each row's first edit",
    )
    for hook in ("hook_write", "hook_state"):
        for case, chunk in tq.MULTI_CASES:
            for in_place in (False, True):
                diff, earlier, at_first, _ = tq.multi_edit_result(
                    hf, model, hook, case, chunk, in_place
                )
                multi.add(hook, diff, earlier, min(at_first))
    single.print()
    multi.print()


if __name__ == "__main__":
    torch.set_num_threads(2)
    mamba()
    rwkv()
    qwen()
