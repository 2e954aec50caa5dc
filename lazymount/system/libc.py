"""The C library calls Python's os module lacks: mount, umount2, syncfs, prctl, capset,
malloc_trim.

Each raises OSError with the C errno (malloc_trim: a no-op outside glibc). Blocking.
"""

from __future__ import annotations

import ctypes
import os

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, flags: int, what: str = "mount") -> None:
    """mount(2) without a file system type or data (binds and remounts)."""
    _check(_libc.mount(source.encode() if source is not None else None, target.encode(),
                       None, flags, None), what)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), "umount")


def syncfs(path: str | os.PathLike[str]) -> None:
    """Flush the whole file system that holds ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _check(_libc.syncfs(fd), "syncfs")
    finally:
        os.close(fd)


def prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), "prctl")


_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capset(capabilities: tuple[int, ...]) -> None:
    """The effective and permitted sets of this thread become exactly ``capabilities``."""
    data = (_CapData * 2)()
    for cap in capabilities:
        data[cap // 32].effective |= 1 << (cap % 32)
        data[cap // 32].permitted |= 1 << (cap % 32)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def malloc_trim() -> None:
    """Hand freed heap back to the system (glibc keeps per-thread arenas otherwise)."""
    try:
        _libc.malloc_trim(0)
    except AttributeError:
        pass  # not glibc


def syncfs_fd(fd: int) -> None:
    """Flush the whole file system that holds the open directory ``fd``."""
    _check(_libc.syncfs(fd), "syncfs")


def mount_filesystem(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) of a new file system (a FUSE mount made before giving up root)."""
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                       data.encode()), "mount")
