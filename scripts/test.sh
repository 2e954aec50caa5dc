#!/usr/bin/env bash
# Set up, then run the linters and the whole test suite (real FUSE mounts, real HTTP servers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy lazymount
.venv/bin/pytest -q -p no:cacheprovider "$@"
