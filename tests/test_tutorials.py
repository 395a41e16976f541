"""Every notebook in tutorials/ runs from top to bottom without an error, on the shipped models.

Each notebook asserts its own numbers against an independent recomputation (the state rebuilt from
its factors, a propagated edit computed by hand, ...); this test only runs them, in a fresh kernel
that imports this checkout, with a time limit per notebook.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from hooked_recurrent import list_pretrained

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
#: seconds per notebook; each takes about a minute on 2 CPU cores, under 3 minutes when shared
TIMEOUT = 300
#: shipped models each notebook loads
NEEDS = {
    "01_models_hooks_cache.ipynb": [
        "tiny-qwen3.5-shakespeare",
        "tiny-mamba2-shakespeare",
        "tiny-rwkv7-shakespeare",
    ],
}
DEFAULT_NEEDS = ["tiny-qwen3.5-shakespeare"]


def test_there_are_five_tutorials():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path: Path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    missing = [n for n in NEEDS.get(path.name, DEFAULT_NEEDS) if n not in list_pretrained()]
    if missing:
        pytest.skip(f"shipped model(s) not installed: {', '.join(missing)}")

    # the kernel imports this checkout (not another install), offline, with one thread per op:
    # on a shared machine that is faster than fighting over the cores
    path_env = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path_env if p))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )

    def too_slow(signum, frame):
        raise TimeoutError(f"{path.name} ran longer than {TIMEOUT} s")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(TIMEOUT)
    t0 = time.perf_counter()
    try:
        client.execute()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    elapsed = time.perf_counter() - t0
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
    assert elapsed < TIMEOUT
