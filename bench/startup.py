"""Part "startup": how soon the command answers and a small mount is usable.

* 13a/13b  ``lazymount --help`` and ``lazymount status`` (of a running mount) against
  ``python -c pass`` run side by side: what the command adds to a bare interpreter;
* 13c/13d  ``lazymount MOUNTPOINT`` of the two-package demo cache over loopback HTTP (the
  command as users run it: it returns once the background daemon says the mount is ready)
  until the package's prefix is listed, first with a fresh store, then again with the
  catalog the first mount stored; beside it the floor of any daemon built on pyfuse3: a fresh
  ``python -c 'import trio, pyfuse3'``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from .harness import median, remove_tree, short_dir, timed

GOAL_COMMAND_S = 0.1  # seconds a light command may add to python -c pass
GOAL_DEMO_MOUNT_S = 0.3
DEMO_PACKAGE = "linux-x86_64/lmhello-1.0-3vgakfze5q7cw5gke5wbrfotzhh2tstq"
LAZYMOUNT = [sys.executable, "-m", "lazymount"]
RUNS = 9


def _quiet(command: list[str]) -> None:
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _side_by_side(commands: dict[str, list[str]], runs: int = RUNS) -> dict[str, list[float]]:
    """Each command timed ``runs`` times, interleaved, so a busy machine skews all alike."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            times[name].append(timed(lambda c=command: _quiet(c)))
    return times


def _demo_mirror(caches_root: Path) -> Path:
    """The demo cache copied where the benchmark's nginx serves it."""
    target = caches_root / "demo" / "mirror"
    with resources.as_file(resources.files("lazymount").joinpath("data", "demo-mirror")) as src:
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(src, target)
    return target


def _mount_and_list(url: str, key: Path, store: Path, root: Path) -> float:
    """Seconds from starting ``lazymount`` to the demo package's prefix being listed."""

    def mount_and_list() -> None:
        subprocess.run([*LAZYMOUNT, f"--mirror={url}", f"--trust-key={key}",
                        f"--store={store}", f"--keyring={store.parent / 'no-keys'}",
                        str(root)], check=True, stdout=subprocess.DEVNULL)
        os.listdir(root / DEMO_PACKAGE)

    return timed(mount_and_list)


def _unmount(root: Path) -> None:
    _quiet([*LAZYMOUNT, "umount", str(root)])
    subprocess.run(["fusermount3", "-u", "-z", str(root)], capture_output=True, check=False)


def bench_startup(bench: Any, result_type: Any) -> None:
    key_file = resources.files("lazymount").joinpath("data", "demo-key.pub.asc")
    _demo_mirror(bench.caches.root)
    url = bench.url("demo")
    root = short_dir("lmd")
    work = bench.work / "startup"
    work.mkdir(parents=True, exist_ok=True)
    firsts, remounts, statuses, passes = [], [], [], []
    try:
        with resources.as_file(key_file) as key:
            for rep in range(max(3, bench.reps)):
                store = work / f"store-{rep}"
                firsts.append(_mount_and_list(url, key, store, root))
                _unmount(root)
                remounts.append(_mount_and_list(url, key, store, root))
                times = _side_by_side({"status": [*LAZYMOUNT, "status", str(root)],
                                       "pass": [sys.executable, "-c", "pass"]}, 3)
                statuses += times["status"]
                passes += times["pass"]
                _unmount(root)
        helps = _side_by_side({"help": [*LAZYMOUNT, "--help"],
                               "pass": [sys.executable, "-c", "pass"],
                               "floor": [sys.executable, "-c", "import trio, pyfuse3"]})
    finally:
        _unmount(root)
        shutil.rmtree(root, ignore_errors=True)
        remove_tree(work)
    bare = median(helps["pass"])
    for metric, what, seconds, baseline in (
            ("13a", "`lazymount --help`", median(helps["help"]), bare),
            ("13b", "`lazymount status MOUNTPOINT` (a running mount)", median(statuses),
             median(passes))):
        above = seconds - baseline
        bench.add(result_type(
            metric, what, f"{seconds:.3f} s", f"`python -c pass` {baseline:.3f} s; "
            f"{above:+.3f} s", above / GOAL_COMMAND_S, "x the goal (time above python)",
            f"≤ {GOAL_COMMAND_S:g} s above", above <= GOAL_COMMAND_S,
            {"seconds": helps["help"] if metric == "13a" else statuses,
             "python_s": helps["pass"] if metric == "13a" else passes}))
    floor = median(helps["floor"])
    for metric, what, runs in (
            ("13c", "first mount of the demo cache (HTTP) until its prefix is listed",
             firsts),
            ("13d", "remount of the demo cache (stored catalog) until its prefix is listed",
             remounts)):
        seconds = median(runs)
        bench.add(result_type(
            metric, what, f"{seconds:.2f} s", f"floor `python -c 'import trio, pyfuse3'` "
            f"{floor:.2f} s", seconds / GOAL_DEMO_MOUNT_S, "x the goal",
            f"≤ {GOAL_DEMO_MOUNT_S:g} s", seconds <= GOAL_DEMO_MOUNT_S,
            {"seconds": runs, "floor_s": helps["floor"]}))
