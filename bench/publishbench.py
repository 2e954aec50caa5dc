"""(i) ``lazymount publish`` of the big package: row 14.

The tables of contents of the big package's mirror written from scratch (its tarball
downloaded from nginx, described, its windows and signed TOC written), against inflating the
same blob with GNU gzip and hashing it (the least any describing does). The site catalog part
runs too and is counted: it is what a site runs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from . import generate
from .harness import median, timed


def bench_publish(bench: Any, result: Callable[..., Any]) -> None:
    info = bench.caches.big
    checksum = info["tarball"]["checksum"]
    blob = bench.caches.root / "big" / "mirror" / "blobs" / "sha256" / checksum[:2] / checksum
    mirror = bench.url("big")  # over HTTP, as a site reads a cache it does not own
    runs, floors = [], []
    for rep in range(bench.reps):
        output = bench.work / f"publish-{rep}"
        shutil.rmtree(output, ignore_errors=True)
        runs.append(timed(lambda o=output: _publish(mirror, o, "1 written")))
        floors.append(timed(lambda: subprocess.run(
            f"gzip -dc {blob} | sha256sum > /dev/null", shell=True, check=True)))
        bench.log(f"  rep {rep + 1}: publish {runs[-1]:.2f} s, gzip -dc | sha256sum "
                  f"{floors[-1]:.2f} s")
    again = timed(lambda: _publish(mirror, bench.work / f"publish-{bench.reps - 1}",
                                   "1 up to date"))
    seconds, floor = median(runs), median(floors)
    size = blob.stat().st_size
    bench.add(result("14", f"`lazymount publish` of the big package ({size / 2**20:.0f} MiB "
                     f"blob): tables of contents from scratch (again: {again:.2f} s)",
                     f"{seconds:.2f} s", f"gzip -dc | sha256sum: {floor:.2f} s",
                     seconds / floor, "x gzip -dc | sha256sum",
                     details={"publish_s": runs, "floor_s": floors, "again_s": again}))


def _publish(mirror: str, output: Any, expect: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lazymount", "publish", mirror, f"--output={output}",
         f"--signing-key={generate.SECRET_KEY}", f"--trust-key={generate.PUBLIC_KEY}",
         "--min-size=1M"], capture_output=True, text=True, timeout=3600)
    if done.returncode or expect not in done.stdout:
        raise RuntimeError(f"lazymount publish failed:\n{done.stdout}{done.stderr}")
