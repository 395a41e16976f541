#!/usr/bin/env bash
# Set up from scratch (see setup_env.sh) and run the whole test suite, then build the docs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q "$@"
if [ -f mkdocs.yml ] && [ -d docs ]; then
  python -m mkdocs build --strict -q
fi
