"""Whole-file writes that readers never see half done, and reads that refuse huge files.

Blocking: call from worker threads where it matters.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path


class FileTooLarge(OSError):
    """A file larger than the caller allows (errno EFBIG)."""


def write_atomically(target: Path, data: bytes | Iterable[bytes], *, mode: int | None = None,
                     sync: bool = False, mtime: int | None = None, make_parents: bool = False,
                     buffering: int = -1) -> None:
    """Replace ``target`` with ``data`` (bytes, or chunks written as they come) through a
    temporary file beside it, so that a reader sees the old file or the new one, whole.

    ``mode``: the file's permissions (else mkstemp's 0600); ``sync``: fsync before the
    rename (the content survives a crash); ``mtime``: its access and modification time;
    ``make_parents``: create the directory. Raises OSError; nothing is left behind.
    """
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb", buffering=buffering) as handle:
            for chunk in (data,) if isinstance(data, bytes) else data:
                handle.write(chunk)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        if mtime is not None:
            os.utime(temporary, (mtime, mtime))
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}")  # what write_atomically's mkstemp names


def remove_stale_temporaries(directory: Path, older_than: float) -> int:
    """Remove the temporaries ``write_atomically`` left in ``directory`` when the process
    writing them died (a crash between write and rename), if untouched for ``older_than``
    seconds: a younger one may be another process's write in progress. Only regular files
    are removed, never followed links. Returns how many."""
    removed = 0
    limit = time.time() - older_than
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        try:
            if (_TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < limit):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def read_bounded(path: Path | str, limit: int) -> bytes:
    """The whole of ``path``, if it holds at most ``limit`` bytes. Raises FileTooLarge past
    the limit (nothing more than ``limit + 1`` bytes is read), OSError if it cannot be read."""
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data


def climbs_out(link: str, target: str, prefix: str) -> bool:
    """Whether the relative ``target`` of symlink ``link`` (member names, ``prefix`` the
    package's folder, "" for none) ever steps above ``prefix``; an absolute target never
    does (relocation rewrites those)."""
    if target.startswith("/"):
        return False
    depth = link.count("/") - (prefix.count("/") + 1 if prefix else 0)  # link's folder
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False
