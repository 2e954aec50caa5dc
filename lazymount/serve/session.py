"""The FUSE session around an ``InstallTreeFS``: mount it, serve requests, end and close.

Thin on purpose: it keeps pyfuse3 inside ``serve`` so the daemon speaks of mounting, not of
the library that does it.
"""

from __future__ import annotations

import os

import pyfuse3

from lazymount.errors import UsageError
from lazymount.serve.fs import InstallTreeFS
from lazymount.system import libc

# Enough concurrent handlers that a slow materialization never starves plain reads.
MIN_TASKS = 4
MAX_TASKS = 256


def mount(operations: InstallTreeFS, root: str, options: set[str],
          device: int | None = None) -> None:
    """Make the kernel mount at ``root``, or serve the one ``premount`` made (``device``).
    Raises UsageError naming what the kernel refused."""
    try:
        pyfuse3.init(operations, root if device is None else f"/dev/fd/{device}", options)
    except RuntimeError as exc:
        raise UsageError(f"cannot mount on {root}: {exc}") from None


async def serve() -> None:
    """Answer requests until ``terminate()`` or until the mount goes away (``fusermount3 -u``)."""
    await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)


def close(unmount: bool) -> None:
    pyfuse3.close(unmount=unmount)


def terminate() -> None:
    """Make ``serve()`` return; safe to call from a signal-handling task."""
    pyfuse3.terminate()


def premount(root: str, options: set[str], uid: int, gid: int) -> int:
    """Make the kernel mount at ``root`` now (needs CAP_SYS_ADMIN), for a daemon that runs
    as ``uid``/``gid`` from here on; returns the open /dev/fuse descriptor, which ``mount``
    then takes instead of mounting (libfuse's ``/dev/fd/N``). Raises UsageError."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)  # close-on-exec; pyfuse3 keeps it
    except OSError as exc:
        raise UsageError(f"cannot open /dev/fuse: {exc.strerror}") from None
    data = [f"fd={fd}", "rootmode=40000", f"user_id={uid}", f"group_id={gid}"]
    data += sorted(o for o in options if o in ("allow_other", "default_permissions"))
    source = next((o.split("=", 1)[1] for o in options if o.startswith("fsname=")), "fuse")
    subtype = next((o.split("=", 1)[1] for o in options if o.startswith("subtype=")), "")
    flags = libc.MS_NOSUID | libc.MS_NODEV | (libc.MS_RDONLY if "ro" in options else 0)
    try:
        libc.mount_filesystem(source, root, f"fuse.{subtype}" if subtype else "fuse", flags,
                              ",".join(data))
    except OSError as exc:
        os.close(fd)
        raise UsageError(f"cannot mount on {root}: {exc.strerror or exc}") from None
    return fd


def unmount(root: str) -> None:
    """Detach the mount at ``root`` (a premounted one: libfuse does not know its path)."""
    try:
        libc.umount2(root, libc.MNT_DETACH)
    except OSError:
        pass  # already gone (fusermount3 -u, lazymount umount)
