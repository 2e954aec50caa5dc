"""The warm-tree workloads of metrics 3, 4 and 5, over any directory holding the big package's
tree (the store's copy, a lazymount prefix, the floor filesystem): each returns its seconds."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .harness import timed

SMALL_FILES = 10_000
BIG_FILE = "share/bigpkg/data/big.dat"


class TreeWorkloads:
    """``find -ls``, ``stat`` of every file, open+read of small files, a large file re-read."""

    def __init__(self, native: Path, paths: Path):
        """``native``: the tree on local disk (what the files are); ``paths``: a scratch
        file for the list of paths ``stat_all`` hands to xargs."""
        self.files = sorted(str(p.relative_to(native)) for p in native.rglob("*")
                            if p.is_file() and not p.is_symlink())
        small = [f for f in self.files if f.endswith((".h", ".py"))]
        self.small = small[::max(1, len(small) // SMALL_FILES)][:SMALL_FILES]
        self.big_file = BIG_FILE
        self.paths = paths
        self.buffer = bytearray(1 << 20)

    def stat_all(self, base: Path) -> float:
        self.paths.write_bytes(b"\0".join(os.fsencode(base / f) for f in self.files))
        return timed(lambda: subprocess.run(
            f"xargs -0 -a {self.paths} stat --format=%s > /dev/null", shell=True, check=True))

    def find_ls(self, base: Path) -> float:
        return timed(lambda: subprocess.run(f"find {base} -ls > /dev/null", shell=True,
                                            check=True))

    def read_small(self, base: Path) -> float:
        def run() -> None:
            for name in self.small:
                fd = os.open(base / name, os.O_RDONLY)
                while os.read(fd, 1 << 20):
                    pass
                os.close(fd)
        return timed(run)

    def read_big(self, base: Path) -> float:
        def run() -> None:
            with open(base / self.big_file, "rb", buffering=0) as handle:
                while handle.readinto(self.buffer):  # type: ignore[attr-defined]
                    pass
        return timed(run)
