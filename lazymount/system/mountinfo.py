"""The mounts of this process's mount namespace, from ``/proc/self/mountinfo``.

Read from the kernel's table rather than by stat: a stat of a FUSE mount whose daemon does
not answer (not yet, or no longer) would hang. Blocking (a small file of /proc).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
FSTYPE = "fuse.lazymount"  # the file system type of our own mounts


@dataclass(frozen=True)
class Mount:
    point: str  # where it is mounted
    device: str  # "major:minor"
    fstype: str  # e.g. "fuse.lazymount", "ext4"


def mounts() -> list[Mount]:
    """Every mount, in the kernel's order (later mounts stack on earlier ones)."""
    found = []
    for line in MOUNTINFO.read_text().splitlines():
        fields = line.split()
        # fields: id parent major:minor root point options [optional...] - fstype source ...
        separator = fields.index("-")
        found.append(Mount(unescape(fields[4]), fields[2], fields[separator + 1]))
    return found


def mounts_below(path: str) -> list[str]:
    """Mount points strictly below ``path``, deepest first."""
    below = os.path.realpath(path).rstrip("/") + "/"
    found = [m.point for m in mounts() if m.point.startswith(below)]
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def fuse_device(root: str) -> str | None:
    """The "major:minor" of the FUSE mount at ``root`` (the last one: mounts stack)."""
    device = None
    for mount in mounts():
        if mount.point == root and mount.fstype.startswith("fuse"):
            device = mount.device
    return device


def lazymount_mounts() -> list[str]:
    """The mount points of lazymount file systems in this namespace."""
    return [m.point for m in mounts() if m.fstype == FSTYPE]


def is_mounted(root: str, fstype: str) -> bool:
    """True if a file system of type ``fstype`` is mounted at ``root``."""
    return any(m.point == root and m.fstype == fstype for m in mounts())


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace(
        "\\012", "\n").replace("\\134", "\\")
