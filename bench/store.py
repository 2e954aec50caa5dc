"""What the store's record, first-use check, fsck and eviction cost, per GiB and per file.

    python -m bench.store [--size MIB] [--files N] [--dir DIR]

Builds a package-shaped tree (``--files`` small files of 1-16 KiB in nested directories,
some symlinks, and large files making up the rest of ``--size``) in a store under
``--dir`` (default ``bench/out/store``: the disk this checkout is on), then times, side by
side in the same run and with the page cache warm:

* **seal**: writing the record at publish (every file hashed once), against
  ``sha256sum`` over the same files;
* **check**: the first-use check of a package (one ``lstat`` per entry against its
  record), against ``find -ls`` over the tree;
* **fsck**: re-hashing against the record, against ``sha256sum``;
* **evict**: removing a package (``Store.remove``): the rename the caller waits for, and the
  deletion of its files, against ``rm -rf`` of a copy.

Prints a markdown table; docs/STORE.md quotes it. Runs as any user.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lazymount.store import record
from lazymount.store.content import Store

GIB = 1 << 30


def build_tree(tree: Path, size: int, files: int, seed: int = 15) -> tuple[int, int]:
    """A package-like tree; returns (bytes, entries)."""
    rng = random.Random(seed)
    written = entries = 0
    for index in range(files):
        directory = tree / f"include/d{index % 97:02d}/s{index % 13}"
        directory.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(1024, 16384))
        (directory / f"h{index}.h").write_bytes(data)
        written += len(data)
        entries += 1
        if index % 50 == 0:
            os.symlink(f"h{index}.h", directory / f"l{index}.h")
            entries += 1
    (tree / "lib").mkdir(exist_ok=True)
    chunk = rng.randbytes(1 << 20)
    part = 0
    while written < size:
        take = min(64 << 20, size - written)
        with open(tree / "lib" / f"libbig{part}.so", "wb") as handle:
            for offset in range(0, take, len(chunk)):
                handle.write(chunk[: min(len(chunk), take - offset)])
        written += take
        part += 1
        entries += 1
    return written, entries


def timed(action: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def shell(*command: str) -> Callable[[], object]:
    return lambda: subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="MiB of files (default 512)")
    parser.add_argument("--files", type=int, default=20000, help="small files (default 20000)")
    parser.add_argument("--dir", type=Path, default=Path(__file__).parent / "out" / "store")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    store = Store(args.dir)
    tree = args.dir / "pkgs" / "k.bench" / "tree"
    tree.mkdir(parents=True)
    size, entries = build_tree(tree, args.size << 20, args.files)
    files = [str(p) for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]
    list_file = args.dir / "files.txt"
    list_file.write_text("\n".join(files) + "\n")
    gib = size / GIB
    sha256sum = shell("sh", "-c", f"xargs -d '\\n' sha256sum < {list_file}")
    sha256sum()  # warm the page cache
    rows: list[tuple[str, str, str, float | None]] = []

    sealed = record.seal(tree, {"hash": "k"})
    seal = timed(lambda: record.seal(tree, {"hash": "k"}), args.repeat)
    hashing = timed(sha256sum, args.repeat)
    rows.append(("seal (record at publish)", f"{seal / gib:.2f} s/GiB",
                 f"sha256sum: {hashing / gib:.2f} s/GiB", seal / hashing))
    (tree.parent / record.RECORD).write_bytes(sealed.data)
    recorded = record.parse(sealed.data)
    # as the daemon does it: with the owners and modes the store requires, in the same walk
    check = timed(lambda: record.check(tree, recorded, content=False, owner=os.geteuid()),
                  args.repeat)
    find = timed(shell("find", str(tree), "-ls"), args.repeat)
    rows.append((f"first-use check ({entries} entries)",
                 f"{check * 1000:.0f} ms ({check / entries * 1e6:.1f} µs/entry)",
                 f"find -ls: {find * 1000:.0f} ms", check / find))
    fsck = timed(lambda: record.check(tree, recorded, content=True), args.repeat)
    rows.append(("fsck (re-hash against the record)", f"{fsck / gib:.2f} s/GiB",
                 f"sha256sum: {hashing / gib:.2f} s/GiB", fsck / hashing))
    evictions, deletions, removals = [], [], []
    for round_ in range(args.repeat):
        copy = args.dir / f"copy{round_}"
        shutil.copytree(tree, copy, symlinks=True)
        for name in (f"a{round_}.bench", f"b{round_}.bench"):
            shutil.copytree(tree.parent, args.dir / "pkgs" / name, symlinks=True)
        os.sync()
        evictions.append(timed(functools.partial(store.remove, f"a{round_}.bench"), 1))
        deletions.append(timed(functools.partial(store.remove, f"b{round_}.bench", True), 1))
        removals.append(timed(shell("rm", "-rf", str(copy)), 1))
        time.sleep(1)  # the background deletion of "a" is done before the next round
    evict, delete = statistics.median(evictions), statistics.median(deletions)
    remove = statistics.median(removals)
    rows.append(("evict: what the caller waits for (one rename)",
                 f"{evict * 1000:.2f} ms", "-", None))
    rows.append(("evict: deleting the files (in the background)",
                 f"{delete / gib:.1f} s/GiB ({delete / entries * 1e6:.0f} µs/entry)",
                 f"rm -rf: {remove / gib:.1f} s/GiB", delete / remove))
    shutil.rmtree(args.dir, ignore_errors=True)

    print(f"Tree: {size / (1 << 20):.0f} MiB in {entries} entries ({len(files)} files); "
          f"{platform.machine()}, Python {platform.python_version()}, page cache warm, "
          f"median of {args.repeat}.\n")
    print("| step | lazymount | compared with | ratio |")
    print("|---|---|---|---|")
    for step, ours, theirs, ratio in rows:
        shown = "-" if ratio is None else f"{ratio:.2f}x"
        print(f"| {step} | {ours} | {theirs} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
