# ruff: noqa: E501  (the table keeps one bad input per line)
"""Every bad input is a ValueError / TypeError at the API boundary (or, on the command line, a
usage error before any work), naming the argument, the value and what is accepted.

One table: (what, call, expected exception type, phrase of the message). Library rows call the
API; CLI rows (type "exit 2" / "exit 1") run `writesae` in-process and check the exit code and
the message.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hooked_recurrent import HookedRecurrentModel, RecurrentState
from hooked_recurrent.pretrained import SHIPPED_DIR
from writesae import (
    ModelSource,
    ShardSource,
    TensorSource,
    TrainConfig,
    WriteSAE,
    WriteSAEConfig,
    save_shards,
    train,
)
from writesae.cli import app

QWEN = "tiny-qwen3.5-shakespeare"

# what a user sees: the package's own checks, without the test run's type checker
pytestmark = pytest.mark.usefixtures("without_typecheck")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """The shipped models, a few tokens and states, and broken checkpoint folders."""
    c = {
        "qwen": HookedRecurrentModel.from_pretrained(QWEN).eval(),
        "mamba": HookedRecurrentModel.from_pretrained("tiny-mamba2-shakespeare").eval(),
        "rwkv": HookedRecurrentModel.from_pretrained("tiny-rwkv7-shakespeare").eval(),
        "tmp": tmp_path_factory.mktemp("bad_input"),
    }
    c["V"] = c["qwen"].cfg.d_vocab
    c["tokens"] = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        _, c["mamba_state"] = c["mamba"](c["tokens"], return_state=True)
    return c


def _folder(ctx, name: str, edit_config=None, edit_weights=None) -> str:
    """A copy of the shipped Qwen3.5 folder with its config.json or weights edited."""
    d = ctx["tmp"] / name
    if not d.exists():
        shutil.copytree(SHIPPED_DIR / QWEN, d)
        if edit_config is not None:
            cfg = json.loads((d / "config.json").read_text())
            edit_config(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        if edit_weights is not None:
            f = d / "model.safetensors"
            edit_weights(f)
    return str(d)


def _drop_lm_head(f: Path) -> None:
    sd = load_file(str(f))
    del sd["lm_head.weight"]
    save_file(sd, str(f))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:1000])


def _sae(**over) -> WriteSAE:
    kw = dict(d_k=4, d_v=3, n_atoms=16, k=2, hook_name="blocks.1.attn.hook_state", head=0)
    kw.update(over)
    return WriteSAE(WriteSAEConfig(**kw), seed=0)


def _states(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 4, 3)


def _other_cell_shards(ctx) -> ShardSource:
    d = ctx["tmp"] / "shards_layer0"
    if not d.exists():
        save_shards(
            TensorSource(_states(64), batch_size=32),
            d,
            metadata=dict(model="m", layer=0, head=2, kind="state"),
        )
    return ShardSource(d, batch_size=32)


def _fingerprinted_sae_folder(ctx) -> str:
    """An SAE for the shipped Qwen3.5's shape, recorded as trained on other weights."""
    d = ctx["tmp"] / "sae_other_model"
    if not d.exists():
        m = ctx["qwen"].cfg
        WriteSAE(
            WriteSAEConfig(
                d_k=m.d_k,
                d_v=m.d_v,
                n_atoms=8,
                k=2,
                hook_name="blocks.1.attn.hook_state",
                head=1,
                model_name=QWEN,
                model_fingerprint="0123456789abcdef",
            )
        ).save(d)
    return str(d)


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output


def _nonempty(ctx) -> str:
    d = ctx["tmp"] / "existing_result"
    d.mkdir(exist_ok=True)
    (d / "cfg.json").write_text("{}")
    return str(d)


def _a_file(ctx) -> str:
    f = ctx["tmp"] / "a_file"
    f.write_text("x")
    return str(f / "sae")


def _corrupt_sae(ctx) -> str:
    d = ctx["tmp"] / "corrupt_sae"
    d.mkdir(exist_ok=True)
    (d / "cfg.json").write_text("{not json")
    (d / "sae_weights.safetensors").write_bytes(b"")
    return str(d)


def _shards_without_meta(ctx) -> str:
    d = ctx["tmp"] / "not_shards"
    d.mkdir(exist_ok=True)
    return str(d)


