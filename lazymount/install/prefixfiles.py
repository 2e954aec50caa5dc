"""Files of one extracted prefix, opened and rewritten in place without leaving it.

Entries are opened relative to the prefix with ``O_NOFOLLOW`` one component at a time, so
nothing outside the prefix is ever touched. Writes go to the existing inode (modes, inodes and
hard links are kept). Blocking; any worker thread.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from lazymount.errors import RelocationError

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW


class Prefix:
    """Opens entries of one prefix by relative path, never leaving it or following symlinks."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd = -1

    def __enter__(self) -> Prefix:
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    @contextmanager
    def parent(self, rel: str) -> Iterator[tuple[int, str]]:
        """Yield (fd of the directory holding ``rel``, its last component)."""
        parts = self._parts(rel)
        fd = self.fd
        try:
            for name in parts[:-1]:
                nxt = self._open_dir(fd, name, rel)
                if fd != self.fd:
                    os.close(fd)
                fd = nxt
            yield fd, parts[-1]
        finally:
            if fd != self.fd:
                os.close(fd)

    def lstat(self, dir_fd: int, name: str, rel: str) -> os.stat_result:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise self._missing(rel) from None

    def files(self, rels: list[str]) -> Iterator[tuple[str, int, str, os.stat_result]]:
        """Yield (rel, dir fd, name, lstat) for the regular files among ``rels``."""
        for rel in rels:
            with self.parent(rel) as (dir_fd, name):
                st = self.lstat(dir_fd, name, rel)
                if stat.S_ISREG(st.st_mode):
                    yield rel, dir_fd, name, st

    def _parts(self, rel: str) -> list[str]:
        if not isinstance(rel, str) or rel.startswith("/") or "\0" in rel:
            raise RelocationError(f"refusing to relocate {rel!r}: not a path "
                                  "inside the package")
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise RelocationError(f"refusing to relocate {rel!r}: not a path "
                                  "inside the package")
        return parts

    def _open_dir(self, fd: int, name: str, rel: str) -> int:
        try:
            return os.open(name, _OPEN_DIR, dir_fd=fd)
        except FileNotFoundError:
            raise self._missing(rel) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise RelocationError(f"refusing to relocate {rel}: {name} is a "
                                      "symlink or not a directory") from None
            raise

    def _missing(self, rel: str) -> RelocationError:
        return RelocationError(f"{rel} is listed for relocation but not in the "
                               "package")


@contextmanager
def reader(dir_fd: int, name: str) -> Iterator[BinaryIO]:
    fd = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        yield f


@contextmanager
def _writer(dir_fd: int, name: str, st: os.stat_result) -> Iterator[int]:
    """A read-write fd of regular file ``name``. A read-only file is made owner-writable for
    the duration and gets its mode back (the owner may always chmod)."""
    mode = stat.S_IMODE(st.st_mode)
    restore = False
    try:
        fd = os.open(name, os.O_RDWR | _NOFOLLOW, dir_fd=dir_fd)
    except PermissionError:
        ro = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
        try:
            os.fchmod(ro, mode | stat.S_IWUSR)
            try:
                fd = os.open(name, os.O_RDWR | _NOFOLLOW, dir_fd=dir_fd)
            except BaseException:
                os.fchmod(ro, mode)
                raise
            restore = True
        finally:
            os.close(ro)
    try:
        yield fd
    finally:
        if restore:
            os.fchmod(fd, mode)
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def patch(dir_fd: int, name: str, st: os.stat_result, edits: list[tuple[int, bytes]]) -> None:
    """Overwrite byte ranges in place (same file length)."""
    with _writer(dir_fd, name, st) as fd:
        for offset, data in edits:
            _pwrite_all(fd, data, offset)


def rewrite(dir_fd: int, name: str, st: os.stat_result, data: bytes) -> None:
    """Replace the whole content in place (the inode, so hard links, stay)."""
    with _writer(dir_fd, name, st) as fd:
        _pwrite_all(fd, data, 0)
        os.ftruncate(fd, len(data))
