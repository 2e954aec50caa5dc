"""Giving up root: switch to an unprivileged user, keeping only the capabilities asked for.

Linux keeps capabilities per thread, so this is done while the process has one thread (before
any worker thread, gpg or trio starts); every later thread and child inherits the result.
After it the process cannot gain privileges again (``no_new_privs``): a setuid program such
as fusermount3 runs as the user, and an exec'd program (gpg) has no capabilities at all.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pwd
import threading
from collections.abc import Callable
from dataclasses import dataclass

from lazymount.errors import UsageError
from lazymount.system import libc

CAP_SYS_ADMIN = 21
PR_CAPBSET_DROP = 24
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


# The account a daemon started as root switches to when no --user is given. The variable
# names another (the tests keep root with it: their folders are root's alone).
DEFAULT_USER = os.environ.get("LAZYMOUNT_DEFAULT_USER") or "lazymount"


def create_account_hint(name: str) -> str:
    return f"useradd --system --user-group --shell /usr/sbin/nologin {name}"


def daemon_account(user: str | None) -> Account | None:
    """The account the daemon runs as: ``user`` (--user) when given; started as root
    without it, DEFAULT_USER if that account exists; else None (it stays as it is).
    UsageError for a ``user`` that does not exist."""
    if user is not None:
        return lookup_user(user)
    if os.geteuid() != 0:
        return None
    try:
        return lookup_user(DEFAULT_USER)
    except UsageError:
        return None


def lookup_user(name: str) -> Account:
    """The account ``name`` (or a numeric uid); UsageError if there is none."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"there is no user {name!r} to run the daemon as (create it: "
                         f"{create_account_hint(name)})") from None
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 40


def drop_privileges(account: Account, keep: tuple[int, ...] = (CAP_SYS_ADMIN,)) -> None:
    """Become ``account`` for good, keeping the capabilities ``keep``. Raises OSError."""
    if threading.active_count() != 1:
        raise RuntimeError("privileges must be dropped before any thread starts")
    try:
        for cap in range(_last_cap() + 1):  # no exec'd program can get others back
            if cap not in keep:
                libc.prctl(PR_CAPBSET_DROP, cap)
    except OSError:
        pass  # no CAP_SETPCAP (systemd's CapabilityBoundingSet bounds us already)
    libc.prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    with contextlib.suppress(OSError):
        libc.prctl(PR_SET_KEEPCAPS, 0)
    libc.capset(keep)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1)


def capabilities_of(pid: int | str = "self") -> dict[str, int]:
    """CapEff/CapPrm/CapBnd and the uids of a process, from /proc (for status and tests)."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
                found[key] = int(value, 16)
            elif key == "Uid":
                found["euid"] = int(value.split()[1])
    return found


class RootHelper:
    """A child process that keeps uid 0, with no capabilities, to run ``action`` once when
    asked: for a root-owned file the unprivileged daemon must write once (the mount's
    read-ahead in sysfs). Made before privileges are dropped; it reads nothing but one byte
    from the daemon, and exits without running ``action`` if the daemon closes the pipe."""

    def __init__(self, action: Callable[[], None]):
        read_fd, self._pipe = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the helper
            status = 1
            try:
                os.close(self._pipe)
                libc.capset(())
                with contextlib.suppress(OSError):
                    libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
                if os.read(read_fd, 1) == b"1":
                    action()
                status = 0
            finally:
                os._exit(status)
        os.close(read_fd)

    def run(self) -> None:
        """Ask the helper to act, and wait for it (blocking: a worker thread)."""
        self._finish(b"1")

    def close(self) -> None:
        self._finish(b"")

    def _finish(self, word: bytes) -> None:
        if self._pipe < 0:
            return
        try:
            os.write(self._pipe, word)
        except OSError:
            pass
        os.close(self._pipe)
        self._pipe = -1
        os.waitpid(self.pid, 0)


# Modules imported on first use, deep in libraries (codecs by name, resource readers, the
# archspec CPU database): loaded while the files of the interpreter are surely readable,
# since the daemon's user may not reach them (an interpreter under a private home).
PRELOAD = ("encodings.latin_1", "encodings.ascii", "encodings.idna", "encodings.utf_8",
           "encodings.utf_8_sig", "encodings.utf_16", "encodings.utf_32", "encodings.cp437",
           "encodings.unicode_escape", "encodings.raw_unicode_escape", "importlib.readers",
           "importlib.resources.readers", "stringprep", "unicodedata", "archspec.cpu")


def preload(names: tuple[str, ...] = PRELOAD) -> None:
    """Import ``names`` now (missing ones are skipped)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
