"""Scaling out: sweeps, torchrun data parallelism (gloo on CPU) and corpora.

The references are the single-process runs: a 2-rank `torchrun` train / sweep must give the same
parameters as one process with the same global batch, seed and steps; a 2-rank extract the same
set of samples; a sweep cell the SAE that `train` gives for that cell alone.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.writesae.test_cli import tiny_model_dir  # noqa: F401 (the shared tiny model fixture)
from writesae import ModelSource, TrainConfig, WriteSAE, WriteSAEConfig, load_sae, sweep, train
from writesae.cli import app
from writesae.corpus import Corpus

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SAE_ARGS = ["--n-atoms", "32", "--k", "4", "--batch-size", "64", "--seed", "3", "--lr", "3e-3"]
TRAIN_STEPS = ["--steps", "60"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread in this process too, as in the torchrun workers (tiny ops on a busy machine are
    many times slower with two spinning threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root, "TQDM_DISABLE": "1"}


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [*TORCHRUN, "-m", "writesae.cli", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _cli(*args: str) -> None:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output


def _max_diff(a: Path, b: Path) -> float:
    sa, sb = load_sae(a), load_sae(b)
    return max((p - sb.get_parameter(n)).abs().max().item() for n, p in sa.named_parameters())


@pytest.fixture(scope="module")
def shards(tiny_model_dir, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("shards") / "one"
    _cli(
        "extract", "--model", str(tiny_model_dir), "--text", str(tiny_model_dir / "text.txt"),
        "--layer", "1", "--head", "2", "--input-kind", "write", "--context", "32", "--out", str(d),
    )  # fmt: skip
    return d


@pytest.fixture(scope="module")
def single_train(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "sae"
    _cli("train", "--shards", str(shards), "--out", str(out), *SAE_ARGS, *TRAIN_STEPS)
    return out


def test_torchrun_train_equals_one_process(shards, single_train, tmp_path):
    _torchrun(
        "train", "--shards", str(shards), "--out", str(tmp_path / "a"), *SAE_ARGS, *TRAIN_STEPS
    )
    assert _max_diff(tmp_path / "a", single_train) <= 1e-5


def test_sigterm_to_torchrun_then_resume_equals_uninterrupted(shards, single_train, tmp_path):
    out = tmp_path / "c"
    args = ["train", "--shards", str(shards), "--out", str(out), *SAE_ARGS, *TRAIN_STEPS]
    cmd = [*TORCHRUN, "-m", "writesae.cli", *args, "--ckpt-every", "1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt = tmp_path / "c.checkpoint" / "train_state.pt"
    deadline = time.monotonic() + 180
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher only; it passes SIGTERM to the workers
    log = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode != 0, log[-3000:]
    state = torch.load(ckpt, weights_only=True)
    assert 1 <= state["step"] < 60, state["step"]
    assert not out.exists()
    _torchrun(*args, "--resume")
    assert _max_diff(out, single_train) <= 1e-5
    assert not ckpt.parent.exists()


def _rows(folder: Path) -> torch.Tensor:
    meta = json.loads((folder / "shards.json").read_text())
    parts = [load_file(str(folder / n)) for n in meta["shards"]]
    rows = torch.cat([torch.cat([p["key"], p["value"]], 1) for p in parts])
    assert rows.shape[0] == meta["n_samples"]
    return rows


def test_torchrun_extract_writes_the_same_samples(tiny_model_dir, shards, tmp_path):  # noqa: F811
    out = tmp_path / "two"
    _torchrun(
        "extract", "--model", str(tiny_model_dir), "--text", str(tiny_model_dir / "text.txt"),
        "--layer", "1", "--head", "2", "--input-kind", "write", "--context", "32",
        "--out", str(out),
    )  # fmt: skip
    names = json.loads((out / "shards.json").read_text())["shards"]
    assert {n[:10] for n in names} == {"shard_r000", "shard_r001"}
    one, two = _rows(shards), _rows(out)
    assert one.shape == two.shape
    # every sample of one process is among the two ranks' (sorted rows compared exactly)
    key = lambda r: sorted(map(tuple, r.tolist()))  # noqa: E731
    assert key(one) == key(two)


def _sweep_args(model_dir: Path, data: Path) -> list[str]:
    return [
        "--model", str(model_dir), "--data", str(data), "--layers", "0,1", "--heads", "1,2",
        "--input-kind", "write", "--steps", "30", "--context", "32", "--buffer", "512", *SAE_ARGS,
    ]  # fmt: skip


def test_torchrun_sweep_equals_one_process(tiny_model_dir, tmp_path):  # noqa: F811
    data = tmp_path / "corpus"
    data.mkdir()
    words = (tiny_model_dir / "text.txt").read_text().split()
    for i in range(4):  # four documents: packed with the tokenizer's EOS between them
        (data / f"doc{i}.txt").write_text(" ".join(words[i * 1500 : (i + 1) * 1500]))
    _cli("sweep", "--out", str(tmp_path / "one"), *_sweep_args(tiny_model_dir, data))
    _torchrun("sweep", "--out", str(tmp_path / "two"), *_sweep_args(tiny_model_dir, data))
    index = json.loads((tmp_path / "one" / "sweep.json").read_text())
    assert sorted(index) == ["layer0_head1", "layer0_head2", "layer1_head1", "layer1_head2"]
    for cell, where in index.items():
        cfg = load_sae(tmp_path / "two" / cell).cfg
        assert (cfg.hook_name, cfg.head) == (
            f"blocks.{where['layer']}.attn.hook_write",
            where["head"],
        )
        assert _max_diff(tmp_path / "one" / cell, tmp_path / "two" / cell) <= 1e-5


@pytest.mark.parametrize("kind,n_cells", [("write", 8), ("state", 2)])
def test_sweep_cell_equals_training_it_alone(tiny_model_dir, kind, n_cells):  # noqa: F811
    from hooked_recurrent import HookedRecurrentModel

    m = HookedRecurrentModel.from_pretrained(str(tiny_model_dir)).eval()
    text = [(tiny_model_dir / "text.txt").read_text()]
    cells = [(layer, h) for layer in m.cfg.recurrent_layers for h in range(4)][:n_cells]
    cfg = TrainConfig(
        n_steps=24, batch_size=64, lr=3e-3, seed=5, warmup_steps=3, dead_steps=4,
        resample_every=6, progress=False, log_every=8,
    )  # fmt: skip
    src = dict(context_len=32, buffer_size=512)
    result = sweep(m, cells, text, kind=kind, n_atoms=32, k=4, cfg=cfg, **src)
    resampled = 0
    for layer, head in cells:
        sae_cfg = WriteSAEConfig(
            d_k=m.cfg.d_k, d_v=m.cfg.d_v, n_atoms=32, k=4, head=head, input_kind=kind,
            hook_name=f"blocks.{layer}.attn.hook_{kind}",
        )  # fmt: skip
        alone = WriteSAE(sae_cfg, seed=5)
        metrics = train(
            alone, ModelSource(m, text, layer, head, kind, batch_size=64, seed=5, **src), cfg
        )
        swept, swept_metrics = result[layer, head]
        for name, p in alone.named_parameters():
            assert (p - swept.get_parameter(name)).abs().max().item() <= 1e-5, (layer, head, name)
        assert swept_metrics.fve == pytest.approx(metrics.fve, abs=1e-6)
        assert swept_metrics.n_resampled == metrics.n_resampled
        resampled += metrics.n_resampled
    assert resampled > 0  # the comparison covers resampling


def test_corpus_packs_documents_with_eos(tiny_model_dir, tmp_path):  # noqa: F811
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    d = tmp_path / "c"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("w1 w2 w3\nw4 w5\n")
    (d / "b.jsonl").write_text('{"text": "w6 w7"}\n\n{"text": "w8"}\n')
    pq.write_table(pa.table({"text": ["w9 w10", "w11"]}), d / "sub" / "c.parquet")
    (d / "ignored.csv").write_text("w50")
    docs = ["w1 w2 w3\nw4 w5\n", "w6 w7", "w8", "w9 w10", "w11"]
    eos = tok.eos_token_id
    want = [i for doc in docs for i in [*tok.encode(doc, add_special_tokens=False), eos]]
    got = torch.cat(list(Corpus(d, tok))).tolist()
    assert got == want and got.count(eos) == 5
    # ModelSource cuts the packed stream into contexts of 4 tokens (the rest is dropped)
    src = ModelSource.__new__(ModelSource)
    src.texts, src.context_len, src.model_batch_size, src.model = Corpus(d, tok), 4, 2, None
    blocks = torch.cat([b.reshape(-1) for b in src._blocks()]).tolist()
    assert blocks == want[: len(want) // 4 * 4]


def test_corpus_errors(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    import datasets
    import huggingface_hub
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt, .jsonl, .parquet files"):
        list(Corpus(tmp_path / "empty", tok))
    with pytest.raises(FileNotFoundError, match="not a file or folder"):
        list(Corpus(tmp_path / "missing.txt", tok))
    (tmp_path / "bad.jsonl").write_text('{"body": "w1"}\n')
    with pytest.raises(ValueError, match="no field 'text'"):
        list(Corpus(tmp_path / "bad.jsonl", tok))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="Hugging Face dataset failed.*Offline: pass a local"):
        list(Corpus("someone/some-corpus", tok))


class _Breaks:
    """A source that raises after ``after`` batches (a crash in the middle of a run)."""

    def __init__(self, source, after: int):
        self.source, self.after = source, after

    def __iter__(self):
        for i, b in enumerate(self.source):
            if i == self.after:
                raise RuntimeError("crash")
            yield b


def test_sweep_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):  # noqa: F811
    from hooked_recurrent import HookedRecurrentModel
    from writesae.sweep import StackedSAE, train_stack

    m = HookedRecurrentModel.from_pretrained(str(tiny_model_dir)).eval()
    text = [(tiny_model_dir / "text.txt").read_text()]
    cells = [(0, 1), (2, 3)]
    cfg = TrainConfig(
        n_steps=16, batch_size=64, seed=2, warmup_steps=2, dead_steps=3, resample_every=4,
        progress=False, log_every=4,
    )  # fmt: skip

    def fresh():
        saes = [
            WriteSAE(WriteSAEConfig(d_k=m.cfg.d_k, d_v=m.cfg.d_v, n_atoms=32, k=4,
                                    hook_name=f"blocks.{c[0]}.attn.hook_write", head=c[1],
                                    input_kind="write"), seed=2)
            for c in cells
        ]  # fmt: skip
        src = ModelSource(m, text, 0, 0, "write", batch_size=64, buffer_size=256, context_len=32,
                          seed=2, cells=cells)  # fmt: skip
        return StackedSAE(saes), src

    whole, src = fresh()
    train_stack(whole, cells, src, cfg)
    ckpt = tmp_path / "ckpt"
    part, src = fresh()
    with pytest.raises(RuntimeError, match="crash"):
        train_stack(part, cells, _Breaks(src, 11), cfg, ckpt, checkpoint_every=5)
    assert torch.load(ckpt / "sweep_state.pt", weights_only=True)["step"] == 10
    resumed, src = fresh()
    metrics = train_stack(resumed, cells, src, cfg, ckpt, checkpoint_every=5, resume=True)
    assert metrics[0].n_steps == 16 and metrics[0].step == [4, 8, 12, 16]
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    other, src = fresh()
    with pytest.raises(ValueError, match="another sweep"):
        train_stack(other, cells, src, replace(cfg, seed=3), ckpt, resume=True)
