"""Trusting a directory like ssh's StrictModes: nobody but its owner can change what is in it.

A directory is trusted when it and every directory above it, up to ``/``, is owned by root or
the expected owner and writable by no one else. Above the checked directory a root-owned
sticky directory (``/tmp``) is fine: others may add entries there, but not replace ours. A
symbolic link on the way is followed only where it sits in a trusted directory (so only a
trusted user could have made it), and its target is checked the same way.

The expected owner is a parameter: the daemon's own user for its store, or the user of the
node that fills a shared store.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

from lazymount.errors import UnsafePathError, UsageError

MAX_LINKS = 40  # as the kernel: more links than this on one path is a loop


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def describe(path: str, st: os.stat_result) -> str:
    """``/x is owned by alice (uid 1001), mode 0777 (drwxrwxrwx)``."""
    mode = stat.S_IMODE(st.st_mode)
    return (f"{path} is owned by {user_name(st.st_uid)} (uid {st.st_uid}), mode {mode:04o} "
            f"({stat.filemode(st.st_mode)})")


def _owners(owner: int) -> str:
    return "root" if owner == 0 else f"{user_name(owner)} or root"


def unsafe_reason(st: os.stat_result, owner: int, ancestor: bool = False) -> str | None:
    """Why an entry with ``st`` could be changed by someone other than root and ``owner``,
    or None. ``ancestor``: a directory above the one checked (a root sticky dir is fine)."""
    if st.st_uid not in (0, owner):
        return f"it must be owned by {_owners(owner)}"
    if st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode):
        if ancestor and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
            return None
        return "it must be writable by its owner only"
    return None


def check_trusted_dir(path: Path, owner: int, what: str, parent_of: Path | None = None) -> str:
    """Check ``path`` (absolute) and every directory above it; returns the real path.

    Raises UnsafePathError naming the first offending path, its owner and mode, and the
    fix. ``what`` names the directory for the message (``the store``); ``parent_of``: the
    directory ``what`` is about to be made in ``path`` (then ``path`` may be sticky)."""
    shown = parent_of or path
    if not path.is_absolute():
        raise UnsafePathError(f"{what} {path} is not an absolute path")
    done = "/"
    _check_one(done, owner, what, shown, ancestor=True)
    pending = [part for part in path.parts[1:] if part not in ("", ".")]
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            done = os.path.dirname(done) or "/"
            continue
        current = os.path.join(done, part)
        try:
            st = os.lstat(current)
        except OSError as exc:
            raise UnsafePathError(f"{what} {path}: cannot check {current}: "
                                  f"{exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, owner):  # a link others made in a sticky directory
                raise UnsafePathError(f"refusing {what} {path}: {current} is a symbolic "
                                      f"link owned by {user_name(st.st_uid)}")
            links += 1
            if links > MAX_LINKS:
                raise UnsafePathError(f"{what} {path}: too many symbolic links")
            target = os.readlink(current)  # made by a trusted user: its directory is trusted
            if target.startswith("/"):
                done = "/"
            pending = [p for p in Path(target).parts if p not in ("", ".", "/")] + pending
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{what} {path}: {current} is not a directory")
        done = current
        _check_one(done, owner, what, shown, ancestor=bool(pending) or parent_of is not None,
                   st=st)
    return done


def _check_one(current: str, owner: int, what: str, path: Path, ancestor: bool,
               st: os.stat_result | None = None) -> None:
    st = st or os.lstat(current)
    reason = unsafe_reason(st, owner, ancestor)
    if reason is not None:
        raise UnsafePathError(f"refusing {what} {path}: {describe(current, st)}; {reason} "
                              f"({fix(current, st, owner)})")


def fix(path: str, st: os.stat_result, owner: int) -> str:
    """The command that makes ``path`` acceptable, for error messages."""
    steps = []
    if st.st_uid not in (0, owner):
        steps.append(f"chown {user_name(owner)} {path}")
    if st.st_mode & 0o022:
        steps.append(f"chmod go-w {path}")
    return " && ".join(steps) or f"check {path}"


def check_entry(st: os.stat_result, path: str, owner: int, what: str) -> None:
    """One entry inside a trusted directory (``st`` from an lstat, not followed)."""
    reason = unsafe_reason(st, owner)
    if reason is not None:
        raise UnsafePathError(f"refusing {what}: {describe(path, st)}; {reason} "
                              f"({fix(path, st, owner)})")


def check_reachable(path: Path, uid: int, gid: int, what: str, name: str) -> None:
    """Refuse ``path`` (the store: also itself, if it exists) when the user ``uid`` (group
    ``gid``, no other groups: what the daemon keeps) may not search a directory on the way
    to it: the daemon could not use it after giving up root. Only the mode bits are read
    (no ACLs). Raises UsageError naming the directory and the fix."""
    real = Path(os.path.realpath(path))
    directories = [*reversed(real.parents)]
    if what == "the store" and real.is_dir():
        directories.append(real)
    for directory in directories:
        try:
            st = os.stat(directory)
        except OSError:
            return  # missing: made later, or refused by the check that needs it
        who, bit = (("u", 0o100) if st.st_uid == uid else ("g", 0o010) if st.st_gid == gid
                    else ("o", 0o001))
        if not st.st_mode & bit:
            raise UsageError(
                f"refusing {what} {path}: the daemon runs as {name}, who cannot reach it: "
                f"{describe(str(directory), st)} (let {name} in: chmod {who}+x {directory}; or "
                f"choose another {what.removeprefix('the ')}; or keep root: --user root)")


def walk_nofollow(dir_fd: int, prefix: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below the directory ``dir_fd`` with its lstat, parents before children.
    Never follows a symbolic link, not even to stat it: a link in a package tree may point
    into the very mount this process serves. Raises OSError."""
    with os.scandir(dir_fd) as entries:
        listed = [(entry.name, entry.stat(follow_symlinks=False)) for entry in entries]
    for name, st in listed:
        path = os.path.join(prefix, name)
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=dir_fd)
            try:
                yield from walk_nofollow(fd, path)
            finally:
                os.close(fd)
