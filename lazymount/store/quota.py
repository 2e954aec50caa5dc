"""What the store's packages take on disk, when each was last used, and what to evict.

Sizes are real disk usage (``st_blocks`` of every inode of a tree once, measured when it is
sealed and kept in its receipt), so a remount reads receipts, not trees. The last use of a
package is the modification time of its entry directory ``pkgs/<key>``: kept in memory on
every use and written back at most every ``WRITE_EVERY`` seconds per package (and on
``flush``), so reads cost no writes and the LRU order survives a restart.

Eviction is planned here and carried out by the daemon, which knows what is in use: whole
packages, least recently used first, down to the low-water mark (90 % of the quota) once the
quota would be passed; if even evicting every package that is not in use cannot make room,
nothing is evicted and the new package fails with ENOSPC.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass

from lazymount.errors import StoreFull
from lazymount.store import partial
from lazymount.store.content import Store
from lazymount.system.sizes import show_size

log = logging.getLogger(__name__)

LOW_WATER = 0.9
WRITE_EVERY = 600.0  # seconds between two writes of one package's last use


@dataclass(frozen=True)
class Kept:
    """One published package as the usage table sees it."""

    key: str
    disk_bytes: int
    last_used: float
    label: str


class StoreUsage:
    """Disk usage and last use of every published package of one store. Thread-safe."""

    def __init__(self, store: Store, quota: int | None = None):
        self.store = store
        self.quota = quota
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        self._labels: dict[str, str] = {}
        self._used: dict[str, float] = {}
        self._written: dict[str, float] = {}  # last use as it is on disk
        self._reserved: dict[str, int] = {}  # packages between fitting and publishing

    @property
    def low_water(self) -> int | None:
        return None if self.quota is None else int(self.quota * LOW_WATER)

    def load(self) -> None:
        """Read every published package's size and last use (its receipt and entry)."""
        for key in self.store.keys():
            self.found(key)

    def found(self, key: str) -> int | None:
        """Add a published package (read from its receipt); its size or None if it has none."""
        receipt = self.store.receipt(key)
        if receipt is None:
            return None
        size = receipt.get("disk_bytes")
        if partial.is_partial(receipt):  # what it holds now, not what it held when opened
            size = partial.check(self.store, key, content=False)[1].disk_bytes + 3 * 4096
        if not isinstance(size, int) or size < 0:
            return None  # published before records existed: not served, re-materialized
        try:
            used = os.stat(key, dir_fd=self.store.pkgs_fd, follow_symlinks=False).st_mtime
        except OSError:
            return None
        with self._lock:
            self._sizes[key] = size
            self._labels[key] = str(receipt.get("label", key))
            self._used[key] = self._written[key] = used
        return size

    def published(self, key: str, disk_bytes: int, label: str) -> None:
        now = time.time()
        with self._lock:
            self._reserved.pop(key, None)
            self._sizes[key] = disk_bytes
            self._labels[key] = label
            self._used[key] = now
            self._written[key] = now  # publishing just set the entry's mtime

    def grow(self, key: str, disk_bytes: int) -> None:
        """A partial package took ``disk_bytes`` more (a file fetched into it)."""
        with self._lock:
            if key in self._sizes:
                self._sizes[key] += disk_bytes

    def forget(self, key: str) -> None:
        with self._lock:
            for table in (self._sizes, self._labels, self._used, self._written,
                          self._reserved):
                table.pop(key, None)

    def release(self, key: str) -> None:
        """A reservation that will not be published (the package failed)."""
        with self._lock:
            self._reserved.pop(key, None)

    def touch(self, key: str) -> None:
        """The package was used now. Cheap: writes to disk at most every WRITE_EVERY s."""
        now = time.time()
        if key not in self._used:
            return
        self._used[key] = now
        if now - self._written.get(key, 0.0) >= WRITE_EVERY:
            self._write(key, now)

    def flush(self) -> None:
        """Write back every last use that moved since it was written (at unmount)."""
        for key, used in list(self._used.items()):
            if used > self._written.get(key, 0.0):
                self._write(key, used)

    def _write(self, key: str, used: float) -> None:
        self._written[key] = used
        try:
            os.utime(key, (used, used), dir_fd=self.store.pkgs_fd, follow_symlinks=False)
        except OSError:
            pass  # evicted meanwhile, or a read-only store: the order is kept in memory

    def total(self) -> int:
        """Bytes of the published packages plus those reserved for ones being published."""
        with self._lock:
            return sum(self._sizes.values()) + sum(self._reserved.values())

    def kept(self) -> list[Kept]:
        """Every published package, least recently used first."""
        with self._lock:
            rows = [Kept(k, s, self._used.get(k, 0.0), self._labels.get(k, k))
                    for k, s in self._sizes.items()]
        return sorted(rows, key=lambda row: (row.last_used, row.key))

    def size_of(self, key: str) -> int | None:
        return self._sizes.get(key)

    def room(self, busy: Collection[str]) -> int | None:
        """Bytes a new package may take at most: the quota less what cannot be evicted
        (packages in use, reservations). None without a quota."""
        if self.quota is None:
            return None
        with self._lock:
            pinned = sum(s for k, s in self._sizes.items() if k in busy)
            pinned += sum(self._reserved.values())
        return max(0, self.quota - pinned)

    def fit(self, key: str, need: int, label: str, busy: Collection[str]) -> list[Kept]:
        """Reserve ``need`` bytes for ``key``; returns the packages to evict for it (least
        recently used first, down to the low-water mark). Raises StoreFull, evicting
        nothing, if the quota cannot hold it even with every package not in ``busy`` gone."""
        if self.quota is None:
            return []
        with self._lock:
            used = sum(self._sizes.values()) + sum(self._reserved.values())
            if used + need <= self.quota:
                self._reserved[key] = need
                return []
        room = self.room(busy) or 0
        if need > room:
            raise StoreFull(
                f"{label}: needs {show_size(need)} but the store quota of "
                f"{show_size(self.quota)} has only {show_size(room)} left even after "
                "evicting every package not in use")
        victims: list[Kept] = []
        target = min(self.low_water or 0, self.quota - need) if need <= (self.low_water or 0) \
            else self.quota - need
        for row in self.kept():
            if used <= target:
                break
            if row.key in busy or row.key == key:
                continue
            victims.append(row)
            used -= row.disk_bytes
        with self._lock:
            self._reserved[key] = need
        return victims

    def evicting(self, key: str) -> None:
        """``key`` is being removed: it no longer counts."""
        self.forget(key)
