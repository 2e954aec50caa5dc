"""lazymount's benchmark suite: synthetic build caches and side-by-side ratio measurements.

``python -m bench`` (or ``bash bench/run.sh``, which sets up first) generates the caches,
serves them over loopback HTTP, and prints every metric as a ratio against a native or
eager baseline measured in the same run. See docs/PERFORMANCE.md.
"""

import os

# Started as root, a daemon runs as the lazymount account; the benchmark's stores sit in
# folders of root's alone (mkdtemp), so its daemons keep root, as the figures were measured.
os.environ.setdefault("LAZYMOUNT_DEFAULT_USER", "root")
