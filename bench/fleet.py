"""The fleet bench: ``python -m bench.fleet [--nodes 1,2,4,8,16]`` (root).

N lazymount daemons (each with its own store and mount point, standing in for N nodes) sit
behind one real squid (memory cache, the site rules of docs/SERVICE.md) in front of one nginx
origin that logs every request. All N are started at once, then all N start the same
application at once (the app of the bench's 200-package stack: 26 packages in its link/run
closure). Each round starts from a cold squid and empty stores. Reported per N:

* origin requests per blob (goal: 1, whatever N) and origin bytes per byte of the closure;
* time until every daemon is mounted, and time to the first run of the app on each node
  (from the common start), p50 and p99 (with 16 nodes, p99 is the slowest node);
* the same N without squid (every node to the origin), for contrast.

On this machine all nodes share 2 cores, so per-node work (extraction, relocation) is
serialized and the first-run times grow with N for that reason alone; what a real fleet
shares is the proxy and the origin, which the request counts measure.
Results: ``bench/out/fleet.json`` and ``bench/out/fleet.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from . import generate
from .harness import REPO, Nginx, machine, remove_tree, short_dir, wait_ready

OUT = REPO / "bench" / "out"
MOUNT_WAIT = 300.0


def stack_cache(out: Path) -> dict[str, Any]:
    """The bench's 200-package stack (generated once, reused while its recipe holds)."""
    sizes = generate.Sizes.full()

    def make(writer: Any) -> dict[str, Any]:
        plan = generate.plan_stack(sizes.stack)
        built = generate.stack_packages(writer, plan)
        app = generate.pick_app(plan)
        return {"packages": [generate._entry_info(writer, p) for p in built], "app": app,
                "closure": sorted(generate.runtime_closure(plan, app))}

    recipe = {"recipe": generate.RECIPE, "build_root": generate.BUILD_ROOT,
              "stack": sizes.stack}
    return generate._build(out / "stack", recipe, make)


@dataclass
class Round:
    nodes: int
    proxy: bool
    mount_all_s: float  # from starting N daemons to all N mounted
    first_run_p50_s: float
    first_run_p99_s: float
    origin_blob_requests: int
    blobs: int  # distinct blobs the nodes needed
    requests_per_blob: float  # mean over those blobs
    max_requests_per_blob: int
    origin_blob_bytes: int
    closure_bytes: int  # the distinct blobs' bytes (what one node fetches)
    origin_manifest_requests: int  # spec manifests of the closure fetched from the origin
    origin_index_requests: int  # index manifest revalidations reaching the origin


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


def _start(url: str, store: Path, root: Path, proxy: str | None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "lazymount", f"--mirror={url}",
               f"--trust-key={generate.PUBLIC_KEY}", f"--store={store}",
               f"--keyring={store}.no-keys", "--foreground", str(root)]
    if proxy:
        command.insert(-1, f"--proxy={proxy}")
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{store}.log", "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=log, env=_no_proxy_env())


def wait_mounted(roots: list[Path], daemons: list[subprocess.Popen[bytes]], work: Path
                 ) -> None:
    """Return once every node's root is a mount; RuntimeError if a daemon ends or
    MOUNT_WAIT passes first."""
    deadline = time.monotonic() + MOUNT_WAIT
    while not all(os.path.ismount(root) for root in roots):
        if time.monotonic() > deadline or any(d.poll() is not None for d in daemons):
            raise RuntimeError(f"not every daemon mounted; see {work}/node*.log")
        time.sleep(0.01)


