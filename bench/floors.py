"""Part "floors": the least any CPython daemon must spend on the work behind a missed goal,
measured on this machine in the same run as the goal, so a miss can be read against it.

* 10a  start-up: a fresh interpreter importing only the libraries the daemon cannot do
  without (trio, pyfuse3, httpx, python-gnupg), against the remount goal;
* 10b  file creation: one Python thread creating the big package's files (the bytes already
  in memory: no tarball, no checks), against GNU tar extracting the whole blob, and against
  the materialization goal (tar's time / 1.5);
* 10c  the first look at a big index: reading the stored 100,000-spec index document and
  hashing it (what checking it costs) and parsing it with the json module, against the
  first-mount goal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from .harness import median, timed

IMPORTS = "import trio, pyfuse3, httpx, gnupg"


def floor_imports(bench: Any, result_type: Any, goal_s: float) -> None:
    runs = [timed(lambda: subprocess.run([sys.executable, "-c", IMPORTS], check=True))
            for _ in range(5)]
    seconds = median(runs)
    bench.add(result_type(
        "10a", f"floor: a fresh `python -c '{IMPORTS}'`", f"{seconds:.2f} s",
        f"remount goal {goal_s:g} s", seconds / goal_s, "x the remount goal",
        details={"seconds": runs}))


def _members(blob: Path) -> list[tuple[str, bytes | None, int]]:
    """(name, data or None for a directory, mode) of the blob's directories and files."""
    found: list[tuple[str, bytes | None, int]] = []
    with tarfile.open(blob, "r:gz") as archive:
        for member in archive:
            if member.isdir():
                found.append((member.name, None, member.mode))
            elif member.isfile():
                handle = archive.extractfile(member)
                assert handle is not None
                found.append((member.name, handle.read(), member.mode))
    return found


def _create(target: Path, members: list[tuple[str, bytes | None, int]]) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for name, data, mode in members:
        path = f"{target}/{name}"
        if data is None:
            os.makedirs(path, exist_ok=True)
            continue
        fd = os.open(path, flags, mode & 0o777)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.close(fd)


def floor_file_creation(bench: Any, result_type: Any, blob: Path, goal: float) -> None:
    members = _members(blob)
    work = Path(tempfile.mkdtemp(prefix="lazymount-floor.", dir="/dev/shm"))
    python, tar = [], []
    try:
        for rep in range(3):
            target = work / f"py-{rep}"
            target.mkdir()
            python.append(timed(lambda t=target: _create(t, members)))
            target = work / f"tar-{rep}"
            target.mkdir()
            tar.append(timed(lambda t=target: subprocess.run(
                ["tar", "xzf", str(blob), "-C", str(t)], check=True)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = sum(1 for _, data, _ in members if data is not None)
    creating, extracting = median(python), median(tar)
    bench.add(result_type(
        "10b", f"floor: one Python thread creating the big package's {files} files "
               "(bytes in memory), tmpfs",
        f"{creating:.2f} s", f"GNU tar xzf: {extracting:.2f} s; goal {extracting / goal:.2f} s",
        creating / (extracting / goal), "x the materialization goal's time",
        details={"python_s": python, "tar_s": tar}))


def floor_index(bench: Any, result_type: Any, document: Path, goal_s: float) -> None:
    def read_hash_parse() -> None:
        data = document.read_bytes()
        hashlib.sha256(data).hexdigest()
        json.loads(data)

    runs = [timed(read_hash_parse) for _ in range(3)]
    seconds = median(runs)
    size = document.stat().st_size
    bench.add(result_type(
        "10c", f"floor: read, hash and json.loads the {size / 2**20:.0f} MiB index document",
        f"{seconds:.2f} s", f"first-mount goal {goal_s:g} s", seconds / goal_s,
        "x the first-mount goal", details={"seconds": runs, "bytes": size}))
