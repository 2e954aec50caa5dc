#!/usr/bin/env bash
# Set up (as scripts/setup.sh does), then run the benchmark suite; options go to it
# (--quick: smaller caches, one repetition). Results: bench/out/results.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m bench "$@"
