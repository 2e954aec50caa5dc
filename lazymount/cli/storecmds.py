"""``lazymount preload``, ``gc`` and ``fsck``: looking after a mount's store.

``gc`` and ``fsck MOUNTPOINT`` ask the daemon serving the mount (its control socket), so that
what it knows of the store stays true. ``preload`` asks it for the closure of the specs,
then looks into each prefix through the mount, as a job would (the daemon materializes it).
``fsck --store DIR`` checks a store no daemon serves directly; a store that a mount serves
is checked through that mount's daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from lazymount.errors import UsageError
from lazymount.service.control import ask_mount, checked
from lazymount.store import partial, record
from lazymount.store.content import Store
from lazymount.system import xattrs
from lazymount.system.mountinfo import lazymount_mounts
from lazymount.system.printable import printable
from lazymount.system.sizes import parse_size, show_size


def _size(text: str) -> int:
    """``--max-size``: a byte count with K/M/G/T (binary) suffixes; 0 allowed."""
    try:
        return parse_size(text, zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


PRELOAD_THREADS = 8  # prefixes looked into at once (the daemon limits its own work)


def ask(root: str, request: dict[str, Any]) -> dict[str, Any]:
    """The daemon's answer; UsageError with its reason if it refused."""
    return checked(ask_mount(root, request))


def _mountpoint(path: Path) -> str:
    root = os.path.realpath(path)
    if root not in lazymount_mounts():
        raise UsageError(f"{path} is not a lazymount mount point")
    return root


# ---- preload ----------------------------------------------------------------------------


def lock_specs(path: Path) -> list[str]:
    """The root specs of a Spack environment's ``spack.lock``, as ``/hash`` specs."""
    try:
        with open(path, "rb") as handle:
            document = json.loads(handle.read(256 << 20))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise UsageError(f"{path} is not a spack.lock (not JSON)") from None
    roots = document.get("roots") if isinstance(document, dict) else None
    if not isinstance(roots, list):
        raise UsageError(f"{path} is not a spack.lock (no roots list)")
    specs = []
    for root in roots:
        dag_hash = root.get("hash") if isinstance(root, dict) else None
        if not isinstance(dag_hash, str) or not dag_hash.isalnum():
            raise UsageError(f"{path}: a root without a hash")
        specs.append(f"/{dag_hash}")
    return specs


class PlainProgress:
    """One line per package, for logs and pipes."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0

    def plan(self, labels: list[str]) -> None:
        self.total = len(labels)
        print(f"preloading {self.total} package(s)", flush=True)

    def package(self, event: dict[str, Any]) -> None:
        self.done += 1
        state = (f"ready   ({show_size(int(event.get('bytes', 0)))})" if event.get("ok")
                 else f"FAILED: {event.get('error')}")
        print(printable(f"[{self.done}/{self.total}] {event.get('label')}: {state}"),
              flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """A progress bar (packages, and bytes in the store) for a terminal."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.bytes = 0

    def plan(self, labels: list[str]) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=len(labels), unit="pkg", desc="preload", file=sys.stderr)

    def package(self, event: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bytes += int(event.get("bytes", 0))
        if not event.get("ok"):
            self.bar.write(printable(f"{event.get('label')}: FAILED: {event.get('error')}"))
        self.bar.set_postfix_str(printable(f"{event.get('label')}, {show_size(self.bytes)}"))
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_preload(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lazymount preload",
        description="Materialize packages of a mount, with their link/run dependencies, "
                    "before a job needs them (the running daemon does the work). SPEC is "
                    "name, name@version, name/hashprefix or /hashprefix, and must name one "
                    "package. Shows a progress bar on a terminal, one line per package "
                    "otherwise; exits 1 naming every package that failed.")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path,
                        help="a lazymount mount point")
    parser.add_argument("specs", metavar="SPEC", nargs="*",
                        help="name, name@version, name/hashprefix or /hashprefix")
    parser.add_argument("--from", dest="lockfile", metavar="SPACK_LOCK", type=Path,
                        action="append", default=[],
                        help="also every root of a Spack environment's spack.lock")
    args = parser.parse_intermixed_args(argv)
    specs = list(args.specs)
    for lockfile in args.lockfile:
        specs += lock_specs(lockfile)
    if not specs:
        raise UsageError("give at least one SPEC or --from spack.lock")
    root = _mountpoint(args.mountpoint)
    packages = ask(root, {"command": "closure", "specs": specs})["packages"]
    progress: PlainProgress | BarProgress = BarProgress() if sys.stderr.isatty() \
        else PlainProgress()
    progress.plan([p["label"] for p in packages])
    failed: list[dict[str, Any]] = []
    try:
        with ThreadPoolExecutor(PRELOAD_THREADS) as pool:
            jobs = {pool.submit(_materialize, root, p["path"]): p for p in packages}
            for job in as_completed(jobs):
                package, error = jobs[job], job.result()
                event: dict[str, Any] = {"label": package["label"], "ok": not error,
                                         "error": error}
                if not error:
                    # an opened package is completed by the daemon, in the background
                    ask(root, {"command": "fill", "hashes": [package["hash"]]})
                    sizes = ask(root, {"command": "sizes", "hashes": [package["hash"]]})
                    event["bytes"] = sizes["sizes"].get(package["hash"]) or 0
                else:
                    failed.append(event)
                progress.package(event)
    finally:
        progress.close()
    for event in failed:
        print(printable(f"lazymount: {event['label']} failed: {event['error']}"),
              file=sys.stderr)
    return 1 if failed else 0


