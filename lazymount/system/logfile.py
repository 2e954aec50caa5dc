"""The daemon's log file, opened so that no one can redirect it: never through a symbolic
link (``O_NOFOLLOW``), only a plain file with one name, owned by the daemon's user or root,
and made readable by its group at most (mode 0640): mirror URLs and errors are no one
else's business."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lazymount.errors import UnsafePathError
from lazymount.system.ownership import describe, user_name

LOG_MODE = 0o640


def open_log(path: Path, owner: int | None = None) -> int:
    """An fd appending to ``path`` (created with mode 0640). Raises UnsafePathError for a
    link, a file that is not plain, has other names (hard links) or another owner."""
    owner = os.geteuid() if owner is None else owner
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, LOG_MODE)  # no waiting on a planted FIFO
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePathError(f"refusing the log {path}: it is a symbolic link; remove "
                                  "it") from None
        raise UnsafePathError(f"cannot open the log {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "it is not a plain file"
    elif st.st_nlink != 1:
        problem = "it has other names (hard links)"
    elif st.st_uid not in (0, owner):
        problem = f"it must be owned by {user_name(owner)} or root"
    if problem is not None:
        os.close(fd)
        raise UnsafePathError(f"refusing the log {describe(str(path), st)}; {problem}; "
                              "remove it")
    os.set_blocking(fd, True)
    if st.st_mode & 0o027:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o027)  # an older, world-readable log
    return fd
