#!/usr/bin/env bash
# Set up, then run the linters and the whole test suite (real FUSE mounts, real HTTP servers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy lazymount
# the lower layers are typed strictly (no Any leaking out, every function annotated)
.venv/bin/mypy --strict --follow-imports=silent lazymount/system lazymount/trust \
    lazymount/buildcache lazymount/install lazymount/store lazymount/catalog lazymount/spack
.venv/bin/pytest -q -p no:cacheprovider "$@"