def _materialize(root: str, relative: str) -> str:
    """Look into a prefix (the daemon materializes it); "" or why it failed."""
    prefix = os.path.join(root, relative)
    try:
        os.listdir(prefix)
        return ""
    except OSError as exc:
        try:
            state = os.fsdecode(os.getxattr(prefix, xattrs.STATUS))
        except OSError:
            state = ""
        return state.removeprefix("failed: ") if state.startswith("failed") else \
            (exc.strerror or str(exc))


# ---- gc ---------------------------------------------------------------------------------


def run_gc(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lazymount gc",
        description="Evict packages that nothing uses from a mount's store, least recently "
                    "used first, until it holds at most --max-size (default: 90% of the "
                    "store quota). Evicted packages materialize again on access. Root or "
                    "the daemon's user only.")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path,
                        help="a lazymount mount point")
    parser.add_argument("--max-size", metavar="SIZE", type=_size, default=None,
                        help="bytes to keep at most (K, M, G, T); 0 evicts every package "
                             "not in use")
    args = parser.parse_args(argv)
    result = ask(_mountpoint(args.mountpoint), {"command": "gc", "max_size": args.max_size})
    for row in result["evicted"]:
        print(printable(f"evicted {row['label']} ({show_size(row['bytes'])})"))
    print(f"freed {show_size(result['freed_bytes'])} in {len(result['evicted'])} package(s); "
          f"the store holds {show_size(result['store_bytes'])} in {result['kept']} "
          f"package(s) (target {show_size(result['target_bytes'])})")
    return 0


# ---- fsck -------------------------------------------------------------------------------


def run_fsck(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lazymount fsck",
        description="Re-hash every ready package of a store against the record written when "
                    "it was published (each file's size, mode, sha256, link target). "
                    "Names every package whose files differ, are missing or were added, and "
                    "exits 1 if there is one. Safe while the daemon serves.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, nargs="?",
                       help="check the store of this mount, through its daemon")
    where.add_argument("--store", metavar="DIR", type=Path,
                       help="check a store directory instead of a mount")
    parser.add_argument("--repair", action="store_true",
                        help="remove the damaged packages: they materialize again on access")
    args = parser.parse_args(argv)
    root = _mountpoint(args.mountpoint) if args.mountpoint else _served_store(args.store)
    if root is not None:
        return _fsck_daemon(root, args.repair)
    return _fsck_directory(args.store, args.repair)


def _served_store(store: Path) -> str | None:
    """The mount point whose daemon serves ``store``, if one does."""
    wanted = os.path.realpath(store)
    for root in lazymount_mounts():
        try:
            served = os.fsdecode(os.getxattr(root, xattrs.STORE))
        except OSError:
            continue
        if os.path.realpath(served) == wanted:
            return root
    return None


def _report(event: dict[str, Any], damaged: list[str]) -> None:
    if event.get("damaged"):
        action = " (removed)" if event.get("removed") else ""
        damaged.append(str(event["label"]))
        print(printable(f"DAMAGED {event['label']}: {event['damaged']}{action}"), flush=True)
    else:
        print(printable(f"ok      {event['label']}"), flush=True)


def _fsck_daemon(root: str, repair: bool) -> int:
    damaged: list[str] = []
    for row in ask(root, {"command": "fsck", "repair": repair})["packages"]:
        _report(row, damaged)
    return _summary(damaged, repair)


def _fsck_directory(directory: Path, repair: bool) -> int:
    if not (directory / "pkgs").is_dir():
        raise UsageError(f"{directory} is not a lazymount store (no pkgs/)")
    # checked as its owner would be: fsck as root of a store the daemon's user owns
    store = Store(directory, owner=directory.stat().st_uid, writable=repair)
    damaged: list[str] = []
    for key in store.keys():
        receipt = store.receipt(key) or {}
        label = str(receipt.get("label", key))
        if partial.is_partial(receipt):  # opened: the files it holds so far
            tree, reason = None, record.summary(partial.check(store, key, content=True)[0])
        else:
            tree, reason = record.checked_tree(store, key, content=True)
            if tree is None and not reason:
                reason = "no valid receipt"
        removed = bool(reason) and repair and store.remove(key, wait=True)
        _report({"label": label, "damaged": reason, "removed": removed}, damaged)
    return _summary(damaged, repair)


def _summary(damaged: list[str], repair: bool) -> int:
    if not damaged:
        print("fsck: every package matches its record")
        return 0
    what = "removed; they materialize again on access" if repair else \
        "run with --repair to remove them"
    print(printable(f"fsck: {len(damaged)} damaged package(s): {', '.join(damaged)} "
                    f"({what})"), file=sys.stderr)
    return 1

