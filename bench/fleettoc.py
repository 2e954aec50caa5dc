"""The fleet bench for opened packages: ``python -m bench.fleettoc [--nodes 1,4,8]`` (root).

N daemons (own store and mount point each) behind one real squid with the site rules
(``range_offset_limit none``, ``collapsed_forwarding on``...) in front of one nginx origin;
all N run ``bin/tool`` of the CUDA-shaped package (``bench/tocbench.py``), which each node
opens through its table of contents and reads by HTTP ranges. Reported per N: what the
origin sent for the package's blob (requests, bytes) against what one node fetched, and the
time to the first run, p50 and p99. Then the same N without squid, for contrast. Results:
``bench/out/fleettoc.json`` and ``fleettoc.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import generate
from .fleet import _start, wait_mounted
from .harness import REPO, Nginx, machine, remove_tree, short_dir
from .tocbench import make_cuda

OUT = REPO / "bench" / "out"


def run_round(nginx: Nginx, url: str, info: dict[str, Any], work: Path, nodes: int,
              proxy: str | None) -> dict[str, Any]:
    tool = Path(info["projected"]) / "bin" / "tool"
    roots = [short_dir("lmt") for _ in range(nodes)]
    mark = nginx.mark()
    daemons = [_start(url, work / f"node{i}", roots[i], proxy) for i in range(nodes)]
    durations = [0.0] * nodes
    try:
        wait_mounted(roots, daemons, work)
        go = threading.Barrier(nodes)

        def first_run(i: int) -> None:
            go.wait()
            begun = time.perf_counter()
            subprocess.run([str(roots[i] / tool)], capture_output=True, timeout=900,
                           check=True)
            durations[i] = time.perf_counter() - begun

        threads = [threading.Thread(target=first_run, args=(i,)) for i in range(nodes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for root in roots:
            subprocess.run(["fusermount3", "-u", "-z", str(root)], check=False)
        for daemon in daemons:
            daemon.wait(60)
    opened = sum("opened through its table of contents" in Path(f"{work}/node{i}.log")
                 .read_text() for i in range(nodes))
    blob = info["tarball"]["checksum"]
    requests = [(uri, size) for uri, _, size in nginx.requests_since(mark) if blob in uri]
    durations.sort()
    return {"nodes": nodes, "proxy": proxy is not None, "opened": opened,
            "first_run_p50_s": round(statistics.median(durations), 2),
            "first_run_p99_s": round(durations[-1], 2),
            "origin_blob_requests": len(requests),
            "origin_blob_bytes": sum(size for _, size in requests),
            "blob_bytes": info["tarball"]["contentLength"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleettoc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,4,8")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the fleet bench needs root (FUSE mounts, squid)", file=sys.stderr)
        return 2
    sizes = [int(n) for n in args.nodes.split(",")]
    caches = OUT / "caches" / "full"
    info = make_cuda(caches, print)
    work = OUT / "fleettoc-work"
    remove_tree(work)
    squid_module = generate.load_test_module("squid")
    host = machine()
    rounds = []
    started = time.monotonic()
    with Nginx(caches, work / "nginx") as nginx:
        url = f"{nginx.url}/cuda/mirror"
        for nodes in sizes:
            squid = squid_module.start_squid(memory_mb=2048)
            try:
                rounds.append(run_round(nginx, url, info, work / f"squid-{nodes}", nodes,
                                        squid.url))
            finally:
                squid.stop()
            print(rounds[-1], flush=True)
        rounds.append(run_round(nginx, url, info, work / f"direct-{max(sizes)}", max(sizes),
                                None))
        print(rounds[-1], flush=True)
    remove_tree(work)
    document = {"machine": host, "seconds": round(time.monotonic() - started),
                "rounds": rounds}
    (OUT / "fleettoc.json").write_text(json.dumps(document, indent=1))
    lines = ["| nodes | via | opened | first run p50 | first run p99 | origin requests for "
             "the blob | origin bytes / blob bytes |", "|---|---|---|---|---|---|---|"]
    for r in rounds:
        lines.append(f"| {r['nodes']} | {'squid' if r['proxy'] else 'direct'} | "
                     f"{r['opened']} | {r['first_run_p50_s']:.2f} s | "
                     f"{r['first_run_p99_s']:.2f} s | {r['origin_blob_requests']} | "
                     f"{r['origin_blob_bytes'] / r['blob_bytes']:.3f} |")
    (OUT / "fleettoc.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
