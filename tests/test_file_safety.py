"""Nothing lost, nothing misread: folders are written whole (temporary sibling + rename), existing
results are replaced only with --overwrite, training and extraction survive interruption, and
loading reads exactly the checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import writesae.saes.base
from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.pretrained import SHIPPED_DIR
from writesae import ShardSource, TensorSource, WriteSAE, WriteSAEConfig, save_shards
from writesae.cli import app

ROOT = Path(__file__).resolve().parents[1]
QWEN = "tiny-qwen3.5-shakespeare"


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(
        os.environ,
        PYTHONPATH=path,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )


def _writesae(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "writesae.cli", *args],
        env=_env(),
        cwd=kw.pop("cwd", None),
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 300),
    )


def _sae(seed: int = 0) -> WriteSAE:
    cfg = WriteSAEConfig(d_k=4, d_v=3, n_atoms=16, k=2, hook_name="blocks.1.attn.hook_state")
    return WriteSAE(cfg, seed=seed)


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# ------------------------------------------------------------------ save()
def test_interrupted_save_leaves_no_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "sae"
    old = _sae(0).save(target)
    before = load_file(str(old / "sae_weights.safetensors"))

    def half_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing the weights

    monkeypatch.setattr(writesae.saes.base, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        _sae(1).save(target, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        _sae(1).save(tmp_path / "fresh")
    monkeypatch.undo()
    assert not (tmp_path / "fresh").exists()
    assert _siblings(target) == []  # no temporary folder left behind
    after = WriteSAE.load(target).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_onto_an_existing_sae_needs_overwrite(tmp_path):
    target = _sae(0).save(tmp_path / "sae")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _sae(1).save(target)
    assert torch.equal(WriteSAE.load(target).W_dec_key, _sae(0).W_dec_key)
    _sae(1).save(target, overwrite=True)
    assert torch.equal(WriteSAE.load(target).W_dec_key, _sae(1).W_dec_key)
    assert _siblings(target) == []


# ------------------------------------------------------------------ extract
class _Interrupting:
    """A source that raises KeyboardInterrupt after `after` batches."""

    def __init__(self, source, after: int):
        self.source, self.after = source, after

    def __iter__(self):
        for i, b in enumerate(self.source):
            if i == self.after:
                raise KeyboardInterrupt
            yield b


def test_interrupted_extract_resumes_from_its_last_complete_shard(tmp_path):
    data = torch.randn(400, 4, 3)

    def source():
        return TensorSource(data, batch_size=25, seed=3)

    kw = dict(samples_per_shard=100, metadata=dict(layer=1, head=0, kind="state"))
    ref = save_shards(source(), tmp_path / "ref", **kw)
    target = tmp_path / "sh"
    with pytest.raises(KeyboardInterrupt):
        save_shards(_Interrupting(source(), after=9), target, **kw)  # 2 shards complete
    assert not target.exists()
    partial = tmp_path / ".sh.partial"
    assert sorted(p.name for p in partial.glob("shard_*.safetensors")) == [
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]
    with pytest.raises(FileExistsError):
        save_shards(source(), tmp_path / "ref", **kw)  # an existing result is never replaced
    paths = save_shards(source(), target, resume=True, **kw)
    assert [p.name for p in paths] == [p.name for p in ref]
    for a, b in zip(ref, paths, strict=True):
        assert torch.equal(load_file(str(a))["state"], load_file(str(b))["state"])
    assert json.loads((target / "shards.json").read_text()) == json.loads(
        (tmp_path / "ref" / "shards.json").read_text()
    )
    assert not partial.exists()


# ------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """States of layer 0, head 2 of the shipped Qwen3.5 (not the default cell)."""
    d = tmp_path_factory.mktemp("cli") / "shards"
    r = CliRunner().invoke(
        app,
        ["extract", "--out", str(d), "--layer", "0", "--head", "2"]
        + ["--max-samples", "1024", "--context", "64"],
    )
    assert r.exit_code == 0, r.output
    return d


def test_extract_records_provenance(shards):
    meta = json.loads((shards / "shards.json").read_text())
    assert (meta["model"], meta["layer"], meta["head"], meta["input_kind"]) == (QWEN, 0, 2, "state")
    assert meta["n_samples"] == 1024 and meta["n_tokens"] >= 1024 and meta["model_fingerprint"]


def test_train_out_onto_a_result_needs_overwrite(shards, tmp_path):
    out = tmp_path / "sae"
    args = ["train", "--shards", str(shards), "--steps", "5", "--n-atoms", "16", "--k", "2"]
    args += ["--batch-size", "64", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["hook_name"], cfg["head"]) == ("blocks.0.attn.hook_state", 2)  # from the shards
    first = (out / "sae_weights.safetensors").read_bytes()
    r = CliRunner().invoke(app, args[:-4] + ["--seed", "1"] + args[-4:])
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (out / "sae_weights.safetensors").read_bytes() == first
    r = CliRunner().invoke(app, args + ["--seed", "1", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (out / "sae_weights.safetensors").read_bytes() != first
    assert _siblings(out) == []  # no checkpoint or temporary folder left


def test_evaluate_overwrite_replaces_the_report_whole(shards, tmp_path):
    sae = tmp_path / "sae"
    r = CliRunner().invoke(
        app,
        ["train", "--shards", str(shards), "--steps", "5", "--n-atoms", "16", "--k", "2"]
        + ["--batch-size", "64", "--out", str(sae)],
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "report"
    out.mkdir()
    (out / "install.png").write_bytes(b"old plot")
    fast = ["--no-substitution", "--no-closed-form", "--no-install", "--context", "32"]
    r = CliRunner().invoke(app, ["evaluate", "--sae", str(sae), "--out", str(out), *fast])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(
        app, ["evaluate", "--sae", str(sae), "--out", str(out), *fast, "--overwrite"]
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json"]
    assert _siblings(out) == ["sae"]


def _train_args(shards: Path, out: Path) -> list[str]:
    return ["train", "--shards", str(shards), "--out", str(out), "--steps", "400"] + [
        "--n-atoms", "32", "--k", "4", "--batch-size", "64", "--ckpt-every", "5", "--seed", "3"
    ]  # fmt: skip


def test_interrupted_train_resumes_bit_identically(shards, tmp_path):
    ref = _writesae(*_train_args(shards, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "sae"
    ckpt = tmp_path / "sae.checkpoint"
    proc = subprocess.Popen(
        [sys.executable, "-m", "writesae.cli", *_train_args(shards, out)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (ckpt / "train_state.pt").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err and not out.exists()
    step = torch.load(ckpt / "train_state.pt", weights_only=True)["step"]
    assert 0 < step < 400

    again = _writesae(*_train_args(shards, out))  # a checkpoint is there: say so, do nothing
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _writesae(*_train_args(shards, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "ref" / "sae_weights.safetensors"))
    b = load_file(str(out / "sae_weights.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff == 0.0, f"max |diff| = {diff} after resuming at step {step}"
    assert json.loads((out / "training.json").read_text()) == json.loads(
        (tmp_path / "ref" / "training.json").read_text()
    )
    assert not ckpt.exists()


def test_library_errors_print_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "sae"
    bad.mkdir()
    (bad / "cfg.json").write_text("{")
    (bad / "sae_weights.safetensors").write_bytes(b"")
    args = ["evaluate", "--sae", str(bad), "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.startswith("error: ") and "cfg.json: not valid JSON" in r.output
    r = CliRunner().invoke(app, ["--debug", *args])
    assert r.exit_code == 1 and isinstance(r.exception, ValueError)  # raised: a traceback
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ the documented workflow
def test_extract_train_evaluate_workflow_keeps_the_cell(tmp_path):
    """The extract -> train -> evaluate workflow of docs/writesae.md on a non-default cell."""
    steps = [
        ["extract", "--out", "shards", "--layer", "0", "--head", "2"]
        + ["--max-samples", "1024", "--context", "64"],
        ["train", "--shards", "shards", "--out", "my-sae", "--steps", "30"]
        + ["--n-atoms", "32", "--k", "4", "--batch-size", "64"],
        ["evaluate", "--sae", "my-sae", "--out", "my-report", "--firings", "20"]
        + ["--context", "32", "--no-closed-form", "--no-install"],
    ]
    for args in steps:
        r = _writesae(*args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((tmp_path / "my-sae" / "cfg.json").read_text())
    assert (cfg["hook_name"], cfg["head"], cfg["model_name"]) == (
        "blocks.0.attn.hook_state",
        2,
        QWEN,
    )
    res = json.loads((tmp_path / "my-report" / "results.json").read_text())
    assert (res["settings"]["layer"], res["settings"]["head"]) == (0, 2)
    assert res["substitution"]["n"] > 0
    assert "layer" in (tmp_path / "my-report" / "report.md").read_text()


# ------------------------------------------------------------------ loading
def _copy_shipped(tmp_path: Path) -> Path:
    d = tmp_path / "qwen"
    shutil.copytree(SHIPPED_DIR / QWEN, d)
    return d


def test_a_stray_safetensors_file_is_ignored_with_a_warning(tmp_path, caplog):
    d = _copy_shipped(tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in sd.items()}, str(d / "old_run.safetensors"))
    tokens = torch.tensor([[3, 5, 7, 9]])
    with caplog.at_level(logging.WARNING):
        m = HookedRecurrentModel.from_pretrained(str(d))
    assert "old_run.safetensors" in caplog.text
    ref = HookedRecurrentModel.from_pretrained(QWEN)
    with torch.no_grad():
        assert torch.equal(m(tokens), ref(tokens))


def test_a_config_with_fewer_layers_than_the_weights_is_an_error(tmp_path):
    d = _copy_shipped(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    cfg["layer_types"] = cfg["layer_types"][:3]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json gives 3 layers") as e:
        HookedRecurrentModel.from_pretrained(str(d))
    assert "model.safetensors" in str(e.value) and "model.layers.3." in str(e.value)


def test_only_the_files_of_the_index_are_read(tmp_path):
    d = _copy_shipped(tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    names = sorted(sd)
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, str(d / "part-1.safetensors"))
    save_file({k: sd[k] for k in names[half:]}, str(d / "part-2.safetensors"))
    (d / "model.safetensors").rename(d / "stale.safetensors")
    weight_map = {k: ("part-1.safetensors" if i < half else "part-2.safetensors")
                  for i, k in enumerate(names)}  # fmt: skip
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    m = HookedRecurrentModel.from_pretrained(str(d))
    ref = HookedRecurrentModel.from_pretrained(QWEN)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters(), strict=True))
    del weight_map[names[0]]
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="part-1.safetensors"):
        HookedRecurrentModel.from_pretrained(str(d))


def test_shard_source_reads_back_the_provenance(tmp_path):
    save_shards(TensorSource(torch.randn(64, 4, 3), 32), tmp_path / "s", metadata=dict(layer=1))
    src = ShardSource(tmp_path / "s", batch_size=32)
    assert src.meta["layer"] == 1 and src.meta["input_kind"] == "state"
    assert src.meta["n_samples"] == 64
