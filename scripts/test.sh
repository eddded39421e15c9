#!/usr/bin/env bash
# Set up from scratch and run the whole test suite plus the linter. Fails if pytest collects no tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --llamacpp
. .venv/bin/activate
ruff check .
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
