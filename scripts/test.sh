#!/usr/bin/env bash
# Set up from scratch (see setup_env.sh), run the static checks (ruff, sizes, mypy) and the whole
# test suite, then build the docs. CONTRIBUTING.md lists what each check enforces.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the static checks first (seconds), then the tests (with jaxtyping + beartype, see pyproject.toml)
python -m ruff check .
python -m ruff format --check .
python scripts/check_sizes.py
python -m mypy
python -m pytest -q -n 2 "$@"  # two workers on two cores (pytest-xdist)
if [ -f mkdocs.yml ] && [ -d docs ]; then
  python -m mkdocs build --strict -q
fi
