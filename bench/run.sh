#!/usr/bin/env bash
# Set up (as scripts/setup.sh does), then run the benchmark suite; options go to it
# (--quick: smaller caches, one repetition). Results: bench/out/results.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the comparison with Spack (part "spack") needs the real Spack, as the test tier does
if [[ -z ${LAZYMOUNT_TEST_SPACK:-} && -f ../shared/spack/setup.sh ]]; then
    export LAZYMOUNT_TEST_SPACK=${TMPDIR:-/tmp}/lazymount-test-spack
    bash ../shared/spack/setup.sh "$LAZYMOUNT_TEST_SPACK" >/dev/null
fi
exec .venv/bin/python -m bench "$@"
