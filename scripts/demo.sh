#!/usr/bin/env bash
# Set up from scratch (see setup_env.sh) and run the WriteSAE demo on the shipped Qwen3.5 model.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
writesae demo --out writesae-demo "$@"
