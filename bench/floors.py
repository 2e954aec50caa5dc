"""Part "floors": the least any CPython daemon must spend on the work behind a missed goal,
measured on this machine in the same run as the goal, so a miss can be read against it.

* 10a  start-up: a fresh interpreter importing only the libraries the daemon cannot do
  without (trio, pyfuse3, httpx, python-gnupg), against the remount goal;
* 10b  reading the tar stream: lazymount's reader walking every header of the big package
  (the decompressed stream in memory; no checks, hashing or writing: GNU tar writes the
  files, in its own process), the part of materialization that stays on one Python thread,
  against the materialization goal (GNU tar's time / 1.5);
* 10c  the first look at a big index: reading the stored 100,000-spec index document and
  hashing it (what checking it costs) and parsing it with the json module, against the
  first-mount goal;
* 10d  the same with msgspec decoding only the fields lazymount reads (its typed schemas,
  in one call: no Python code runs per record), the least a parse can cost here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from lazymount.buildcache.indexdecode import Entry

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


def _read_headers(stream: bytes) -> int:
    """Walk every member of an uncompressed tar stream with lazymount's own reader, skipping
    the data; returns the member count."""
    from lazymount.install.decompress import CHUNK
    from lazymount.install.tarstream import Limits, Source, members

    source = Source(iter([stream[i:i + CHUNK] for i in range(0, len(stream), CHUNK)]))
    count = 0
    for member in members(source, Limits()):
        left = member.size
        while left:
            left -= len(source.read(min(left, CHUNK)))
        source.passed()
        count += 1
    return count


def floor_header_reading(bench: Any, result_type: Any, blob: Path, goal: float) -> None:
    from isal import igzip

    stream = igzip.decompress(blob.read_bytes())
    work = Path(tempfile.mkdtemp(prefix="lazymount-floor.", dir="/dev/shm"))
    python, tar = [], []
    try:
        for rep in range(3):
            python.append(timed(lambda: _read_headers(stream)))
            target = work / f"tar-{rep}"
            target.mkdir()
            tar.append(timed(lambda t=target: subprocess.run(
                ["tar", "xzf", str(blob), "-C", str(t)], check=True)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reading, extracting = median(python), median(tar)
    bench.add(result_type(
        "10b", f"floor: lazymount's tar reader walking the big package's {_read_headers(stream)} "
               "members (stream in memory; nothing checked, hashed or written)",
        f"{reading:.2f} s", f"GNU tar xzf to tmpfs: {extracting:.2f} s; goal "
        f"{extracting / goal:.2f} s", reading / (extracting / goal),
        "x the materialization goal's time", details={"python_s": python, "tar_s": tar}))


def floor_index(bench: Any, result_type: Any, document: Path, goal_s: float) -> None:
    def read_hash_parse() -> None:
        data = document.read_bytes()
        hashlib.sha256(data).hexdigest()
        json.loads(data)

    typed = msgspec.json.Decoder(dict[str, dict[str, dict[str, Entry] | str]])

    def read_hash_decode() -> None:
        data = document.read_bytes()
        hashlib.sha256(data).hexdigest()
        typed.decode(data)

    size = document.stat().st_size
    for metric, what, parse in (("10c", "json.loads", read_hash_parse),
                                ("10d", "msgspec-decode (typed, the fields used)",
                                 read_hash_decode)):
        runs = [timed(parse) for _ in range(3)]
        seconds = median(runs)
        bench.add(result_type(
            metric, f"floor: read, hash and {what} the {size / 2**20:.0f} MiB index document",
            f"{seconds:.2f} s", f"first-mount goal {goal_s:g} s", seconds / goal_s,
            "x the first-mount goal", details={"seconds": runs, "bytes": size}))
