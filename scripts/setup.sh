#!/usr/bin/env bash
# Create .venv (if needed) and install qdora with its test/export/plot extras.
# torch: if none is importable, install torch==2.13.0 (on our CI machines that is a CPU build from local
# disk; elsewhere, install the torch build for your machine first, e.g. from pytorch.org, and this keeps it).
# Usage: scripts/setup.sh [--llamacpp]   (--llamacpp also installs llama-cpp-python for GGUF checks)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test]"
if [ "${1:-}" = "--llamacpp" ]; then
  bash scripts/install_llamacpp.sh
fi
python -c "import torch, transformers, bitsandbytes, peft; print(f'qdora env: torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, peft {peft.__version__}')" 2>&1 | grep -v kernels
