"""Serving ready packages natively: a read-only bind mount of the store tree on the prefix.

A materialized package never changes, so once it is in the store the kernel can serve it
without us: ``mount --bind -o ro pkgs/<key>/tree <mount>/<prefix>`` makes every later path
walk into the prefix land on the store's own file system, and lookups, ``stat``, ``open``
and reads there cost what they cost on local disk (pyfuse3 adds about 60 µs a request, and
cached reads through FUSE go at about half the speed of the page cache). Processes that
already hold FUSE inodes inside the prefix keep using them; both views show the same bytes.

Needs CAP_SYS_ADMIN in the mount's namespace (a root service, ``--bind-ready``); if the
kernel refuses, binding is switched off with one warning and FUSE keeps serving. Bind
mounts sit on top of the FUSE mount, so a plain ``fusermount3 -u`` of it is refused as
busy: ``unmount_below`` (used by ``lazymount umount``) removes them first. The daemon's own
unmount is lazy (MNT_DETACH), which takes the binds with it. FUSE passthrough (libfuse 3.17)
would reach the same speed without root, but Debian 12 ships libfuse 3.14 and pyfuse3 does
not expose it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import threading
from typing import TYPE_CHECKING

from lazymount.errors import UsageError
from lazymount.system import libc, xattrs
from lazymount.system.mountinfo import fuse_device, mounts_below

if TYPE_CHECKING:  # trio is the daemon's: `lazymount umount` and `status` use the rest
    import trio

log = logging.getLogger(__name__)


def bind_readonly(source: str, target: str) -> None:
    """Bind ``source`` on ``target``, then make that mount read-only, nosuid, nodev (a bind
    takes its flags only from a remount). Raises OSError; blocking: a worker thread, since
    resolving ``target`` inside our own mount needs the trio thread to answer."""
    libc.mount(source, target, libc.MS_BIND, "bind")
    try:
        flags = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV
        libc.mount(None, target, flags, "read-only remount")
    except OSError:
        with contextlib.suppress(OSError):
            libc.umount2(target, libc.MNT_DETACH)
        raise


def unmount_below(path: str) -> list[str]:
    """Unmount what is mounted below ``path`` (the binds of a ``--bind-ready`` daemon), so
    that ``path`` itself can be unmounted; returns the ones the kernel refused (busy).
    Blocking."""
    refused = []
    for point in mounts_below(path):
        try:
            libc.umount2(point)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                refused.append(point)
    return refused


DEAD_MOUNT_WAIT = 3.0  # seconds a statfs may take before the mount's daemon counts as hung


def is_dead_mount(root: str) -> bool:
    """True if ``root`` is a FUSE mount whose daemon is gone (killed, crashed): the kernel
    then answers every request on it with ENOTCONN or ECONNABORTED. Asks with statfs: the
    kernel may answer a stat from its cache, a statfs always goes to the daemon. A daemon
    that is there but does not answer (stopped, hung) would keep the statfs waiting for
    good: after DEAD_MOUNT_WAIT seconds that is a UsageError naming ``--abort``."""
    if fuse_device(root) is None:
        return False
    error = _statfs_error(root, DEAD_MOUNT_WAIT)
    if error is None:
        raise UsageError(f"{root}: the daemon of the mount there does not answer (stopped or "
                         f"hung: no answer in {DEAD_MOUNT_WAIT:.0f} s); `lazymount umount "
                         f"--abort {root}` (root) aborts its FUSE connection and detaches it")
    return error in (errno.ENOTCONN, errno.ECONNABORTED)


def _statfs_error(root: str, wait: float) -> int | None:
    """The errno of a statfs of ``root`` (0: it answered), or None if it has not answered
    within ``wait`` seconds. The asking thread is then left behind, blocked until the daemon
    answers or this process ends (a FUSE wait ends when the process is killed)."""
    outcome: list[int] = []

    def ask() -> None:
        try:
            os.statvfs(root)
            outcome.append(0)
        except OSError as exc:
            outcome.append(exc.errno or errno.EIO)

    asking = threading.Thread(target=ask, name="statfs", daemon=True)
    asking.start()
    asking.join(wait)
    return outcome[0] if outcome else None


def clear_dead_mount(root: str) -> bool:
    """Detach the FUSE mount at ``root`` if its daemon is gone (and the bind mounts left on
    it), so that it can be mounted again; True if there was one. Raises OSError if it
    cannot be detached."""
    if not is_dead_mount(root):
        return False
    try:
        libc.umount2(root, libc.MNT_DETACH)
    except OSError:  # not root: the user's fusermount3
        tool = shutil.which("fusermount3") or shutil.which("fusermount")
        if tool is None or subprocess.call([tool, "-u", "-z", root]) != 0:
            raise OSError(errno.EBUSY, f"cannot detach the dead mount at {root}") from None
    return True


class PrefixBinder:
    """Bind-mounts each ready package tree on its prefix under ``root``, once.

    ``request`` is called on the trio thread (by the FUSE layer, when it serves a ready
    prefix); the mount itself runs in a worker thread in ``nursery``.
    """

    def __init__(self, root: str, nursery: trio.Nursery):
        self.root = root.rstrip("/")
        self.bound: dict[str, str] = {}  # relative prefix -> store tree
        self.pending: set[str] = set()
        self.enabled = True
        self.nursery = nursery

    def request(self, relative: str, tree: str) -> None:
        """Bind ``tree`` on ``<root>/<relative>`` in the background, unless done or asked."""
        if not self.enabled or relative in self.bound or relative in self.pending:
            return
        self.pending.add(relative)
        self.nursery.start_soon(self._bind, relative, tree)

    async def _bind(self, relative: str, tree: str) -> None:
        import trio

        target = f"{self.root}/{relative}"
        try:
            await trio.to_thread.run_sync(_mark_ready, tree)
            await trio.to_thread.run_sync(bind_readonly, tree, target)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES) and self.enabled:
                self.enabled = False
                log.warning("cannot bind-mount ready packages (%s); serving them through "
                            "FUSE", exc.strerror)
            elif self.enabled:
                log.warning("%s: not bind-mounted (%s); served through FUSE", relative,
                            exc.strerror)
            return
        finally:
            self.pending.discard(relative)
        self.bound[relative] = tree

    def unbind(self, relative: str, force: bool = False) -> bool:
        """Remove the bind mount of ``relative`` (before its package is evicted); False if
        the kernel refuses because something uses it, unless ``force`` (then it is
        detached and goes once its last user leaves). Blocking."""
        try:
            libc.umount2(f"{self.root}/{relative}", libc.MNT_DETACH if force else 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not mounted (any more)
                return False
        self.bound.pop(relative, None)
        return True


def _mark_ready(tree: str) -> None:
    """The status attribute a bound prefix shows (it is the store tree's own, then)."""
    try:
        os.setxattr(tree, xattrs.STATUS, b"ready")
    except OSError:
        pass  # a store on a file system without user attributes: no status, still served