def _cli_shards(ctx) -> str:
    _other_cell_shards(ctx)
    return str(ctx["tmp"] / "shards_layer0")


T = torch.tensor
L = torch.long

# (id, call(ctx), expected type, phrase in the message)
LIBRARY = [
    # ---- model inputs
    ("token id >= vocab", lambda c: c["qwen"](T([[0, c["V"]]])), ValueError, "ids must be in [0, 2048)"),
    ("negative token id", lambda c: c["qwen"](T([[-1, 3]])), ValueError, "token id -1"),
    ("float tokens", lambda c: c["qwen"](T([[1.0, 2.0]])), TypeError, "integer tensor"),
    ("bool tokens", lambda c: c["qwen"](torch.ones(1, 3, dtype=torch.bool)), TypeError, "integer tensor"),
    ("list of ints", lambda c: c["qwen"]([1, 2, 3]), TypeError, "torch.tensor([[...]])"),
    ("empty string", lambda c: c["qwen"](""), ValueError, "empty string"),
    ("empty list of texts", lambda c: c["qwen"]([]), ValueError, "empty list"),
    ("empty tokens, Qwen3.5", lambda c: c["qwen"](torch.zeros(1, 0, dtype=L)), ValueError, "empty input"),
    ("empty tokens, Mamba-2", lambda c: c["mamba"](torch.zeros(1, 0, dtype=L)), ValueError, "empty input"),
    ("empty tokens, RWKV-7", lambda c: c["rwkv"](torch.zeros(1, 0, dtype=L)), ValueError, "empty input"),
    ("batch 0", lambda c: c["qwen"](torch.zeros(0, 4, dtype=L)), ValueError, "empty input"),
    ("state of another model", lambda c: c["qwen"](c["tokens"], state=c["mamba_state"]), ValueError, "another model"),
    ("state with no layers", lambda c: c["qwen"](c["tokens"], state=RecurrentState(0, [])), ValueError, "another model"),
    ("state not a RecurrentState", lambda c: c["qwen"](c["tokens"], state={"S": torch.zeros(1)}), TypeError, "RecurrentState"),
    ("loss of a 1-token input", lambda c: c["qwen"](T([[5]]), return_type="loss"), ValueError, "at least 2 tokens"),
    ("to_tokens of an int", lambda c: c["qwen"].to_tokens(5), TypeError, "str or a list of str"),
    # ---- generate
    ("top_k=0", lambda c: c["qwen"].generate(c["tokens"], 2, do_sample=True, top_k=0), ValueError, "top_k=0"),
    ("top_k > vocab", lambda c: c["qwen"].generate(c["tokens"], 2, do_sample=True, top_k=10**6), ValueError, "top_k=1000000"),
    ("top_p=0", lambda c: c["qwen"].generate(c["tokens"], 2, do_sample=True, top_p=0.0), ValueError, "top_p=0.0"),
    ("top_p > 1", lambda c: c["qwen"].generate(c["tokens"], 2, do_sample=True, top_p=1.5), ValueError, "top_p=1.5"),
    ("negative temperature", lambda c: c["qwen"].generate(c["tokens"], 2, do_sample=True, temperature=-1.0), ValueError, "temperature=-1.0"),
    ("negative max_new_tokens", lambda c: c["qwen"].generate(c["tokens"], -1), ValueError, "max_new_tokens=-1"),
    ("eos_token_id >= vocab", lambda c: c["qwen"].generate(c["tokens"], 2, eos_token_id=c["V"] + 5), ValueError, "eos_token_id=2053"),
    ("float prompt to generate", lambda c: c["qwen"].generate(T([[1.0, 2.0]]), 2), TypeError, "integer tensor"),
    ("empty prompt to generate", lambda c: c["qwen"].generate("", 2), ValueError, "empty string"),
    # ---- loading
    ('dtype="bfloat16"', lambda c: HookedRecurrentModel.from_pretrained(QWEN, dtype="bfloat16"), TypeError, "torch.bfloat16"),
    ("dtype=torch.int64", lambda c: HookedRecurrentModel.from_pretrained(QWEN, dtype=torch.int64), ValueError, "floating dtype"),
    ('device="gpu0"', lambda c: HookedRecurrentModel.from_pretrained(QWEN, device="gpu0"), ValueError, "'gpu0' is not a device"),
    ("config missing a field", lambda c: HookedRecurrentModel.from_pretrained(_folder(c, "no_field", lambda d: d.pop("linear_key_head_dim"))), ValueError, "lacks the field 'linear_key_head_dim'"),
    ("config with more layers than the weights", lambda c: HookedRecurrentModel.from_pretrained(_folder(c, "long_cfg", lambda d: d.update(num_hidden_layers=5, layer_types=d["layer_types"] + ["linear_attention"]))), ValueError, "lacks model.layers.4."),
    ("weights of another shape", lambda c: HookedRecurrentModel.from_pretrained(_folder(c, "wide_mlp", lambda d: d.update(intermediate_size=100))), ValueError, "has shape (384, 128) but config.json implies (100, 128)"),
    ("untied model without lm_head", lambda c: HookedRecurrentModel.from_pretrained(_folder(c, "no_head", edit_weights=_drop_lm_head)), ValueError, "lacks lm_head.weight"),
    ("truncated safetensors", lambda c: HookedRecurrentModel.from_pretrained(_folder(c, "truncated", edit_weights=_truncate)), ValueError, "model.safetensors: cannot read"),
    # ---- SAE
    ("encode_factors: key of the wrong width", lambda c: _sae().encode_factors(torch.randn(5, 7), torch.randn(5, 3)), ValueError, "key has shape (5, 7)"),
    ("encode_factors: batch mismatch", lambda c: _sae().encode_factors(torch.randn(5, 4), torch.randn(6, 3)), ValueError, "leading (batch) shapes"),
    ("encode_factors: integer factors", lambda c: _sae().encode_factors(torch.ones(5, 4, dtype=L), torch.randn(5, 3)), TypeError, "floating"),
    ("SAE on another model of the same shape", lambda c: WriteSAE.load(_fingerprinted_sae_folder(c)).check_model(c["qwen"]), ValueError, "allow_other_model=True"),
    # ---- training
    ("negative lr", lambda c: TrainConfig(lr=-1e-3), ValueError, "TrainConfig.lr=-0.001"),
    ("lr=inf", lambda c: TrainConfig(lr=math.inf), ValueError, "TrainConfig.lr=inf"),
    ("lr=nan", lambda c: train(_sae(), TensorSource(_states(), 32), lr=math.nan), ValueError, "TrainConfig.lr=nan"),
    ("n_steps=0", lambda c: train(_sae(), TensorSource(_states(), 32), n_steps=0), ValueError, "TrainConfig.n_steps=0"),
    ("batch_size=0", lambda c: TrainConfig(batch_size=0), ValueError, "TrainConfig.batch_size=0"),
    ("n_steps=10.5", lambda c: TrainConfig(n_steps=10.5), TypeError, "TrainConfig.n_steps=10.5"),
    ("source smaller than one batch", lambda c: train(_sae(), TensorSource(_states(10), 32), n_steps=5, progress=False), ValueError, "fewer samples than one batch"),
    ("state batches for a write SAE", lambda c: train(_sae(input_kind="write", hook_name="blocks.1.attn.hook_write"), [_states(8)], n_steps=1, progress=False), ValueError, "input_kind='write'"),
    ("factor batches for a state SAE", lambda c: train(_sae(), [(torch.randn(8, 4), torch.randn(8, 3))], n_steps=1, progress=False), ValueError, "input_kind='state'"),
    ("shards of another cell", lambda c: train(_sae(), _other_cell_shards(c), n_steps=1, progress=False), ValueError, "the source holds layer 0"),
    ("TensorSource batch_size=0", lambda c: TensorSource(_states(), batch_size=0), ValueError, "batch_size=0"),
    ("save_shards samples_per_shard=0", lambda c: save_shards([_states(8)], c["tmp"] / "s0", samples_per_shard=0), ValueError, "samples_per_shard=0"),
    ("ModelSource kind='matrix'", lambda c: ModelSource(c["qwen"], ["a b"], 1, 0, kind="matrix"), ValueError, "kind='matrix'"),
    ("ModelSource on an attention layer", lambda c: ModelSource(c["qwen"], ["a b"], 2, 0), ValueError, "layer=2 is not a recurrent layer"),
    ("ModelSource head out of range", lambda c: ModelSource(c["qwen"], ["a b"], 1, 9), ValueError, "head=9 out of range"),
    ("ModelSource positions beyond the context", lambda c: ModelSource(c["qwen"], ["a b"], 1, 0, positions=[200], context_len=128), ValueError, "outside blocks of context_len=128"),
    ("ModelSource one str as texts", lambda c: ModelSource(c["qwen"], "a b", 1, 0), TypeError, "pass a list of texts"),
]  # fmt: skip

