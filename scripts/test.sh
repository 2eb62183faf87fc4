#!/usr/bin/env bash
# Creates .venv if missing, installs the package with its test extra, checks lint, format and the import
# layering, and runs the test suite (CPU only) on two pytest-xdist workers, a test file per worker at a time (so a
# file's module fixtures are built once), with the slowest tests listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
exec .venv/bin/python -m pytest -n 2 --dist loadfile --durations=25 tests "$@"
