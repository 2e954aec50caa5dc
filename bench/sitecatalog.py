"""Metrics 6g and 6h: the 100,000-spec index through a site catalog (``lazymount publish``).

A copy of the index mirror (its blobs hard-linked) is published with the fixture key, then:

* 6g: a node with an empty store mounts it: the catalog's envelope and payload are fetched
  instead of the 118 MB JSON document (goal: 0.3 s until the mount is there);
* 6h: the mirror's index changes (1% of its specs replaced by as many new ones), the site
  publishes again, and the mounted node refreshes: the bytes it fetches, against the bytes
  of the JSON index it would otherwise fetch (goal: 15%).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import generate
from .harness import median

GOAL_MOUNT_S = 0.3
GOAL_BYTES = 0.15
INDEX_MANIFEST = Path("v3/manifests/index/index.manifest.json")


def _index_blob(mirror: Path) -> Path:
    checksum = json.loads((mirror / INDEX_MANIFEST).read_text())["data"][0]["checksum"]
    return mirror / "blobs" / "sha256" / checksum[:2] / checksum


def _copy_mirror(source: Path, target: Path) -> None:
    """``source`` at ``target``, its files hard-linked (the index blob is 118 MB)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, copy_function=os.link,
                    ignore=shutil.ignore_patterns("lazymount"))


def _change_index(mirror: Path, share: float = 0.01) -> int:
    """Replace ``share`` of the mirror's index records by as many new ones (new hashes:
    builds that came), as ``spack buildcache update-index`` would publish them."""
    blob = _index_blob(mirror)
    index = json.loads(blob.read_bytes())
    installs = index["database"]["installs"]
    rng = random.Random(7)
    gone = rng.sample(sorted(installs), int(len(installs) * share))
    for number, dag_hash in enumerate(gone):
        record = installs.pop(dag_hash)
        new_hash = generate.sc.b32_hash(f"changed-{number}-{dag_hash}")
        record["spec"]["hash"] = new_hash
        installs[new_hash] = record
    data = json.dumps(index, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    target = mirror / "blobs" / "sha256" / digest[:2] / digest
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    manifest = json.loads((mirror / INDEX_MANIFEST).read_text())
    manifest["data"][0].update(checksum=digest, contentLength=len(data))
    (mirror / INDEX_MANIFEST).unlink()  # a hard link into the generated cache
    (mirror / INDEX_MANIFEST).write_text(json.dumps(manifest))
    return len(gone)


def _publish(mirror: Path) -> str:
    """What ``lazymount publish`` says of the catalog (its tables of contents fail: this
    mirror holds an index and no packages)."""
    result = subprocess.run(
        [sys.executable, "-m", "lazymount", "publish", str(mirror),
         f"--signing-key={generate.SECRET_KEY}", f"--trust-key={generate.PUBLIC_KEY}"],
        capture_output=True, text=True)
    line = next((line for line in result.stdout.splitlines() if line.startswith("catalog:")),
                None)
    if line is None or "catalog:" in result.stderr:
        raise RuntimeError(f"lazymount publish wrote no catalog:\n{result.stderr[-2000:]}")
    return line


def bench_site_catalog(bench: Any, result: Callable[..., Any]) -> None:
    specs = bench.caches.index["specs"]
    mirror = bench.caches.root / "sitecatalog" / "mirror"
    _copy_mirror(bench.caches.root / "index" / "mirror", mirror)
    bench.log(f"  {_publish(mirror)}")
    mounts, ready = [], []
    for repetition in range(max(3, bench.reps)):
        store = bench.work / f"store-site-{repetition}"
        with bench.mount("sitecatalog", store) as mount:
            mounts.append(mount.seconds)
            ready += mount.logged_seconds(r"catalog of \d+ specs ready in ([\d.]+) s")
            log = mount.log_text()
        if "from the site catalog" not in log:
            raise RuntimeError(f"the site catalog was not used:\n{log}")
    first_json = next((r.details.get("mount_s") for r in bench.results if r.metric == "6a"),
                      None)
    seconds = median(mounts)
    bench.add(result(
        "6g", f"first mount from the site catalog, index of {specs} specs", f"{seconds:.2f} s",
        f"catalog ready after {median(ready):.2f} s" + (
            f"; from the JSON index {first_json:.2f} s (6a)" if first_json else ""),
        seconds / GOAL_MOUNT_S, "x the goal", f"≤ {GOAL_MOUNT_S:g} s", seconds <= GOAL_MOUNT_S,
        {"mount_s": mounts, "catalog_s": ready}))

    store = bench.work / "store-site-refresh"
    with bench.mount("sitecatalog", store, "--index-refresh=off") as mount:
        changed = _change_index(mirror)
        bench.log(f"  {_publish(mirror)}")
        mark = bench.server.mark()
        subprocess.run([sys.executable, "-m", "lazymount", "refresh", str(mount.root)],
                       check=True, capture_output=True)
        asked = bench.server.requests_since(mark)
        log = mount.log_text()
    if log.count("from the site catalog") < 2:
        raise RuntimeError(f"the refresh did not use the site catalog:\n{log}")
    fetched = sum(size for _, _, size in asked)
    document = _index_blob(mirror).stat().st_size
    bench.add(result(
        "6h", f"bytes a node fetches for a changed index ({changed} of {specs} specs "
              "replaced), with the site catalog", f"{fetched / 2**20:.1f} MiB "
              f"({len(asked)} requests)", f"the JSON index: {document / 2**20:.1f} MiB",
        fetched / document, "of the JSON index", f"≤ {GOAL_BYTES:.0%}",
        fetched <= GOAL_BYTES * document, {"requests": asked, "json_bytes": document}))