CLI = [
    ("extract --context 0", lambda c: _cli("extract", "--out", str(c["tmp"] / "x"), "--context", "0"), "exit 2", "expected an integer >= 1"),
    ("extract --max-samples 0", lambda c: _cli("extract", "--out", str(c["tmp"] / "x"), "--max-samples", "0"), "exit 2", "--max-samples"),
    ("train --batch-size 0", lambda c: _cli("train", "--out", str(c["tmp"] / "x"), "--batch-size", "0"), "exit 2", "--batch-size"),
    ("train --steps 0", lambda c: _cli("train", "--out", str(c["tmp"] / "x"), "--steps", "0"), "exit 2", "--steps"),
    ("train --lr -1", lambda c: _cli("train", "--out", str(c["tmp"] / "x"), "--lr", "-1"), "exit 2", "TrainConfig.lr=-1.0"),
    ("train --lr inf", lambda c: _cli("train", "--out", str(c["tmp"] / "x"), "--lr", "inf"), "exit 2", "TrainConfig.lr=inf"),
    ("train --k > --n-atoms", lambda c: _cli("train", "--out", str(c["tmp"] / "x"), "--k", "64", "--n-atoms", "8"), "exit 2", "exceeds n_atoms"),
    ("train --input-kind matrix", lambda c: _cli("train", "--out", str(c["tmp"] / "x"), "--input-kind", "matrix"), "exit 2", "'state' or 'write'"),
    ("train --out onto a result", lambda c: _cli("train", "--out", _nonempty(c)), "exit 2", "--overwrite"),
    ("train --out under a file", lambda c: _cli("train", "--out", _a_file(c)), "exit 2", "is a file"),
    ("train --shards + conflicting --layer", lambda c: _cli("train", "--out", str(c["tmp"] / "x"), "--shards", _cli_shards(c), "--layer", "1"), "exit 2", "--layer 1 conflicts with the shards"),
    ("train --shards without shards.json", lambda c: _cli("train", "--out", str(c["tmp"] / "x"), "--shards", _shards_without_meta(c)), "exit 2", "shards.json not found"),
    ("evaluate --rank-band abc", lambda c: _cli("evaluate", "--sae", "s", "--out", str(c["tmp"] / "x"), "--rank-band", "abc"), "exit 2", "'abc'; expected two integers"),
    ("evaluate --context 0", lambda c: _cli("evaluate", "--sae", "s", "--out", str(c["tmp"] / "x"), "--context", "0"), "exit 2", "expected an integer >= 2"),
    ("evaluate --firings 0", lambda c: _cli("evaluate", "--sae", "s", "--out", str(c["tmp"] / "x"), "--firings", "0"), "exit 2", "--firings"),
    ("evaluate on another model", lambda c: _cli("evaluate", "--sae", _fingerprinted_sae_folder(c), "--out", str(c["tmp"] / "x")), "exit 1", "--allow-other-model"),
    ("evaluate a corrupt SAE: one line", lambda c: _cli("evaluate", "--sae", _corrupt_sae(c), "--out", str(c["tmp"] / "x")), "exit 1", "cfg.json: not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "exc", "phrase"), [r[1:] for r in LIBRARY], ids=[r[0] for r in LIBRARY]
)
def test_bad_input_raises_at_the_boundary(ctx, call, exc, phrase):
    with pytest.raises(exc) as info:
        call(ctx)
    assert type(info.value) is exc or issubclass(type(info.value), exc)
    assert phrase in str(info.value), str(info.value)


@pytest.mark.parametrize(("call", "exit", "phrase"), [r[1:] for r in CLI], ids=[r[0] for r in CLI])
def test_bad_cli_input_is_one_clear_error(ctx, call, exit, phrase):
    code, output = call(ctx)
    flat = " ".join(output.replace("│", " ").split())
    assert code == int(exit.split()[1]), output
    assert phrase in flat, output
    assert "Traceback" not in output
    assert not (ctx["tmp"] / "x").exists()  # nothing written


def test_the_table_is_at_least_40_rows():
    assert len(LIBRARY) + len(CLI) >= 40
