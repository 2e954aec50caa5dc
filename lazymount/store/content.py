"""The local content store: relocated package trees, published atomically.

Layout under the store root::

    pkgs/<key>/tree/          a relocated prefix, ready to serve (never modified again)
    pkgs/<key>/receipt.json   what was published, from which blobs, when; its size on disk
    pkgs/<key>/record.json    every path of the tree: mode, size, sha256, ctime, link target
    staging/<key>.<pid>.<random>/   work in progress; swept at start-up
    trash/gone.<pid>.<random>/      trees being deleted in the background

A package is visible only once ``staging/<key>.<random>`` is renamed to ``pkgs/<key>``: one
atomic rename on one filesystem. A crash leaves only staging garbage, never a half package.
The filesystem itself is the state: there is no separate database to lose or corrupt.

What the store serves is trusted only because nobody but its owner can change it (see
``system/ownership``): the store and every folder above it must be owned by the daemon's user
or root and writable by no one else, or it is refused. Inside, the store never follows a
symbolic link: its own operations (create, rename, delete, the receipt) go through directory
file descriptors with ``O_NOFOLLOW``, a link found where a folder of ours should be is never
entered, and a published tree is walked once, on first use, for entries others could change.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any

from lazymount.errors import StoreError, StoreFull, UnsafePathError
from lazymount.system import libc
from lazymount.system.ownership import (
    check_entry,
    check_trusted_dir,
    describe,
    unsafe_reason,
    walk_nofollow,
)
from lazymount.system.places import STARTED_AS_ROOT, default_dir

log = logging.getLogger(__name__)

RECEIPT = "receipt.json"
RECORD = "record.json"  # what the tree held when published: store/record.py
TREE = "tree"
PKGS, STAGING, TRASH = "pkgs", "staging", "trash"
MAX_RECEIPT_BYTES = 1 << 20
STORE_MODE = 0o755  # the store and its folders: others may read (the FUSE mount), not write
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR)  # rename: something is at the target
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# what this store creates in staging/ and trash/, and so the only names a sweep removes
_STAGING_NAME = re.compile(r"[A-Za-z0-9._-]+\.\d+\.[A-Za-z0-9_-]+")


def default_store_dir() -> Path:
    """/var/cache/lazymount for root, the XDG cache directory otherwise."""
    return default_dir("/var/cache/lazymount", "XDG_CACHE_HOME", "~/.cache")


def create_store_dir(root: Path, owner: int, group: int) -> None:
    """Create the store folder (and missing parents, mode 0755) if it does not exist, owned
    by ``owner``; an existing one is left as it is (the trust check judges it)."""
    if os.path.lexists(root):
        return
    existing = root.parent
    while not os.path.lexists(existing):
        existing = existing.parent
    check_trusted_dir(existing, owner, "the store", parent_of=root)  # before making anything
    try:
        root.parent.mkdir(mode=STORE_MODE, parents=True, exist_ok=True)
        os.mkdir(root, STORE_MODE)
        if os.geteuid() != owner:
            os.lchown(root, owner, group)
    except FileExistsError:
        pass  # made at the same time by another daemon: judged like any existing store
    except OSError as exc:
        raise StoreError(f"cannot create the store at {root}: {exc.strerror}") from None


class _SharedSync:
    """``syncfs`` of the store's file system, shared by the publishes that wait at the same
    time (a group commit): a syncfs covers what was written before it began, so a caller
    arriving while one runs waits for the next, which one of those waiting runs for all of
    them. 26 packages of an application's closure published at once flush the disk a few
    times instead of 26. Blocking; any thread."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._begun = 0  # syncfs calls started
        self._ended = 0  # syncfs calls finished
        self._failed: dict[int, OSError] = {}  # the last failures, by call number

    def sync(self, fd: int) -> None:
        """Return once a syncfs that began after this call has ended; raise its OSError."""
        with self._changed:
            wanted = self._begun + 1
            while self._ended < wanted:
                if self._begun == self._ended:  # none running: run the one wanted
                    self._run(fd, wanted)
                else:
                    self._changed.wait()
            failure = self._failed.get(wanted)
        if failure is not None:
            raise failure

    def _run(self, fd: int, number: int) -> None:
        """Run syncfs ``number``; the lock is held on entry and exit, not while it runs."""
        self._begun = number
        self._changed.release()
        try:
            libc.syncfs_fd(fd)
        except OSError as exc:
            self._failed[number] = exc
            for old in sorted(self._failed)[:-16]:  # their waiters have long seen them
                del self._failed[old]
        finally:
            self._changed.acquire()
            self._ended = number
            self._changed.notify_all()


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


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def remove_entry(name: str, dir_fd: int) -> None:
    """Remove ``name`` in the directory ``dir_fd`` without following any link: a folder is
    removed with everything in it (``shutil.rmtree`` on fds never leaves it), a link or a
    file is unlinked."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, ignore_errors=True, dir_fd=dir_fd)
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        _unlock_folders(name, dir_fd)  # it held a folder it could not empty
        shutil.rmtree(name, ignore_errors=True, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _unlock_folders(name: str, dir_fd: int) -> None:
    """Give the folder ``name`` in ``dir_fd``, and every folder below it, its owner's rwx,
    never following a link: a tree the daemon made may hold folders it made read-only
    (0555, 0000: a crash before their modes were set), which it could not empty."""
    try:
        _unlock(name, dir_fd)
        for _path, folders, _files, fd in os.fwalk(name, dir_fd=dir_fd):
            for folder in folders:
                _unlock(folder, fd)
    except OSError:
        pass  # not ours: left for rmtree to skip


def _unlock(name: str, dir_fd: int) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o700 != 0o700:
        os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=dir_fd)


class Store:
    """Blocking file operations on the store; call from worker threads where it matters.

    ``owner``: the user the store must belong to (with root); the daemon's own by default.
    Raises UnsafePathError when the store could be changed by anyone else, StoreError when
    it cannot be made.
    """

    def __init__(self, root: Path, owner: int | None = None, writable: bool = True):
        self.root = root
        self.owner = os.geteuid() if owner is None else owner
        self.pkgs = root / PKGS
        self.staging_dir = root / STAGING
        self.trash = root / TRASH
        self._checked: set[str] = set()  # keys whose tree was walked in this process
        self._durable = _SharedSync()
        if writable:
            create_store_dir(root, self.owner, os.getegid())
        real = check_trusted_dir(root, self.owner, "the store")
        try:
            self.fd = _open_dir(real)
        except OSError as exc:
            raise StoreError(f"cannot open the store {root}: {exc.strerror}") from None
        if writable and not os.access(real, os.W_OK):
            st = os.fstat(self.fd)
            keep_root = ", or keep root: --user root" if STARTED_AS_ROOT else ""
            raise StoreError(f"the store {root} is owned by uid {st.st_uid}, but the daemon "
                             f"runs as uid {os.geteuid()} and cannot write it: chown -R "
                             f"{os.geteuid()}: {root} (or give another --store{keep_root})")
        self.pkgs_fd = self._own_dir(PKGS, writable)
        self.staging_fd = self._own_dir(STAGING, writable)
        self.trash_fd = self._own_dir(TRASH, writable)

    def _own_dir(self, name: str, create: bool) -> int:
        """A folder of the store, made if missing (-1 if missing and not ``create``); refused
        if it is a link or others can change it."""
        path = self.root / name
        try:
            if create:
                os.mkdir(name, STORE_MODE, dir_fd=self.fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot create {path}: {exc.strerror}") from None
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return -1
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"refusing the store {self.root}: {path} is not a folder "
                                  f"({stat.filemode(st.st_mode)}); remove it")
        check_entry(st, str(path), self.owner, "the store")
        return _open_dir(name, self.fd)

    def check_entries(self) -> None:
        """Mount-time check of everything in the store but package trees (walked on first
        use): owners and modes, and no symbolic link anywhere. Raises UnsafePathError."""
        for name in os.listdir(self.fd):
            if name in (PKGS, STAGING, TRASH):  # entries judged when used, or swept
                continue
            path = self.root / name
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            self._check_kept(str(path), st)
            if stat.S_ISDIR(st.st_mode):
                fd = _open_dir(name, self.fd)
                try:
                    for below, st in walk_nofollow(fd):
                        self._check_kept(str(path / below), st)
                finally:
                    os.close(fd)

    def _check_kept(self, path: str, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"refusing the store {self.root}: {path} is a symbolic "
                                  "link, which the store never makes; remove it")
        check_entry(st, path, self.owner, "the store")

    def close(self) -> None:
        for fd in (self.pkgs_fd, self.staging_fd, self.trash_fd, self.fd):
            if fd >= 0:
                os.close(fd)

    def tree(self, key: str, walk: bool = True) -> Path | None:
        """The published tree of ``key``, or None.

        A package counts only with a readable receipt and a tree, both real (no link) and
        changeable by nobody but the owner: publish writes both before the one rename, so
        anything less was damaged or tampered with afterwards and is materialized again;
        publish then replaces it. ``walk``: also walk the tree for entries others own
        or can write, the first time in this process (30,000 entries: 0.2 s warm, 0.45 s
        cold); without it only the receipt is looked at (a status answer, or the caller
        checks the tree against its record, which compares owners and modes too).
        """
        if self.receipt(key) is None:
            return None
        path = self.pkgs / key / TREE
        if walk and key not in self._checked:
            reason = self._tree_problem(key)
            if reason is not None:
                log.warning("%s: not served (%s); it is materialized again", path, reason)
                return None
            self._checked.add(key)
        return path

    def walked(self, key: str) -> None:
        """``key``'s tree was walked with its owners checked (store/record.py's check does
        both in one walk): ``tree`` need not walk it again in this process."""
        self._checked.add(key)

    def _tree_problem(self, key: str) -> str | None:
        """Why the published tree of ``key`` must not be served, or None. Walks it through
        directory fds, never following a link."""
        try:
            entry_fd = _open_dir(key, self.pkgs_fd)
        except OSError as exc:
            return f"pkgs/{key}: {exc.strerror}"
        try:
            st = os.stat(TREE, dir_fd=entry_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                return f"pkgs/{key}/{TREE} is not a folder ({stat.filemode(st.st_mode)})"
            reason = unsafe_reason(st, self.owner)
            if reason is not None:
                return f"{describe(TREE, st)}; {reason}"
            tree_fd = _open_dir(TREE, entry_fd)
            try:
                for path, st in walk_nofollow(tree_fd, TREE):
                    reason = unsafe_reason(st, self.owner)
                    if reason is not None:
                        return f"{describe(path, st)}; {reason}"
            finally:
                os.close(tree_fd)
            return None
        except OSError as exc:
            return f"{exc.strerror}"
        finally:
            os.close(entry_fd)

    def staging_name(self, key: str) -> str:
        """A fresh name in staging/; the pid in it lets a sweep tell a crashed writer from a
        live one."""
        return f"{key}.{os.getpid()}.{secrets.token_hex(4)}"

    def new_staging(self, key: str) -> Path:
        """A fresh, empty staging directory for ``key``."""
        name = self.staging_name(key)
        try:
            os.mkdir(name, 0o700, dir_fd=self.staging_fd)
        except OSError as exc:
            raise StoreError(f"cannot create a staging directory: {exc.strerror}") from None
        return self.staging_dir / name

    def publish(self, staging: Path, tree: Path, key: str, receipt: dict[str, Any],
                record: bytes = b"") -> Path:
        """Make ``tree`` (inside ``staging``) the published tree of ``key``, with its
        ``record`` (store/record.py; the receipt names its sha256); returns its path.

        If another process published the same key first, its tree wins and ours is dropped.
        Raises StoreError (StoreFull for a full disk) when the disk fails (the staging dir
        is then discarded).
        """
        self._inside(staging, self.staging_dir)
        try:
            work_fd = _open_dir(staging.name, self.staging_fd)
            try:
                if tree != staging / TREE:
                    os.rename(os.path.relpath(tree, staging), TREE, src_dir_fd=work_fd,
                              dst_dir_fd=work_fd)
                    # what extraction left around the prefix: empty folders of its old path,
                    # which would sit in the store (and count against its quota) for nothing
                    for name in os.listdir(work_fd):
                        if name != TREE:
                            remove_entry(name, work_fd)
                if record:
                    self._write_new(work_fd, RECORD, record)
                receipt = dict(receipt, published=time.time())
                self._write_new(work_fd, RECEIPT, (json.dumps(receipt, indent=1) + "\n").encode())
                self._durable.sync(work_fd)  # one flush instead of an fsync per file
            finally:
                os.close(work_fd)
            self._rename_into_place(staging.name, key)
        except OSError as exc:
            if exc.errno in _TAKEN and self.tree(key):
                self.discard(staging)
                return self.pkgs / key / TREE
            self.discard(staging)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left on the store's file system to publish {key}"
                                ) from None
            raise StoreError(f"cannot publish {key} in the store: {exc.strerror}") from None
        self._checked.add(key)  # made by us just now
        return self.pkgs / key / TREE

    @staticmethod
    def _write_new(dir_fd: int, name: str, data: bytes) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)

    def _rename_into_place(self, name: str, key: str) -> None:
        """Rename ``staging/<name>`` to ``pkgs/<key>``; a damaged entry in the way (no valid
        receipt or tree, or a link) is moved to the trash first. OSError if a valid one is
        there."""
        try:
            os.rename(name, key, src_dir_fd=self.staging_fd, dst_dir_fd=self.pkgs_fd)
        except OSError as exc:
            if exc.errno not in _TAKEN or self.tree(key) is not None:
                raise
            self._discard_entry(self.pkgs_fd, key)
            os.rename(name, key, src_dir_fd=self.staging_fd, dst_dir_fd=self.pkgs_fd)

    def _inside(self, path: Path, directory: Path) -> None:
        if path.parent != directory:
            raise StoreError(f"{path} is not an entry of {directory}")

    def keys(self) -> list[str]:
        """The names of the published entries (``pkgs/<key>``), checked or not."""
        try:
            return sorted(os.listdir(self.pkgs_fd))
        except OSError:
            return []

    def remove(self, key: str, wait: bool = False) -> bool:
        """Take ``pkgs/<key>`` away at once (one rename into the trash, never following a
        link); its files are deleted in a background thread (``wait``: before returning).
        False if it was not there. Blocking."""
        gone = f"gone.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.mkdir(gone, 0o700, dir_fd=self.trash_fd)
        except OSError as exc:
            raise StoreError(f"cannot remove {key} from the store: {exc.strerror}") from None
        try:
            os.rename(key, f"{gone}/x", src_dir_fd=self.pkgs_fd, dst_dir_fd=self.trash_fd)
        except FileNotFoundError:
            os.rmdir(gone, dir_fd=self.trash_fd)
            return False
        finally:
            self._checked.discard(key)
        if wait:
            remove_entry(gone, self.trash_fd)
        else:
            threading.Thread(target=remove_entry, args=(gone, self.trash_fd), daemon=True).start()
        return True

    def discard(self, path: Path) -> None:
        """Remove a staging directory or published package off the caller's hot path."""
        parent_fd = self.pkgs_fd if path.parent == self.pkgs else self.staging_fd
        self._inside(path, self.pkgs if parent_fd == self.pkgs_fd else self.staging_dir)
        self._discard_entry(parent_fd, path.name)

    def _discard_entry(self, parent_fd: int, name: str) -> None:
        """Move ``name`` (never followed) into the trash and delete it there in a thread."""
        gone = f"gone.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.mkdir(gone, 0o700, dir_fd=self.trash_fd)
            os.rename(name, f"{gone}/x", src_dir_fd=parent_fd, dst_dir_fd=self.trash_fd)
        except OSError:
            remove_entry(name, parent_fd)
            return
        threading.Thread(target=remove_entry, args=(gone, self.trash_fd), daemon=True).start()

    def sweep(self) -> int:
        """Remove what dead processes left in staging/ and trash/; returns how many entries.

        Only names this store makes are removed, and a link is unlinked, never followed.
        Several daemons may share a store, so entries of live processes are kept.
        """
        count = 0
        for fd in (self.staging_fd, self.trash_fd):
            for name in os.listdir(fd):
                if self.sweepable(name, fd):
                    remove_entry(name, fd)
                    count += 1
        return count

    def sweepable(self, name: str, dir_fd: int) -> bool:
        """True for an entry of staging/ or trash/ that this store made and whose process is
        gone."""
        if not _STAGING_NAME.fullmatch(name):
            log.warning("%s/%s was not made by lazymount: left as it is", self.root, name)
            return False
        return not _owner_alive(name)

    def receipt(self, key: str) -> dict[str, Any] | None:
        """The receipt of a published ``key``, or None if it is missing or not one of ours."""
        try:
            entry_fd = _open_dir(key, self.pkgs_fd)
            try:
                fd = os.open(RECEIPT, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=entry_fd)
            finally:
                os.close(entry_fd)
            with os.fdopen(fd, "rb") as handle:
                st = os.fstat(handle.fileno())
                if unsafe_reason(st, self.owner) is not None or not stat.S_ISREG(st.st_mode):
                    return None
                receipt = json.loads(handle.read(MAX_RECEIPT_BYTES))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(receipt, dict) or not isinstance(receipt.get("published"), int | float):
            return None
        if not key.startswith(str(receipt.get("hash", ""))):  # a receipt of another package
            return None
        return receipt

    def put_file(self, name: str, data: bytes, mode: int) -> Path:
        """Write ``data`` as the store file ``name`` (top level), atomically, unless it
        already holds exactly that; never through a link. Returns its path."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
            with os.fdopen(fd, "rb") as handle:
                st = os.fstat(handle.fileno())
                if (stat.S_ISREG(st.st_mode) and unsafe_reason(st, self.owner) is None
                        and handle.read(len(data) + 1) == data):
                    return self.root / name
        except OSError:
            pass
        temporary = f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), mode)
        os.utime(temporary, (0, 0), dir_fd=self.fd)
        os.replace(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        return self.root / name
