"""The demo's atom dashboard in headless Chromium (Playwright), opened from disk with every
request outside its folder aborted: the table sorts, an atom opens, and what the page shows equals
the data file.

Needs Debian's `chromium` and the `playwright` package (`scripts/setup_env.sh` installs both);
the test skips, saying so, where either is missing. Screenshots of the index and of one atom page
are saved in the test's tmp folder, and copied to `$WRITESAE_SCREENSHOTS` when it is set. With
`$WRITESAE_DASHBOARD_DIR` set, the test opens that dashboard (e.g. a full demo's) instead of
running a small demo.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from writesae.cli import app
from writesae.dashboards import load_data

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _need_browser():
    if CHROMIUM is None:
        pytest.skip(
            "chromium not found: install Debian's chromium (apt-get install -y chromium, as "
            "scripts/setup_env.sh does) to run the dashboard browser test"
        )
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    given = os.environ.get("WRITESAE_DASHBOARD_DIR")
    if given:
        return Path(given).resolve().parent
    out = tmp_path_factory.mktemp("demo") / "demo"
    args = ["demo", "--out", str(out), "--n-atoms", "32", "--k", "4", "--steps", "20"]
    r = CliRunner().invoke(app, args + ["--firings", "20", "--dashboard-tokens", "2048"])
    assert r.exit_code == 0, r.output
    return out


def _num(text: str) -> float:
    return float(text.rstrip("%"))


def _pct(x):
    return None if x is None else 100 * x


def _close(shown: str, value, rel: float = 5e-3) -> bool:
    if value is None:
        return shown == "\u2013"
    return _num(shown) == pytest.approx(value, rel=rel, abs=1e-12)


def test_demo_report_links_the_dashboard(demo_dir):
    md = (demo_dir / "report.md").read_text()
    assert "[Open the atom dashboard](dashboard/index.html)" in md
    data = load_data(demo_dir / "dashboard")
    sae_cfg = json.loads((demo_dir / "sae" / "cfg.json").read_text())
    assert data["meta"]["n_atoms"] == len(data["atoms"]) == sae_cfg["n_atoms"]
    per_atom = json.loads((demo_dir / "results.json").read_text())["substitution"]["population"]
    for a, rate in per_atom["per_atom"].items():
        assert data["atoms"][int(a)]["win_rate"] == pytest.approx(rate, rel=1e-4)


def test_dashboard_command_on_the_demos_sae(demo_dir, tmp_path):
    out = tmp_path / "dash"
    args = ["dashboard", "--sae", str(demo_dir / "sae"), "--out", str(out), "--report"]
    args += [str(demo_dir), "--n-tokens", "1000", "--context", "96"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    data = load_data(out)
    assert (data["meta"]["n_seq"], data["meta"]["context"]) == (10, 96)
    per_atom = json.loads((demo_dir / "results.json").read_text())["substitution"]["population"]
    shown = {a["atom"]: a["win_rate"] for a in data["atoms"] if a["win_rate"] is not None}
    assert shown == pytest.approx({int(a): v for a, v in per_atom["per_atom"].items()}, rel=1e-4)
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "--overwrite" in again.output


def _index_checks(page, atoms):
    def shown_order():
        return [
            int(x)
            for x in page.eval_on_selector_all("#atoms tbody tr", "r => r.map(e => e.dataset.atom)")
        ]

    by = lambda key, desc: sorted(  # noqa: E731
        atoms,
        key=lambda a: ((-1 if desc else 1) * (a[key] if a[key] is not None else -1e300), a["atom"]),
    )
    assert shown_order() == [a["atom"] for a in by("fire_rate", True)]
    page.click("#atoms th[data-key=mean_act]")
    assert shown_order() == [a["atom"] for a in by("mean_act", True)]
    page.click("#atoms th[data-key=mean_act]")
    assert shown_order() == [a["atom"] for a in by("mean_act", False)]
    page.click("#atoms th[data-key=fire_rate]")
    rows = page.query_selector_all("#atoms tbody tr")
    for tr in rows:
        a = atoms[int(tr.get_attribute("data-atom"))]
        assert _close(
            tr.query_selector("[data-field=fire_rate]").inner_text(), _pct(a["fire_rate"])
        )
        assert _close(tr.query_selector("[data-field=mean_act]").inner_text(), a["mean_act"])
        assert _close(tr.query_selector("[data-field=win_rate]").inner_text(), _pct(a["win_rate"]))
    return int(rows[0].get_attribute("data-atom"))


def _atom_checks(page, a, vocab):
    assert page.inner_text("#atom-title") == f"Atom {a['atom']}"
    stats = lambda f: page.inner_text(f"#atom-stats [data-field={f}]")  # noqa: E731
    assert _close(stats("fire_rate"), _pct(a["fire_rate"]))
    assert _close(stats("fve_share"), _pct(a["fve_share"]))
    counts = page.eval_on_selector_all("#histogram rect.bar", "r => r.map(e => +e.dataset.count)")
    assert counts == a["hist"]
    shown = page.query_selector_all("#contexts .context")
    assert len(shown) == len(a["contexts"]) > 0
    for div, ctx in zip(shown, a["contexts"], strict=True):
        assert _close(div.query_selector(".val").inner_text(), ctx["act"])
        toks = div.query_selector_all(".tok")
        texts = [vocab[t].replace("\n", "\u23ce") for t in ctx["tokens"]]
        assert [t.text_content() for t in toks] == texts
        assert [float(t.get_attribute("data-act")) for t in toks] == ctx["acts"]
        fire = div.query_selector(".tok.fire")
        assert int(fire.get_attribute("data-pos")) == ctx["pos"]
        title = fire.get_attribute("title")  # what hovering shows
        assert title.startswith(f"pos {ctx['pos']} \u00b7 act ")
        assert _close(title.split("act ")[1], ctx["acts"][ctx["pos"] - ctx["start"]])
    for table, key in (("promoted", "promoted"), ("suppressed", "suppressed")):
        rows = page.query_selector_all(f"#{table} tbody tr")
        assert [r.query_selector(".tok").text_content() for r in rows] == [
            vocab[t["token"]].replace("\n", "\u23ce") for t in a[key]
        ]
        for r, t in zip(rows, a[key], strict=True):
            assert _close(r.query_selector_all("td")[1].inner_text(), t["value"])
    mem = page.query_selector_all("#memory tbody tr")
    for j, r in enumerate(mem):
        assert _close(r.query_selector_all("td")[2].inner_text(), _pct(a["memory"]["exact"][j]))


def test_dashboard_in_chromium_offline(demo_dir, tmp_path):
    _need_browser()
    from playwright.sync_api import sync_playwright

    folder = (demo_dir / "dashboard").resolve()
    data = load_data(folder)
    outside, errors = [], []

    def guard(route):
        url = route.request.url
        if url.startswith(folder.as_uri() + "/"):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.route("**/*", guard)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto((folder / "index.html").as_uri())
        page.wait_for_selector("#atoms tbody tr")
        top = _index_checks(page, data["atoms"])
        page.screenshot(path=str(tmp_path / "dashboard_index.png"))
        page.click(f"#atoms tbody tr[data-atom='{top}']")
        page.wait_for_selector("#atom-title")
        _atom_checks(page, data["atoms"][top], data["vocab"])
        page.screenshot(path=str(tmp_path / "dashboard_atom.png"), full_page=True)
        browser.close()
    assert outside == [], f"requests outside the dashboard folder: {outside}"
    assert errors == []
    for name in ("dashboard_index.png", "dashboard_atom.png"):
        assert (tmp_path / name).stat().st_size > 10_000
        if os.environ.get("WRITESAE_SCREENSHOTS"):
            shutil.copy(tmp_path / name, Path(os.environ["WRITESAE_SCREENSHOTS"]) / name)
