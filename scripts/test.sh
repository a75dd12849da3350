#!/usr/bin/env bash
# The whole test suite: static checks, then every test against the local platform (started here if it
# is not running, and stopped again at the end in that case).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== ruff, mypy, import contracts"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports

echo "== pytest"
exec .venv/bin/pytest -ra "$@"
