"""lazymount's benchmark suite: synthetic build caches and side-by-side ratio measurements.

``python -m bench`` (or ``bash bench/run.sh``, which sets up first) generates the caches,
serves them over loopback HTTP, and prints every metric as a ratio against a native or
eager baseline measured in the same run. See README.md, section "Performance".
"""
