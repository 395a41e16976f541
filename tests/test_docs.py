"""The documentation site builds with `mkdocs build --strict` and no warning, and its API reference
covers every public class and function of both packages, each with a docstring."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hooked_recurrent", "writesae")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def public_api() -> dict[str, list[str]]:
    """{module: public names}: the module's `__all__`, else its top-level classes and functions
    whose names do not start with an underscore. Read from the source, not imported."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = None
            for node in tree.body:
                if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
                ):
                    names = list(ast.literal_eval(node.value))
            if names is None:
                names = [
                    n.name
                    for n in tree.body
                    if isinstance(n, ast.ClassDef | ast.FunctionDef) and not n.name.startswith("_")
                ]
            if path.name == "__init__.py" and module in PACKAGES:
                continue  # the packages re-export names documented in their own modules
            out[module] = names
    return out


def missing_docstrings() -> list[str]:
    """Public classes, functions and methods (of public classes) without a docstring."""
    api = public_api()
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            public = set(api.get(module, []))
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if not isinstance(node, ast.ClassDef | ast.FunctionDef) or node.name not in public:
                    continue
                if ast.get_docstring(node) is None:
                    bad.append(f"{module}.{node.name}")
                if isinstance(node, ast.ClassDef):
                    for m in node.body:
                        if (
                            isinstance(m, ast.FunctionDef)
                            and not m.name.startswith("_")
                            and ast.get_docstring(m) is None
                        ):
                            bad.append(f"{module}.{node.name}.{m.name}")
    return bad


def inventory(site: Path) -> set[str]:
    """Object names in the site's `objects.inv` (Sphinx inventory v2, written by mkdocstrings)."""
    raw = (site / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = raw.index(b"\n", header_end) + 1
    text = zlib.decompress(raw[header_end:]).decode("utf-8")
    return {line.split(" ", 1)[0] for line in text.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        NO_MKDOCS_2_WARNING="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = ANSI.sub("", proc.stdout + proc.stderr)
    return out, proc.returncode, log


def test_mkdocs_build_strict_has_no_warning(site):
    out, returncode, log = site
    warnings = [line for line in log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert returncode == 0 and not warnings, "\n".join(warnings) or log[-3000:]
    for page in ("index.html", "hooks/index.html", "api/index.html", "benchmarks/index.html"):
        assert (out / page).exists(), page
    for nb in sorted((ROOT / "tutorials").glob("*.ipynb")):
        assert (out / "tutorials" / nb.stem / "index.html").exists(), nb.name


def test_api_reference_lists_every_public_name(site):
    out, returncode, _ = site
    assert returncode == 0
    documented = inventory(out)
    missing = [
        f"{module}.{name}"
        for module, names in public_api().items()
        for name in names
        if f"{module}.{name}" not in documented
    ]
    assert not missing, f"not in docs/api.md: {missing}"


def test_every_public_name_has_a_docstring():
    assert not missing_docstrings()
