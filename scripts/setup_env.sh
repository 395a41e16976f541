#!/usr/bin/env bash
# Create .venv (if missing) with the CPU build of PyTorch and this package in editable mode.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run twice.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,docs]" -c scripts/constraints.txt
# Hugging Face silently swaps in these GPU kernels when importable: keep them out on CPU
for pkg in fla mamba_ssm causal_conv1d; do
  if python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('$pkg') else 1)"; then
    echo "error: '$pkg' is installed in $VENV; the CPU parity tests need it absent" >&2
    exit 1
  fi
done
# The dashboard's browser test drives Debian's chromium through the playwright package (a test
# extra); never `playwright install`, which downloads its own browser. Without root or apt the
# test skips and says why.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else
    echo "note: chromium not installed (needs root and apt); the dashboard browser test will skip" >&2
  fi
fi
