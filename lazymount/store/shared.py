"""A store on a shared file system (NFS, Lustre, GPFS), used by many nodes at once.

It is laid out like a local store (``pkgs/``, ``staging/``, ``trash/``) plus ``claims/``.
Publication is the local store's: one rename of a finished staging directory. Nothing here
takes a lock (no ``flock``/``fcntl``, which parallel file systems do slowly or not at all):

* **claims** - a node about to materialize a package makes ``claims/<key>`` with ``mkdir``,
  which succeeds on exactly one node (it is atomic on every POSIX file system, NFS
  included). The others see the claim and wait for ``pkgs/<key>`` to appear, looking after
  ``POLL`` seconds, then less and less often (up to ``MAX_POLL``). The holder touches its
  claim every ``HEARTBEAT`` seconds while it works; a claim whose time stamp has not moved
  for ``STALE`` seconds of the waiter's own clock (so clocks of different nodes never get
  compared) belongs to a dead node and is renamed away, once, by whichever waiter renames
  it first. A claim is only a way to save work:
  if two nodes ever materialize the same package, the first rename wins and the other tree
  is dropped, as in a local store.
* **staging names carry the host**: a sweep removes what dead processes of *this* host
  left, and other hosts' leftovers only once they are a day old.
* **read-only nodes**: when the store cannot be written here (a read-only mount, no
  permission), its published packages are still used, and the packages it lacks are
  materialized into the node's own store (CernVM-FS calls this an alien cache).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from lazymount.errors import StoreError
from lazymount.store.content import _STAGING_NAME, Store, _owner_alive, remove_entry

log = logging.getLogger(__name__)

CLAIMS = "claims"
POLL = 0.5  # seconds before the first look at a package another node materializes...
MAX_POLL = 5.0  # ...growing to this: 10,000 waiting nodes make 2,000 stats/s, not 20,000
HEARTBEAT = 10.0  # seconds between touches of our claims
STALE = 120.0  # seconds a claim may stand still before it is taken for a dead node's
STALE_STAGING = 86400.0  # another host's staging leftovers are removed after a day


def host_tag(name: str | None = None) -> str:
    """This host's name as it appears in staging names (no dots: they separate fields)."""
    return "".join(c if c.isalnum() or c == "-" else "-" for c in name or socket.gethostname())


class SharedStore(Store):
    """A store many nodes use at once; ``writable`` is False on a read-only node."""

    def __init__(self, root: Path, host: str | None = None):
        self.host = host_tag(host)
        self.claims = root / CLAIMS
        self.writable = _can_write(root)
        if self.writable:
            super().__init__(root)
            self.claims.mkdir(exist_ok=True)
            return
        # read-only here: use what is published, create nothing. Trusted if nobody but the
        # user that fills it (its owner) or root can change it
        super().__init__(root, owner=_owner_of(root), writable=False)
        if self.pkgs_fd < 0:
            raise StoreError(f"the shared store {root} is read-only here and holds no "
                             "packages (no pkgs/): a node that can write it must fill it first")

    def staging_name(self, key: str) -> str:
        return f"{key}.{self.host}.{os.getpid()}.{secrets.token_hex(4)}"

    def sweep(self) -> int:
        """Remove this host's dead processes' leftovers, and other hosts' old ones."""
        if not self.writable:
            return 0
        count = 0
        now = time.time()
        for fd in (self.staging_fd, self.trash_fd):
            for name in os.listdir(fd):
                parts = name.split(".")
                ours = len(parts) >= 4 and parts[-3] == self.host
                if ours and _owner_alive(name):
                    continue
                if not ours and fd == self.staging_fd and _age(name, fd, now) < STALE_STAGING:
                    continue
                if not _STAGING_NAME.fullmatch(name):
                    log.warning("%s/%s was not made by lazymount: left as it is", self.root, name)
                    continue
                count += 1
                remove_entry(name, fd)  # never follows a link
        return count

    # ---- claims ------------------------------------------------------------------------

    def claim(self, key: str) -> bool:
        """Claim ``key`` for this node; False if another node holds the claim."""
        try:
            os.mkdir(self.claims / key)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot claim {key} in the shared store: {exc.strerror}") from None
        (self.claims / key / self.host).touch()  # who holds it, for an admin looking
        return True

    def touch_claim(self, key: str) -> None:
        try:
            os.utime(self.claims / key)
        except OSError:
            pass  # broken by a waiter that took us for dead: our rename still decides

    def release(self, key: str) -> None:
        shutil.rmtree(self.claims / key, ignore_errors=True)

    def claim_stamp(self, key: str) -> float | None:
        """The time stamp of the claim on ``key`` (as the file server keeps it), None if
        there is none."""
        try:
            return os.stat(self.claims / key).st_mtime
        except FileNotFoundError:
            return None

    def break_claim(self, key: str, stamp: float) -> None:
        """Remove a claim that stood still (its holder died), if it still is that one."""
        if self.claim_stamp(key) != stamp:
            return
        try:
            target = Path(tempfile.mkdtemp(prefix=f"claim.{self.host}.{os.getpid()}.",
                                           dir=self.trash))
            os.rename(self.claims / key, target / key)  # only one waiter's rename succeeds
        except OSError:
            return
        log.warning("%s: the claim of a node that stopped was removed", key)
        shutil.rmtree(target, ignore_errors=True)


def open_shared_store(root: Path) -> SharedStore:
    """The shared store at ``root``, swept of this host's leftovers; says so when it is
    read-only here. Raises StoreError."""
    shared = SharedStore(root)
    if not shared.writable:
        log.info("shared store %s is read-only here: its packages are used, the ones it "
                 "lacks are materialized into the local store", root)
        return shared
    swept = shared.sweep()
    if swept:
        log.info("removed %d unfinished entries from the shared store", swept)
    return shared


class ClaimWatch:
    """A waiter's view of one claim: whether it stood still for ``STALE`` seconds of our
    own monotonic clock."""

    def __init__(self, stale: float = STALE):
        self.stale = stale
        self.stamp: float | None = None
        self.since = time.monotonic()

    def stood_still(self, stamp: float) -> bool:
        if stamp != self.stamp:
            self.stamp, self.since = stamp, time.monotonic()
            return False
        return time.monotonic() - self.since > self.stale


def _can_write(root: Path) -> bool:
    """True if this process can create entries in the shared store (creating it if need
    be); False on a read-only mount or without permission."""
    with suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
    return os.access(root, os.W_OK) and not _read_only_mount(root)


def _owner_of(path: Path) -> int:
    try:
        return path.stat().st_uid
    except OSError as exc:
        raise StoreError(f"cannot read the shared store {path}: {exc.strerror}") from None


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return True


def _age(name: str, dir_fd: int, now: float) -> float:
    try:
        return now - os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
    except OSError:
        return 0.0