def _no_proxy_env() -> dict[str, str]:
    """The environment without proxies: the direct rounds must not use one by accident."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def run_round(nginx: Nginx, url: str, info: dict[str, Any], work: Path, nodes: int,
              proxy: str | None, log: Any) -> Round:
    packages = info["packages"]
    app = packages[info["app"]]
    binary = Path(app["projected"]) / "bin" / app["name"]
    closure = [packages[i] for i in info["closure"]]
    needed = {p["tarball"]["checksum"]: p["tarball"]["contentLength"] for p in closure}
    needed |= {p["spec_blob"]["checksum"]: p["spec_blob"]["contentLength"] for p in closure}
    roots = [short_dir("lmf") for _ in range(nodes)]
    mark = nginx.mark()
    started = time.perf_counter()
    daemons = [_start(url, work / f"node{i}", roots[i], proxy) for i in range(nodes)]
    try:
        wait_mounted(roots, daemons, work)
        mount_all = time.perf_counter() - started
        durations: list[float] = [0.0] * nodes
        failures: list[str] = []
        go = threading.Barrier(nodes)

        def first_run(i: int) -> None:
            go.wait()
            begun = time.perf_counter()
            result = subprocess.run([str(roots[i] / binary)], capture_output=True, text=True,
                                    timeout=900)
            durations[i] = time.perf_counter() - begun
            if result.returncode != 0 or f"Hello from {app['name']}" not in result.stdout:
                failures.append(f"node {i}: {result.stdout}{result.stderr}")

        threads = [threading.Thread(target=first_run, args=(i,)) for i in range(nodes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise RuntimeError("the app failed:\n" + "\n".join(failures))
        # the closure's run dependencies may still be arriving: count them too
        wait_ready([root / p["projected"] for root in roots for p in closure])
    finally:
        for root in roots:
            subprocess.run(["fusermount3", "-u", "-z", str(root)], check=False)
        for daemon in daemons:
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
    requests = nginx.requests_since(mark)
    blob_requests = Counter(uri.rsplit("/", 1)[1] for uri, _, _ in requests
                            if "/blobs/sha256/" in uri and uri.rsplit("/", 1)[1] in needed)
    origin_bytes = sum(size for uri, _, size in requests
                       if "/blobs/sha256/" in uri and uri.rsplit("/", 1)[1] in needed)
    result = Round(
        nodes=nodes, proxy=proxy is not None, mount_all_s=round(mount_all, 2),
        first_run_p50_s=round(statistics.median(durations), 2),
        first_run_p99_s=round(_percentile(durations, 0.99), 2),
        origin_blob_requests=sum(blob_requests.values()), blobs=len(needed),
        requests_per_blob=round(sum(blob_requests.values()) / len(needed), 2),
        max_requests_per_blob=max(blob_requests.values(), default=0),
        origin_blob_bytes=origin_bytes, closure_bytes=sum(needed.values()),
        origin_manifest_requests=sum(1 for uri, _, _ in requests
                                     if uri.endswith(".spec.manifest.json")),
        origin_index_requests=sum(1 for uri, _, _ in requests
                                  if uri.endswith("index.manifest.json")))
    log(f"  N={nodes:>2} {'squid ' if proxy else 'direct'}: mounted in {mount_all:.2f} s; "
        f"first run p50 {result.first_run_p50_s:.2f} s, p99 {result.first_run_p99_s:.2f} s; "
        f"origin: {result.requests_per_blob:.2f} requests/blob (max "
        f"{result.max_requests_per_blob}), {origin_bytes / 2**20:.1f} MiB for a "
        f"{result.closure_bytes / 2**20:.1f} MiB closure")
    return result


def squid_ceiling(squid_module: ModuleType, urls: list[str], size: int, work: Path,
                  seconds_goal: float = 5.0) -> dict[str, float]:
    """What one squid serves from memory on this machine: curl fetching ``urls`` (``size``
    bytes in all) through a warm squid, 16 transfers at a time (curl and squid share the 2
    cores, so this is a floor). Returns requests/s and MiB/s."""
    squid = squid_module.start_squid(memory_mb=1024)
    try:
        work.mkdir(parents=True, exist_ok=True)
        listing = work / "curl.conf"

        def fetch(rounds: int) -> float:
            listing.write_text("".join(f'url = "{u}"\noutput = "/dev/null"\n'
                                       for _ in range(rounds) for u in urls))
            begun = time.perf_counter()
            subprocess.run(["curl", "-sS", "--no-progress-meter", "--fail", "--parallel",
                            "--parallel-max", "16", "-x", squid.url, "-K", str(listing)],
                           check=True, stderr=subprocess.DEVNULL)
            return time.perf_counter() - begun

        fetch(1)  # warm: every blob into squid's memory
        rounds = max(1, int(seconds_goal / max(fetch(5) / 5, 1e-3)))
        elapsed = fetch(rounds)
    finally:
        squid.stop()
    return {"requests_per_s": round(rounds * len(urls) / elapsed),
            "mib_per_s": round(rounds * size / 2**20 / elapsed),
            "mean_object_kib": round(size / len(urls) / 1024, 1)}


def markdown(document: dict[str, Any]) -> str:
    host = document["machine"]
    lines = [
        f"Machine: {host['nproc']} x {host['cpu']}, {host['memory']} RAM, kernel "
        f"{host['kernel']}; load average at start {host['load']}. {document['seconds']} s. "
        f"App: {document['closure_packages']} packages in its link/run closure, "
        f"{document['closure_mib']:.1f} MiB of blobs.",
        "",
        "| nodes | via | all mounted | first run p50 | first run p99 | origin requests per "
        "blob (max) | origin bytes / closure bytes | spec manifests from origin | index "
        "manifest requests at origin |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in document["rounds"]:
        lines.append(
            f"| {r['nodes']} | {'squid' if r['proxy'] else 'direct'} | {r['mount_all_s']:.2f} s"
            f" | {r['first_run_p50_s']:.2f} s | {r['first_run_p99_s']:.2f} s | "
            f"{r['requests_per_blob']:.2f} ({r['max_requests_per_blob']}) | "
            f"{r['origin_blob_bytes'] / r['closure_bytes']:.2f} | "
            f"{r['origin_manifest_requests']} | {r['origin_index_requests']} |")
    ceiling = document.get("squid_ceiling")
    if ceiling:
        small, large = ceiling["small"], ceiling["large"]
        lines += ["", f"One squid (one worker, memory hits, curl as the client on the same 2 "
                      f"cores, 16 transfers at a time): {small['requests_per_s']} requests/s "
                      f"and {small['mib_per_s']} MiB/s for the app's blobs "
                      f"({small['mean_object_kib']} KiB on average); {large['mib_per_s']} MiB/s "
                      "for 64 MiB objects."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,2,4,8,16",
                        help="comma-separated fleet sizes (default: 1,2,4,8,16)")
    parser.add_argument("--no-direct", action="store_true",
                        help="skip the contrast round without squid")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the fleet bench needs root (FUSE mounts, squid)", file=sys.stderr)
        return 2
    sizes = [int(n) for n in args.nodes.split(",")]
    started = time.monotonic()
    caches = OUT / "caches" / "fleet"
    info = stack_cache(caches)
    closure = [info["packages"][i] for i in info["closure"]]
    work = OUT / "fleet-work"
    remove_tree(work)
    squid_module = generate.load_test_module("squid")
    host = machine()
    print(f"machine: {host['nproc']} x {host['cpu']}, load {host['load']}")
    rounds = []
    with Nginx(caches, work / "nginx") as nginx:
        url = f"{nginx.url}/stack/mirror"
        for nodes in sizes:
            squid = squid_module.start_squid()
            try:
                rounds.append(run_round(nginx, url, info, work / f"squid-{nodes}", nodes,
                                        squid.url, print))
            finally:
                squid.stop()
        if not args.no_direct:
            rounds.append(run_round(nginx, url, info, work / f"direct-{max(sizes)}",
                                    max(sizes), None, print))
        blobs = [p[kind] for p in closure for kind in ("tarball", "spec_blob")]
        small = squid_ceiling(squid_module, [
            f"{url}/blobs/sha256/{b['checksum'][:2]}/{b['checksum']}" for b in blobs],
            sum(b["contentLength"] for b in blobs), work / "ceiling")
        large_blob = caches / "ceiling-64MiB.bin"
        if not large_blob.exists() or large_blob.stat().st_size != 64 << 20:
            large_blob.write_bytes(os.urandom(64 << 20))
        large = squid_ceiling(squid_module, [f"{nginx.url}/{large_blob.name}"] * 4, 4 * 64 << 20,
                              work / "ceiling-large")
        ceiling = {"small": small, "large": large}
        print(f"  one squid: {small['requests_per_s']} requests/s, {small['mib_per_s']} MiB/s "
              f"(objects of {small['mean_object_kib']} KiB); {large['mib_per_s']} MiB/s "
              f"(64 MiB objects)")
    remove_tree(work)
    document = {"machine": host, "seconds": round(time.monotonic() - started),
                "closure_packages": len(closure),
                "closure_mib": sum(p["tarball"]["contentLength"] + p["spec_blob"]["contentLength"]
                                   for p in closure) / 2**20,
                "rounds": [asdict(r) for r in rounds], "squid_ceiling": ceiling}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fleet.json").write_text(json.dumps(document, indent=1))
    table = markdown(document)
    (OUT / "fleet.md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
