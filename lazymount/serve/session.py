"""The FUSE session around an ``InstallTreeFS``: mount it, serve requests, end and close.

Thin on purpose: it keeps pyfuse3 inside ``serve`` so the daemon speaks of mounting, not of
the library that does it.
"""

from __future__ import annotations

import pyfuse3

from lazymount.errors import UsageError
from lazymount.serve.fs import InstallTreeFS

# Enough concurrent handlers that a slow materialization never starves plain reads.
MIN_TASKS = 4
MAX_TASKS = 256


def mount(operations: InstallTreeFS, root: str, options: set[str]) -> None:
    """Make the kernel mount at ``root``. Raises UsageError naming what the kernel refused."""
    try:
        pyfuse3.init(operations, root, options)
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
