"""The benchmark suite: ``python -m bench [--quick]`` (``bash bench/run.sh`` sets up first).

Every figure is a ratio of two timings taken side by side in this run: lazymount against
GNU tar, curl, or the same tree on local disk. Repeated measurements are interleaved (lazy,
baseline, lazy, baseline, ...) and the median is reported, so a busy machine skews both
sides alike. Results go to ``bench/out/results.json`` and ``bench/out/results.md``.

Needs root (FUSE, dropping the page cache for cold figures), nginx, curl, GNU tar, gcc.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import generate, report
from .floors import floor_header_reading, floor_imports, floor_index
from .fusefloor import FloorMount, compare
from .harness import (
    REPO,
    Mount,
    Nginx,
    drop_caches,
    machine,
    median,
    remove_tree,
    short_dir,
    timed,
    wait_ready,
)
from .publishbench import bench_publish
from .sitecatalog import bench_site_catalog
from .spackcompare import bench_spack
from .startup import bench_startup
from .tocbench import bench_toc
from .workloads import TreeWorkloads

OUT = REPO / "bench" / "out"

# The goals, each a ratio measured side by side in one run
GOAL_FIRST_ACCESS = 0.5  # cold first access: at most this times the eager curl|tar+relocate
GOAL_MATERIALIZE = 1.5  # materialization: at least this times GNU tar's throughput
GOAL_FIND = 1.5  # warm find -ls / stat through FUSE: at most this times native
GOAL_SMALL = 2.0  # small files, second pass: at most this times native
GOAL_REREAD = 0.9  # large re-read: at least this times native speed
GOAL_MOUNT_S, GOAL_REMOUNT_S, GOAL_RSS_MIB = 1.0, 0.2, 100  # the 100,000-spec index
FLOOR_IMPORTS = "import trio, pyfuse3"  # what any mount imports, beside the remount (6b)
GOAL_LS_S = 3.0  # `ls -l` of its folder of 100,000 prefixes
STRIP = len(generate.BUILD_ROOT.strip("/").split("/"))  # tar members start with the build root


@dataclass
class Result:
    """One row of the table."""

    metric: str  # "1a", "2", ...
    what: str
    lazy: str  # lazymount's figure, formatted
    baseline: str  # what it is compared with, formatted
    ratio: float | None
    reading: str  # how to read the ratio ("x the speed of", ...)
    goal: str = "-"
    met: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bench:
    caches: generate.Caches
    server: Nginx
    work: Path
    reps: int
    log: Callable[[str], None]
    results: list[Result] = field(default_factory=list)
    roots: dict[str, Path] = field(default_factory=dict)  # one install root per cache
    leftovers: list[Path] = field(default_factory=list)  # trees deleted after the last figure

    def later(self, path: Path) -> Path:
        """``path``, deleted only when every figure is taken: on this kind of disk, deleting a
        tree of 30,000 files made file creation 3x slower for the next minute."""
        self.leftovers.append(path)
        return path

    def url(self, cache: str) -> str:
        return f"{self.server.url}/{cache}/mirror"

    def root(self, cache: str) -> Path:
        """The same mount path for every mount of a cache: relocated trees depend on it."""
        if cache not in self.roots:
            self.roots[cache] = short_dir("lmb")
        path = self.roots[cache]
        path.mkdir(exist_ok=True)
        return path

    def mount(self, cache: str, store: Path, *extra: str) -> Mount:
        return Mount(self.url(cache), store, generate.PUBLIC_KEY, root=self.root(cache),
                     extra=extra)

    def add(self, result: Result) -> None:
        self.results.append(result)
        self.log(f"  {result.metric:>3} {result.what}: {result.lazy} vs {result.baseline}"
                 f" -> {report.ratio_text(result)}")


def _mib(size: float) -> str:
    return f"{size / 2**20:.0f} MiB"


def _rate(size: float, seconds: float) -> str:
    return f"{size / 2**20 / seconds:.0f} MiB/s"


def _blob_url(bench: Bench, cache: str, record: dict[str, Any]) -> str:
    checksum = record["checksum"]
    return f"{bench.url(cache)}/blobs/sha256/{checksum[:2]}/{checksum}"


def _store_tree(store: Path, dag_hash: str) -> Path:
    (tree,) = store.glob(f"pkgs/{dag_hash}.*/tree")
    return tree


def _run(path: Path, expect: str) -> None:
    result = subprocess.run([str(path)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or expect not in result.stdout:
        raise RuntimeError(f"{path} did not run as expected:\n{result.stdout}{result.stderr}")


# ---------------------------------------------------------------------------------------------
# Eager baseline: curl | tar xz, then Spack-style relocation (lazymount's own code), then run


def eager_install(bench: Bench, cache: str, entries: list[dict[str, Any]], root: Path,
                  projected: dict[str, str]) -> dict[str, float]:
    """Install ``entries`` under ``root`` the eager way, one after the other, as a script
    around ``curl | tar xz`` would. Returns seconds for download+extract and relocation."""
    from lazymount.install import relocate
    from lazymount.install.buildinfo import parse_buildinfo
    from lazymount.install.sbang import add_sbang

    fetch = timed(lambda: [subprocess.run(
        f"curl -sSf {_blob_url(bench, cache, e['tarball'])} | "
        f"tar xzf - -C {root} --strip-components={STRIP}", shell=True, check=True)
        for e in entries])

    def relocate_all() -> None:
        for entry in entries:
            prefix = root / entry["projected"]
            info = parse_buildinfo(
                (prefix / ".spack" / "binary_distribution").read_bytes(), entry["name"])
            mapping = relocate.prefix_map(
                info, str(root), lambda h: f"{root}/{projected[h]}" if h in projected else None,
                f"{root}/bin/sbang")
            relocate.relocate_prefix(prefix, info, mapping, entry["name"])
            add_sbang(prefix, f"{root}/bin/sbang", entry["name"])

    return {"fetch_extract_s": fetch, "relocate_s": timed(relocate_all)}


# ---------------------------------------------------------------------------------------------
# (a) the big package: metrics 1a, 2, 3, 4, 5


def bench_big(bench: Bench) -> Path:
    """Cold first access and materialization (1a, 2); returns a store holding the package."""
    info = bench.caches.big
    app = Path(info["projected"]) / "bin" / "app"
    blob = (bench.caches.root / "big" / "mirror" / "blobs" / "sha256" /
            info["tarball"]["checksum"][:2] / info["tarball"]["checksum"])
    label = re.escape(f"{info['name']}-{info['version']}-{info['hash'][:7]}")
    lazy_runs, materialize, eager_runs, tar_runs = [], [], [], []
    # an untimed round first: the disk may still be busy with what ran before
    with bench.mount("big", bench.later(bench.work / "store-big-warmup")) as mount:
        _run(mount.root / app, str(mount.root))
    warm = bench.later(bench.work / "tar-warmup")
    warm.mkdir(parents=True)
    subprocess.run(["tar", "xzf", str(blob), "-C", str(warm)], check=True)
    for rep in range(bench.reps):
        store = bench.later(bench.work / f"store-big-{rep}")
        with bench.mount("big", store) as mount:
            lazy_runs.append(timed(lambda m=mount: _run(m.root / app, str(m.root))))
            materialize += mount.logged_seconds(rf"{label}: materialized in ([\d.]+) s")
        eager_root = bench.later(short_dir("lme"))
        parts = eager_install(bench, "big", [info], eager_root,
                              {info["hash"]: info["projected"]})
        parts["run_s"] = timed(lambda r=eager_root: _run(r / app, str(r)))
        eager_runs.append(sum(parts.values()))
        tar_dir = bench.later(bench.work / f"tar-{rep}")
        tar_dir.mkdir(parents=True)
        tar_runs.append(timed(lambda d=tar_dir: subprocess.run(
            ["tar", "xzf", str(blob), "-C", str(d)], check=True)))
        bench.log(f"  rep {rep + 1}: lazy run {lazy_runs[-1]:.2f} s (materialized in "
                  f"{materialize[-1] if materialize else float('nan'):.2f} s), eager "
                  f"{eager_runs[-1]:.2f} s, tar xzf {tar_runs[-1]:.2f} s")
    lazy, eager = median(lazy_runs), median(eager_runs)
    size = info["bytes"]
    bench.add(Result("1a", f"cold first access, {_mib(size)} package: `bin/app` runs",
                     f"{lazy:.2f} s", f"curl | tar xz + relocate + run: {eager:.2f} s",
                     lazy / eager, "x the eager time", f"≤ {GOAL_FIRST_ACCESS}x",
                     lazy / eager <= GOAL_FIRST_ACCESS,
                     details={"lazy_s": lazy_runs, "eager_s": eager_runs}))
    seconds = median(materialize)
    tar = median(tar_runs)
    bench.add(Result("2", f"materialization throughput, {_mib(size)} package",
                     f"{_rate(size, seconds)} ({seconds:.2f} s)",
                     f"GNU tar xzf: {_rate(size, tar)} ({tar:.2f} s)", tar / seconds,
                     "x GNU tar", f"≥ {GOAL_MATERIALIZE}x", tar / seconds >= GOAL_MATERIALIZE,
                     {"materialize_s": materialize, "tar_s": tar_runs, "bytes": size}))
    return store


def bench_materialize_in_memory(bench: Bench) -> None:
    """Metric 2 again with the store and tar's target on tmpfs: what the pipeline itself costs,
    without the file-creation latency of the disk (which varied 10x during our runs)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize < 2 << 30:
        bench.log("  (no tmpfs with 2 GiB free at /dev/shm: in-memory materialization skipped)")
        return
    info = bench.caches.big
    blob = (bench.caches.root / "big" / "mirror" / "blobs" / "sha256" /
            info["tarball"]["checksum"][:2] / info["tarball"]["checksum"])
    label = re.escape(f"{info['name']}-{info['version']}-{info['hash'][:7]}")
    lazy, tar, lazy_cpu, tar_cpu = [], [], [], []
    work = Path(tempfile.mkdtemp(prefix="lazymount-bench.", dir=shm))
    try:
        for rep in range(bench.reps):
            store = work / f"store-{rep}"
            with Mount(bench.url("big"), store, generate.PUBLIC_KEY, root=bench.root("big")) \
                    as mount:
                before = mount.cpu_seconds()
                os.listdir(mount.root / info["projected"])  # materializes it
                lazy_cpu.append(mount.cpu_seconds() - before)
                lazy += mount.logged_seconds(rf"{label}: materialized in ([\d.]+) s")
            shutil.rmtree(store)
            target = work / f"tar-{rep}"
            target.mkdir()
            before = _children_cpu()
            tar.append(timed(lambda d=target: subprocess.run(
                ["tar", "xzf", str(blob), "-C", str(d)], check=True)))
            tar_cpu.append(_children_cpu() - before)
            shutil.rmtree(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size, seconds, baseline = info["bytes"], median(lazy), median(tar)
    bench.add(Result("2m", f"materialization throughput, {_mib(size)} package, store on tmpfs",
                     f"{_rate(size, seconds)} ({seconds:.2f} s)",
                     f"GNU tar xzf to tmpfs: {_rate(size, baseline)} ({baseline:.2f} s)",
                     baseline / seconds, "x GNU tar", f"≥ {GOAL_MATERIALIZE}x",
                     baseline / seconds >= GOAL_MATERIALIZE,
                     {"materialize_s": lazy, "tar_s": tar}))
    # the least wall time that CPU work allows on this machine's cores, against the goal's
    cores = os.cpu_count() or 1
    cpu, goal = median(lazy_cpu), baseline / GOAL_MATERIALIZE
    bench.add(Result("2mc", "CPU time of the materialization of 2m (daemon and its tar)",
                     f"{cpu:.2f} CPU-s: at best {cpu / cores:.2f} s on {cores} cores",
                     f"GNU tar xzf: {median(tar_cpu):.2f} CPU-s; goal {goal:.2f} s",
                     cpu / cores / goal, "x the goal's time, at best",
                     details={"lazy_cpu_s": lazy_cpu, "tar_cpu_s": tar_cpu}))


def _children_cpu() -> float:
    """CPU time of this process's reaped children (a tar and its gzip) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _interleaved(bench: Bench, lazy: Callable[[], float], native: Callable[[], float],
                 reps: int) -> tuple[float, float, list[float], list[float]]:
    lazies, natives = [], []
    for _ in range(reps):
        lazies.append(lazy())
        natives.append(native())
    return median(lazies), median(natives), lazies, natives


def bench_warm_tree(bench: Bench, store: Path, bind: bool) -> None:
    """Metrics 3 (find -ls, stat), 4 (small files) and 5 (large file) over the big package,
    through a fresh mount of a store that holds it, against the store's tree itself; served
    through FUSE, or (``bind``) from a bind mount once ready (``--bind-ready``)."""
    info = bench.caches.big
    mode = "--bind-ready" if bind else "FUSE"
    suffix = "+" if bind else ""  # rows of the --bind-ready mount
    native = _store_tree(store, info["hash"])
    load = TreeWorkloads(native, bench.work / "paths")
    files, small, big_file = load.files, load.small, load.big_file
    stat_all, find_ls, read_small, read_big = (load.stat_all, load.find_ls, load.read_small,
                                               load.read_big)
    reps = max(3, bench.reps)

    cold = drop_caches()
    native_first = read_small(native)
    native_second = read_small(native)
    native_big_cold = read_big(native)
    drop_caches()
    with bench.mount("big", store, *(["--bind-ready"] if bind else [])) as mount:
        prefix = mount.root / info["projected"]
        lazy_first = read_small(prefix)  # the first access to the package is in here
        deadline = time.monotonic() + 30
        while bind and not os.path.ismount(prefix) and time.monotonic() < deadline:
            time.sleep(0.01)  # the bind is made in the background after the first access
        lazy_second = read_small(prefix)
        lazy_big_cold = read_big(prefix)
        for tool in (find_ls, stat_all):  # warm up both sides
            tool(prefix), tool(native)
        find = _interleaved(bench, lambda: find_ls(prefix), lambda: find_ls(native), reps)
        stats = _interleaved(bench, lambda: stat_all(prefix), lambda: stat_all(native), reps)
        second = _interleaved(bench, lambda: read_small(prefix), lambda: read_small(native),
                              reps)
        big = _interleaved(bench, lambda: read_big(prefix), lambda: read_big(native), reps)
        memory = mount.memory()
    entries = len(files)
    bench.add(Result(f"3a{suffix}", f"warm `find -ls` over the package ({entries} files), {mode}",
                     f"{find[0] * 1000:.0f} ms", f"local disk: {find[1] * 1000:.0f} ms",
                     find[0] / find[1], "x native time", f"≤ {GOAL_FIND}x",
                     find[0] / find[1] <= GOAL_FIND,
                     {"lazy_s": find[2], "native_s": find[3]}))
    bench.add(Result(f"3b{suffix}", f"warm `stat` of every file ({entries}), {mode}",
                     f"{stats[0] * 1000:.0f} ms", f"local disk: {stats[1] * 1000:.0f} ms",
                     stats[0] / stats[1], "x native time", f"≤ {GOAL_FIND}x",
                     stats[0] / stats[1] <= GOAL_FIND, {"lazy_s": stats[2], "native_s": stats[3]}))
    label = "cold" if cold else "first (page cache not dropped: not root?)"
    bench.add(Result(f"4a{suffix}", f"open+read {len(small)} small files, {label} pass, {mode}",
                     f"{lazy_first:.2f} s", f"local disk: {native_first:.2f} s",
                     lazy_first / native_first, "x native time",
                     details={"lazy_s": lazy_first, "native_s": native_first}))
    bench.add(Result(f"4b{suffix}", f"open+read {len(small)} small files, second pass, {mode}",
                     f"{second[0]:.2f} s", f"local disk: {second[1]:.2f} s",
                     second[0] / second[1], "x native time", f"≤ {GOAL_SMALL}x",
                     second[0] / second[1] <= GOAL_SMALL,
                     {"lazy_s": [lazy_second, *second[2]], "native_s": [native_second,
                                                                        *second[3]]}))
    size = (native / big_file).stat().st_size
    bench.add(Result(f"5{suffix}", f"re-read of a {_mib(size)} file (1 MiB reads), {mode}",
                     _rate(size, big[0]), f"local disk: {_rate(size, big[1])}",
                     big[1] / big[0], "x native speed", f"≥ {GOAL_REREAD}x",
                     big[1] / big[0] >= GOAL_REREAD,
                     {"lazy_s": big[2], "native_s": big[3], "cold_lazy_s": lazy_big_cold,
                      "cold_native_s": native_big_cold, **memory}))


# ---------------------------------------------------------------------------------------------
# (c) the 100,000-spec index: metric 6


def bench_index(bench: Bench) -> None:
    specs = bench.caches.index["specs"]
    store = bench.work / "store-index"
    remove_tree(store)
    with bench.mount("index", store) as mount:
        first = mount.seconds
        first_catalog = mount.logged_seconds(r"catalog of \d+ specs ready in ([\d.]+) s")
        # the upstream database is written after the mount is up: wait for it, so the
        # memory figures are those of a daemon that has done all its start-up work
        database = timed(lambda m=mount: (m.root / ".spack-db" / "index_verifier").read_text())
        first_memory = mount.memory()
        platform = next(p for p in mount.root.iterdir() if p.name.startswith("linux-"))
        # what a user's first `ls -l` of the folder of every prefix costs
        long_listing = timed(lambda: subprocess.run(["ls", "-l", str(platform)], check=True,
                                                    stdout=subprocess.DEVNULL))
        names_only = timed(lambda: subprocess.run(["ls", "-f", str(platform)], check=True,
                                                  stdout=subprocess.DEVNULL))
        listed = len(os.listdir(platform))
        listed_memory = mount.memory()
    remounts, catalogs, asked, floors = [], [], [], []
    for _ in range(max(3, bench.reps)):
        # the floor of any daemon on pyfuse3 and trio, beside each remount
        floors.append(timed(lambda: subprocess.run([sys.executable, "-c", FLOOR_IMPORTS],
                                                   check=True)))
        mark = bench.server.mark()
        with bench.mount("index", store) as mount:
            remounts.append(mount.seconds)
            catalogs += mount.logged_seconds(r"catalog of \d+ specs ready in ([\d.]+) s")
            (mount.root / ".spack-db" / "index_verifier").read_text()
            memory = mount.memory()
        asked.append(bench.server.requests_since(mark))
    remount = median(remounts)
    requests = asked[-1]
    bench.add(Result("6a", f"first mount, index of {specs} specs", f"{first:.2f} s",
                     f"catalog ready after {first_catalog[0]:.2f} s; Spack database "
                     f"{database:.1f} s later", first / GOAL_MOUNT_S,
                     "x the goal", f"≤ {GOAL_MOUNT_S:g} s", first <= GOAL_MOUNT_S,
                     {"mount_s": first, "catalog_s": first_catalog, "database_s": database,
                      **first_memory}))
    bench.add(Result("6b", "remount with the stored catalog", f"{remount:.2f} s",
                     f"floor `python -c '{FLOOR_IMPORTS}'` {median(floors):.2f} s; first "
                     f"mount {first:.2f} s; {len(requests)} request(s), "
                     f"{sum(r[2] for r in requests)} bytes", remount / GOAL_REMOUNT_S,
                     "x the goal", f"≤ {GOAL_REMOUNT_S:g} s", remount <= GOAL_REMOUNT_S,
                     {"mount_s": remounts, "catalog_s": catalogs, "requests": requests,
                      "floor_s": floors, **memory}))
    bench.add(Result("6f", f"`ls -l` of the folder of {listed} prefixes (first listing)",
                     f"{long_listing:.2f} s", f"`ls -f` (names only) then {names_only:.2f} s",
                     long_listing / GOAL_LS_S, "x the goal", f"≤ {GOAL_LS_S:g} s",
                     long_listing <= GOAL_LS_S,
                     {"ls_l_s": long_listing, "ls_f_s": names_only}))
    rss = max(first_memory["rss_mib"], listed_memory["rss_mib"], memory["rss_mib"])
    bench.add(Result("6c", f"daemon RSS (after start-up; after listing {listed} entries)",
                     f"{first_memory['rss_mib']:.0f} MiB; {listed_memory['rss_mib']:.0f} MiB",
                     f"peak {first_memory['peak_mib']:.0f} MiB during start-up",
                     rss / GOAL_RSS_MIB, "x the goal", f"≤ {GOAL_RSS_MIB} MiB",
                     rss <= GOAL_RSS_MIB,
                     {"first": first_memory, "listed": listed_memory, "remount": memory}))


def bench_floors(bench: Bench) -> None:
    """Metrics 10a-10c (see floors.py)."""
    floor_imports(bench, Result, GOAL_REMOUNT_S)
    info = bench.caches.big
    checksum = info["tarball"]["checksum"]
    blob = bench.caches.root / "big" / "mirror" / "blobs" / "sha256" / checksum[:2] / checksum
    floor_header_reading(bench, Result, blob, GOAL_MATERIALIZE)
    store = bench.work / "store-index"
    if not (store / "catalog").exists():  # the stored 100,000-spec index document
        with bench.mount("index", store):
            pass
    (document,) = (store / "catalog" / "indexes").glob("*.json")
    floor_index(bench, Result, document, GOAL_MOUNT_S)


def bench_fusefloor(bench: Bench, store: Path | None) -> None:
    """Metrics 11a-11c (see fusefloor.py): the warm-tree workloads of 3a, 4b and 5 through a
    filesystem that does the least pyfuse3 allows, beside lazymount and the tree itself."""
    info = bench.caches.big
    if store is None:  # part "big" did not run: a store holding the package
        store = bench.later(bench.work / "store-floor")
        with bench.mount("big", store) as mount:
            os.listdir(mount.root / info["projected"])  # materializes it
    native = _store_tree(store, info["hash"])
    load = TreeWorkloads(native, bench.work / "paths")
    workloads: dict[str, Callable[[Path], float]] = {
        "find": load.find_ls, "small": load.read_small, "big": load.read_big}
    with FloorMount(native) as floor, bench.mount("big", store) as mount:
        bases = {"floor": floor.root, "lazymount": mount.root / info["projected"],
                 "native": native}
        times = compare(workloads, bases, max(5, bench.reps))
    rows = [("11a", "find", f"warm `find -ls` over the package ({len(load.files)} files)", 1000,
             "ms", GOAL_FIND, "x native time"),
            ("11b", "small", f"open+read {len(load.small)} small files, second pass", 1, "s",
             GOAL_SMALL, "x native time"),
            ("11c", "big", "re-read of the 48 MiB file (1 MiB reads)", 1000, "ms", GOAL_REREAD,
             "x native speed")]
    for metric, name, what, scale, unit, goal, reading in rows:
        floor_s, lazy_s, native_s = (median(times[name][k]) for k in bases)
        speed = name == "big"  # a speed: native time over ours
        ratio = native_s / floor_s if speed else floor_s / native_s
        lazy_ratio = native_s / lazy_s if speed else lazy_s / native_s
        figure = f"{{:.{0 if unit == 'ms' else 2}f}} {unit}"
        bench.add(Result(metric, f"floor: {what}, through a minimal pyfuse3 filesystem",
                         figure.format(floor_s * scale),
                         f"local disk: {figure.format(native_s * scale)}; lazymount: "
                         f"{figure.format(lazy_s * scale)} ({lazy_ratio:.2f}{reading})",
                         ratio, reading, ("≥ " if speed else "≤ ") + f"{goal}x",
                         ratio >= goal if speed else ratio <= goal,
                         {f"{k}_s": v for k, v in times[name].items()}))


# ---------------------------------------------------------------------------------------------
# (d) host/ at 100,000 specs: metric 8


def bench_host_view(bench: Bench) -> None:
    """What ``host/`` costs: remounts with and without it, interleaved (the view is chosen
    on first look, so the mount should not pay for it); the first look at ``host/`` and what
    it fetches; a remount with ``--targets host`` (it filters the tree before mounting)."""
    store = bench.work / "store-index"
    if not (store / "catalog").exists():  # the catalog of the 100,000-spec index, kept
        with bench.mount("index", store):
            pass
    plain, viewed, hiding, firsts, asked = [], [], [], [], []
    for _ in range(max(7, bench.reps)):
        with bench.mount("index", store, "--no-host-view") as mount:
            plain.append(mount.seconds)
        with bench.mount("index", store) as mount:
            viewed.append(mount.seconds)
            mark = bench.server.mark()
            first = timed(lambda m=mount: [os.listdir(m.root / "host" / name)
                                           for name in os.listdir(m.root / "host")[:100]])
            firsts.append(first)
            asked.append(bench.server.requests_since(mark))
            names = len(os.listdir(mount.root / "host"))
        with bench.mount("index", store, "--targets=host") as mount:
            hiding.append(mount.seconds)
    without, with_view, targets = median(plain), median(viewed), median(hiding)
    bench.add(Result("8a", "remount of the 100,000-spec index, host/ served",
                     f"{with_view:.2f} s", f"without host/ (--no-host-view): {without:.2f} s",
                     with_view / without, "x the time without", "≤ 1.1x",
                     with_view / without <= 1.1,
                     {"with_s": viewed, "without_s": plain}))
    bench.add(Result("8b", f"first look at host/ ({names} names) and 100 of its names",
                     f"{median(firsts):.2f} s", f"requests to the mirror: "
                     f"{max(len(a) for a in asked)}", None, "chosen from the index",
                     "0 requests", all(not a for a in asked), {"first_s": firsts}))
    bench.add(Result("8c", "remount with --targets host (the tree filtered first)",
                     f"{targets:.2f} s", f"--targets all: {with_view:.2f} s",
                     targets / with_view, "x the time with all", details={"s": hiding}))


# ---------------------------------------------------------------------------------------------
# (b) the stack: metrics 1b and 7


def bench_stack(bench: Bench) -> None:
    info = bench.caches.stack
    packages = info["packages"]
    app = packages[info["app"]]
    closure = [packages[i] for i in info["closure"]]
    binary = Path(app["projected"]) / "bin" / app["name"]
    projected = {p["hash"]: p["projected"] for p in packages}
    by_checksum = {p["tarball"]["checksum"]: p for p in packages}
    whole = sum(p["tarball"]["contentLength"] + p["spec_blob"]["contentLength"]
                for p in packages)
    lazy_runs, eager_runs, fetched_bytes, fetched_sets = [], [], [], []
    for rep in range(bench.reps):
        store = bench.later(bench.work / f"store-stack-{rep}")
        with bench.mount("stack", store) as mount:
            mark = bench.server.mark()
            lazy_runs.append(timed(lambda m=mount: _run(m.root / binary, f"Hello from "
                                                                        f"{app['name']}")))
            wait_ready([mount.root / p["projected"] for p in closure])
            time.sleep(0.5)  # anything else the prefetch would start
            requests = bench.server.requests_since(mark)
        blobs = [r for r in requests if r[0].startswith("/stack/mirror/blobs/")]
        fetched_bytes.append(sum(r[2] for r in blobs))
        fetched_sets.append({by_checksum[r[0].rsplit("/", 1)[1]]["name"] for r in blobs
                             if r[0].rsplit("/", 1)[1] in by_checksum})
        eager_root = bench.later(short_dir("lme"))
        parts = eager_install(bench, "stack", closure, eager_root, projected)
        parts["run_s"] = timed(lambda r=eager_root: _run(r / binary, "Hello from"))
        eager_runs.append(sum(parts.values()))
    lazy, eager = median(lazy_runs), median(eager_runs)
    bench.add(Result("1b", f"cold first access, app of the stack ({len(closure)} packages "
                           "in its link/run closure)", f"{lazy:.2f} s",
                     f"curl | tar xz + relocate of the closure + run: {eager:.2f} s",
                     lazy / eager, "x the eager time", details={"lazy_s": lazy_runs,
                                                               "eager_s": eager_runs}))
    wanted = {p["name"] for p in closure}
    exact = all(s == wanted for s in fetched_sets)
    fetched = median(fetched_bytes)
    extra = sorted(set().union(*fetched_sets) - wanted)
    missing = sorted(wanted - set.intersection(*fetched_sets))
    bench.add(Result("7", f"bytes fetched to run the app ({len(packages)}-package stack)",
                     f"{_mib(fetched)} ({len(fetched_sets[-1])} packages)",
                     f"whole stack: {_mib(whole)}", fetched / whole, "of the stack",
                     "closure only", exact,
                     {"fetched": fetched_bytes, "whole": whole, "extra": extra,
                      "missing": missing}))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller caches and one repetition (under 3 minutes)")
    parser.add_argument("--only",
                        default="startup,index,sitecatalog,host,big,stack,spack,floors,"
                                "fusefloor,publish",
                        help="comma-separated parts to run: startup, index, sitecatalog, host, "
                             "big, stack, spack, floors, fusefloor, publish, toc")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark needs root (FUSE mounts, dropping the page cache)", file=sys.stderr)
        return 2
    started = time.monotonic()
    # byte-compiled as an installed package is: a daemon started with PYTHONDONTWRITEBYTECODE
    # would otherwise compile lazymount's modules at every mount (0.13 s here)
    compileall.compile_dir(REPO / "lazymount", quiet=1)
    sizes = generate.Sizes.quick() if args.quick else generate.Sizes.full()
    caches = generate.generate(OUT / "caches" / ("quick" if args.quick else "full"), sizes)
    work = OUT / "work"
    if work.exists():  # an earlier run's trees: deleted at the end, not before measuring
        work.rename(OUT / f"work.old.{os.getpid()}")
    host = machine()
    print(f"machine: {host['nproc']} x {host['cpu']}, kernel {host['kernel']}, "
          f"disk {host['disk']}, load {host['load']}")
    parts = args.only.split(",")
    with Nginx(caches.root, work / "nginx") as server:
        bench = Bench(caches, server, work, 1 if args.quick else 3, print)
        try:
            if "startup" in parts:
                print("(h) start-up: light commands, the demo cache's mount")
                bench_startup(bench, Result)
            if "index" in parts:
                print("(c) index of 100,000 specs: mount time and memory")
                bench_index(bench)
            if "sitecatalog" in parts:
                print("(c) index of 100,000 specs through a site catalog: mount, bytes")
                bench_site_catalog(bench, Result)
            if "host" in parts:
                print("(d) host/ with an index of 100,000 specs: mount time")
                bench_host_view(bench)
            store = None
            if "big" in parts:
                print("(a) the big package: first access, materialization")
                store = bench_big(bench)
                bench_materialize_in_memory(bench)
                print("(a) the big package: warm metadata, small files, large file")
                bench_warm_tree(bench, store, bind=False)
                bench_warm_tree(bench, store, bind=True)
            if "stack" in parts:
                print("(b) the stack: the app's first run, bytes fetched")
                bench_stack(bench)
            if "spack" in parts:
                print("(e) a real-shaped package: lazymount against spack buildcache install")
                bench_spack(bench, Result, _run)
            if "publish" in parts:
                print("(i) lazymount publish: the big package's table of contents")
                bench_publish(bench, Result)
            if "toc" in parts:
                print("(h) a CUDA-shaped package opened through its table of contents")
                bench_toc(bench, Result, _run, eager_install)
            if "floors" in parts:
                print("(f) floors: the least CPython must spend on each missed goal")
                bench_floors(bench)
            if "fusefloor" in parts:
                print("(g) FUSE floor: the warm-tree workloads through the least pyfuse3 allows")
                bench_fusefloor(bench, store)
        finally:
            for root in bench.roots.values():
                subprocess.run(["fusermount3", "-u", "-z", str(root)], check=False,
                               capture_output=True)
                shutil.rmtree(root, ignore_errors=True)
            for path in [*bench.leftovers, *OUT.glob("work.old.*")]:
                remove_tree(path)
    elapsed = time.monotonic() - started
    document = {"machine": host, "quick": args.quick, "seconds": round(elapsed),
                "sizes": asdict(sizes), "results": [asdict(r) for r in bench.results]}
    (OUT / "results.json").write_text(json.dumps(document, indent=1))
    table = report.markdown(document)
    (OUT / "results.md").write_text(table)
    print()
    print(table)
    print(f"(ran in {elapsed:.0f} s; written to {OUT}/results.json and results.md)")
    return 0
