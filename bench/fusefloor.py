"""Part "fusefloor": what pyfuse3 itself costs for the warm-tree workloads (metrics 3a, 4b, 5).

``FloorFS`` serves a directory tree read-only through pyfuse3 doing the least work per request
the library allows: every attribute, listing and link target is read once at mount time, and
each handler is a dict lookup (``open`` makes no system call; ``read`` preads from a
descriptor kept open). The part mounts the big package's store tree through it and through
lazymount, and runs the workloads of ``bench_warm_tree`` side by side with the tree itself:
the floor's ratio is the best any pyfuse3 filesystem reaches on this machine.

``python -m bench.fusefloor TREE MOUNTPOINT`` serves ``TREE`` at ``MOUNTPOINT`` until unmounted.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from lazymount.daemon import raise_readahead
from lazymount.serve.session import MAX_TASKS, MIN_TASKS

from .harness import short_dir

TIMEOUT = 24 * 3600.0


class FloorFS(pyfuse3.Operations):
    """A read-only pyfuse3 passthrough with everything answered from memory."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, top: Path):
        super().__init__()
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.children: dict[int, dict[bytes, int]] = {}
        self.listings: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        self.links: dict[int, bytes] = {}
        self.paths: dict[int, bytes] = {}
        self.fds: dict[int, int] = {}
        self.next_inode = pyfuse3.ROOT_INODE
        self._add(os.fsencode(top))

    def _add(self, path: bytes) -> int:
        """Read ``path`` (and below it) into the tables; returns its inode."""
        ino, self.next_inode = self.next_inode, self.next_inode + 1
        st = os.lstat(path)
        attr = pyfuse3.EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(attr, name, getattr(st, name))
        attr.st_ino, attr.st_blksize = ino, 1 << 17
        attr.entry_timeout = attr.attr_timeout = TIMEOUT
        self.attrs[ino], self.paths[ino] = attr, path
        if stat.S_ISLNK(st.st_mode):
            self.links[ino] = os.readlink(path)
        elif stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(path))
            self.children[ino] = {name: self._add(os.path.join(path, name)) for name in names}
            self.listings[ino] = [(name, self.attrs[self.children[ino][name]]) for name in names]
        return ino

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        ino = self.children[parent_inode].get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs[ino]

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self.attrs[inode]

    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return self.links[inode]

    async def opendir(self, inode: int, ctx: Any = None) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self.listings[fh]
        for index in range(start_id, len(listing)):
            name, attr = listing[index]
            if not pyfuse3.readdir_reply(token, name, attr, index + 1):
                return

    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        fd = self.fds.get(fh)
        if fd is None:
            fd = self.fds[fh] = os.open(self.paths[fh], os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(fd, size, off)


def serve(top: Path, mountpoint: Path) -> None:
    """Serve ``top`` at ``mountpoint`` with lazymount's mount options, read-ahead and number
    of worker tasks."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one descriptor per file read
    pyfuse3.init(FloorFS(top), str(mountpoint), {"fsname=fusefloor", "ro", "default_permissions"})
    try:
        trio.run(_main, str(mountpoint))
    finally:
        pyfuse3.close(unmount=os.path.ismount(mountpoint))


async def _main(mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_raise_readahead, mountpoint)
        await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)


async def _raise_readahead(mountpoint: str) -> None:
    await trio.to_thread.run_sync(raise_readahead, mountpoint)


class FloorMount:
    """``FloorFS`` over ``top`` in a child process, at a fresh mount point."""

    def __init__(self, top: Path):
        self.top = top
        self.root = short_dir("lmf")
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> FloorMount:
        self.process = subprocess.Popen([sys.executable, "-m", "bench.fusefloor", str(self.top),
                                         str(self.root)])
        while not os.path.ismount(self.root):
            if self.process.poll() is not None:
                raise RuntimeError("the floor filesystem did not mount")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.root)], check=False)
        if self.process is not None:
            self.process.wait(30)
        os.rmdir(self.root)


def compare(workloads: dict[str, Callable[[Path], float]], bases: dict[str, Path],
            reps: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of each workload over each base, ``reps`` times, interleaved (base after base)
    after one untimed pass that caches pages, entries and attributes everywhere."""
    times: dict[str, dict[str, list[float]]] = {}
    for name, workload in workloads.items():
        for base in bases.values():
            workload(base)
        times[name] = {label: [] for label in bases}
        for _ in range(reps):
            for label, base in bases.items():
                times[name][label].append(workload(base))
    return times


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]))
