"""The local content store: relocated package trees, published atomically.

Layout under the store root::

    pkgs/<key>/tree/          a relocated prefix, ready to serve (never modified again)
    pkgs/<key>/receipt.json   what was published, from which blobs, when
    staging/<key>.<random>/   work in progress; swept at start-up
    trash/                    trees being deleted in the background

A package is visible only once ``staging/<key>.<random>`` is renamed to ``pkgs/<key>``: one
atomic rename on one filesystem. A crash leaves only staging garbage, never a half package.
The filesystem itself is the state: there is no separate database to lose or corrupt.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lazymount.errors import StoreError
from lazymount.system import libc

RECEIPT = "receipt.json"
TREE = "tree"
MAX_RECEIPT_BYTES = 1 << 20
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR)  # rename: something is at the target


def default_store_dir() -> Path:
    """/var/cache/lazymount for root, the XDG cache directory otherwise."""
    if os.geteuid() == 0:
        return Path("/var/cache/lazymount")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "lazymount"


def _syncfs(path: Path) -> None:
    """Flush the store's filesystem once, instead of an fsync per file of a package."""
    libc.syncfs(path)


def _owner_alive(name: str) -> bool:
    """True if the pid embedded in a staging or trash entry name is a live process."""
    parts = name.split(".")
    if len(parts) < 3 or not parts[-2].isdigit():
        return False
    pid = int(parts[-2])
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """Blocking file operations on the store; call from worker threads where it matters."""

    def __init__(self, root: Path):
        self.root = root
        self.pkgs = root / "pkgs"
        self.staging_dir = root / "staging"
        self.trash = root / "trash"
        try:
            for directory in (self.pkgs, self.staging_dir, self.trash):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store at {root}: {exc.strerror}") from None

    def tree(self, key: str) -> Path | None:
        """The published tree of ``key``, or None.

        A package counts only with a readable receipt and a tree: publish writes both before
        the one rename, so anything less was damaged afterwards (a deleted or corrupted
        receipt, a removed tree) and is materialized again; publish then replaces it.
        """
        published = self.pkgs / key
        if self.receipt(key) is not None and (published / TREE).is_dir():
            return published / TREE
        return None

    def new_staging(self, key: str) -> Path:
        """A fresh, empty staging directory for ``key``."""
        try:
            # the pid in the name lets a sweep tell a crashed writer from a live one
            return Path(tempfile.mkdtemp(prefix=f"{key}.{os.getpid()}.", dir=self.staging_dir))
        except OSError as exc:
            raise StoreError(f"cannot create a staging directory: {exc.strerror}") from None

    def publish(self, staging: Path, tree: Path, key: str, receipt: dict[str, Any]) -> Path:
        """Make ``tree`` (inside ``staging``) the published tree of ``key``; returns its path.

        If another process published the same key first, its tree wins and ours is dropped.
        Raises StoreError when the disk fails (the staging dir is then discarded).
        """
        try:
            if tree != staging / TREE:
                os.rename(tree, staging / TREE)
            receipt = dict(receipt, published=time.time())
            (staging / RECEIPT).write_text(json.dumps(receipt, indent=1) + "\n")
            _syncfs(staging)
            self._rename_into_place(staging, key)
        except OSError as exc:
            if exc.errno in _TAKEN and self.tree(key):
                self.discard(staging)
                return self.pkgs / key / TREE
            self.discard(staging)
            raise StoreError(f"cannot publish {key} in the store: {exc.strerror}") from None
        return self.pkgs / key / TREE

    def _rename_into_place(self, staging: Path, key: str) -> None:
        """Rename ``staging`` to ``pkgs/<key>``; a damaged entry in the way (no valid receipt
        or tree) is moved to the trash first. OSError if a valid one is there."""
        try:
            os.rename(staging, self.pkgs / key)
        except OSError as exc:
            if exc.errno not in _TAKEN or self.tree(key) is not None:
                raise
            self.discard(self.pkgs / key)
            os.rename(staging, self.pkgs / key)

    def discard(self, path: Path) -> None:
        """Remove a staging directory or published package off the caller's hot path."""
        try:
            target = Path(tempfile.mkdtemp(prefix=f"gone.{os.getpid()}.", dir=self.trash))
            os.rename(path, target / "x")
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            return
        threading.Thread(target=shutil.rmtree, args=(target, True), daemon=True).start()

    def sweep(self) -> int:
        """Remove what dead processes left in staging/ and trash/; returns how many entries.

        Several daemons may share a store, so entries of live processes are kept.
        """
        count = 0
        for directory in (self.staging_dir, self.trash):
            for entry in directory.iterdir():
                if _owner_alive(entry.name):
                    continue
                count += 1
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:  # stray files and links: nothing of ours, but not in the way either
                    entry.unlink(missing_ok=True)
        return count

    def receipt(self, key: str) -> dict[str, Any] | None:
        """The receipt of a published ``key``, or None if it is missing or not one of ours."""
        try:
            with open(self.pkgs / key / RECEIPT, "rb") as handle:
                receipt = json.loads(handle.read(MAX_RECEIPT_BYTES))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(receipt, dict) or not isinstance(receipt.get("published"), int | float):
            return None
        if not key.startswith(str(receipt.get("hash", ""))):  # a receipt of another package
            return None
        return receipt
