"""Which files under some directories running processes hold, as the kernel shows it.

A process holds a file by running it (``/proc/PID/exe``), by working or being rooted in a
directory (``cwd``, ``root``), by an open descriptor (``fd/``), or by a mapping (``maps``: a
shared library stays mapped after its descriptor is closed). Processes whose entries cannot
be read (another user's, without the privilege to look) are skipped; what they hold through
a FUSE mount still shows as the mount's open handles.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

PROC = "/proc"
_LINKS = ("exe", "cwd", "root")
_DELETED = " (deleted)"


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root + "/") for root in roots)


def _links(pid: str) -> Iterable[str]:
    base = f"{PROC}/{pid}"
    for name in _LINKS:
        try:
            yield os.readlink(f"{base}/{name}")
        except OSError:
            pass
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        return
    for fd in fds:
        try:
            yield os.readlink(f"{base}/fd/{fd}")
        except OSError:
            pass


def _mapped(pid: str) -> Iterable[str]:
    try:
        with open(f"{PROC}/{pid}/maps", "rb") as handle:
            data = handle.read()
    except OSError:
        return
    for line in data.splitlines():
        # address perms offset dev inode [path]: the path is the sixth field, may hold spaces
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(b"/"):
            yield os.fsdecode(fields[5])


def paths_in_use(roots: Iterable[str]) -> set[str]:
    """Every path at or below one of ``roots`` (absolute, without links: they are compared
    as the kernel spells paths, and never resolved, so a FUSE daemon may ask about its own
    mount) that some process holds. Blocking: reads every process's entries (a few ms per
    hundred processes)."""
    wanted = tuple(r.rstrip("/") or "/" for r in roots)
    found: set[str] = set()
    for pid in os.listdir(PROC):
        if not pid.isdigit():
            continue
        for path in (*_links(pid), *_mapped(pid)):
            path = path.removesuffix(_DELETED)
            if _under(path, wanted):
                found.add(path)
    return found
