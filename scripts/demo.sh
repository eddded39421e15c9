#!/usr/bin/env bash
# Set up from scratch and run the demo: tiny local model, train → merge → export → generate, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --llamacpp
. .venv/bin/activate
python examples/demo.py "$@"
