#!/usr/bin/env bash
# Set up, then run the demo: the embedded cache served on loopback, mounted, a binary run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lazymount demo
