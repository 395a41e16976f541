"""Build the documentation site, serve it locally, and screenshot a few pages in headless Chromium.

    python scripts/screenshot_docs.py [--out docs-screenshots] [--chromium chromium]

Pages: the home page, the hook reference and the first tutorial. Each page's HTML is fetched over
HTTP and must contain its expected heading; the PNGs land in `--out` (gitignored) for a person to
look at. Chromium is Debian's `chromium` (`apt-get install -y chromium`); nothing is fetched from
the network (the site is served on 127.0.0.1 and Chromium's background networking is off).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (path in the site, PNG name, the page's expected <h1> text)
PAGES = [
    ("", "home.png", "hooked-recurrent + WriteSAE"),
    ("hooks/", "hooks.png", "Hook reference"),
    ("tutorials/01_models_hooks_cache/", "tutorial_01.png", "Models, hooks and the cache"),
]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,1600",
]


def build_site(site: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        check=True,
    )


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


def screenshot(chromium: str, url: str, png: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", url],
            check=True,
            capture_output=True,
            timeout=120,
        )
    if not png.exists() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot for {url}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs-screenshots")
    ap.add_argument("--chromium", default=None, help="Chromium executable (default: on PATH)")
    args = ap.parse_args()
    chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found; install it with `apt-get install -y chromium`")
    args.out.mkdir(parents=True, exist_ok=True)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        build_site(site)
        server, base = serve(site)
        try:
            for path, name, expected in PAGES:
                url = base + path
                html = urllib.request.urlopen(url, timeout=30).read().decode("utf-8")
                ok = re.search(r"<h1[^>]*>\s*" + re.escape(expected), html) is not None
                if not ok:
                    failures.append(f"{url}: no <h1> {expected!r} in the HTML")
                screenshot(chromium, url, args.out / name)
                print(f"{'ok ' if ok else 'BAD'} {url} -> {args.out / name}")
        finally:
            server.shutdown()
    for f in failures:
        print(f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
