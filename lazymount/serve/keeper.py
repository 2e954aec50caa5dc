"""The daemon's side of a bounded store: what is in use, eviction, gc, fsck and preload.

A package is in use, and never evicted, while it is materializing, while a file of it is
open through the mount (an open file, a running executable and a mapped library all hold a
FUSE handle), or while some process's ``/proc`` entries (``exe``, ``cwd``, ``root``, ``fd/``,
``maps``) name a path inside its prefix or its store tree (this catches working directories
and packages served by ``--bind-ready`` bind mounts). Packages that the store holds for
another mount path (another daemon's) count against the quota but are left to that daemon.

Eviction removes whole packages: the tree leaves the store with one rename, the package is
``absent`` again, and the kernel is told to forget what it cached of it, so the next access
materializes it anew.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import trio

from lazymount.catalog.installtree import InstallTree
from lazymount.errors import UsageError
from lazymount.materialize import Materializer
from lazymount.serve.bindmount import PrefixBinder
from lazymount.serve.fs import InstallTreeFS
from lazymount.store import partial
from lazymount.store.quota import Kept
from lazymount.store.record import checked_tree, summary
from lazymount.system.inuse import paths_in_use
from lazymount.system.sizes import show_size

log = logging.getLogger(__name__)



class StoreKeeper:
    """Eviction and store maintenance for one mount; every method runs on the trio thread."""

    def __init__(self, root: str, operations: InstallTreeFS, binder: PrefixBinder | None):
        self.root = root.rstrip("/")
        self.operations = operations
        self.materializer: Materializer = operations.materializer
        self.usage = self.materializer.usage
        self.binder = binder
        self.lock = trio.Lock()  # one eviction pass at a time
        self.checking = False  # an fsck is running: any user may ask for one, one at a time

    # ---- what is in use ---------------------------------------------------------------

    async def in_use(self) -> set[str]:
        """Store keys that must not be evicted now."""
        busy = self.materializer.materializing() | set(self.operations.open_keys)
        busy.update(key for key, opened in self.materializer.opened.items() if opened.busy())
        store_pkgs = str(self.materializer.store.pkgs)
        paths = await trio.to_thread.run_sync(paths_in_use, [self.root, store_pkgs])
        for path in paths:
            key = self._key_of_path(path)
            if key is not None:
                busy.add(key)
        busy.update(row.key for row in self.usage.kept()
                    if self.materializer.hash_of(row.key) is None)
        return busy

    def _key_of_path(self, path: str) -> str | None:
        key = self.operations.key_of(path)
        if key is not None or not path.startswith(self.root + "/"):
            return key
        parts = path[len(self.root) + 1:].split("/")
        by_path = self.materializer.tree.by_path
        for depth in range(1, len(parts) + 1):
            dag_hash = by_path.get("/".join(parts[:depth]))
            if dag_hash is not None:
                return self.materializer.key(dag_hash)
        return None

    # ---- eviction ------------------------------------------------------------------------

    async def make_room(self, key: str, need: int, label: str) -> None:
        """Called before ``key`` is published: evict what the quota needs, or raise
        StoreFull (nothing evicted then). Without a quota: nothing to do."""
        if self.usage.quota is None:
            return
        async with self.lock:
            busy = await self.in_use()
            busy.discard(key)
            victims = self.usage.fit(key, need, label, busy)
            if victims:
                evicted = await self._evict(victims, busy)
                log.info("%s: made room for %s by evicting %d package(s) (%s); the store "
                         "holds %s of %s", label, show_size(need), len(evicted),
                         show_size(sum(row.disk_bytes for row in evicted)),
                         show_size(self.usage.total()), show_size(self.usage.quota or 0))

    async def _evict(self, victims: list[Kept], busy: set[str], force: bool = False
                     ) -> list[Kept]:
        """Evict ``victims`` (checked again just before each: a file may have been opened
        meanwhile); returns those evicted. ``force``: even if in use (fsck --repair)."""
        done = []
        for row in victims:
            dag_hash = self.materializer.hash_of(row.key)
            if dag_hash is None:
                continue
            if not force and (row.key in self.operations.open_keys or row.key in busy):
                continue
            if not await self._unbind(dag_hash, force):
                continue
            if await self.materializer.evict(dag_hash):
                self.operations.forget_package(dag_hash)
                done.append(row)
                if not force:
                    log.info("%s: evicted from the store (%s, last used %s)", row.label,
                             show_size(row.disk_bytes), _when(row.last_used))
        return done

    async def _unbind(self, dag_hash: str, force: bool) -> bool:
        """Remove the --bind-ready bind mount of a package, if it has one; False if the
        kernel says it is busy (and ``force`` is not set)."""
        relative = self.materializer.tree.prefixes.get(dag_hash)
        if self.binder is None or relative is None or relative not in self.binder.bound:
            return True
        return await trio.to_thread.run_sync(self.binder.unbind, relative, force)

    # ---- gc, fsck, preload: asked for through the control socket -------------------------

    async def gc(self, max_size: int | None) -> dict[str, object]:
        """Evict packages not in use, least recently used first, until the store holds at
        most ``max_size`` bytes (default: the low-water mark)."""
        if max_size is None:
            max_size = self.usage.low_water
        if max_size is None:
            raise UsageError("this mount has no store quota: give --max-size SIZE")
        async with self.lock:
            busy = await self.in_use()
            total = self.usage.total()
            victims = []
            for row in self.usage.kept():
                if total <= max_size:
                    break
                if row.key not in busy:
                    victims.append(row)
                    total -= row.disk_bytes
            evicted = await self._evict(victims, busy)
        return {"evicted": [{"label": r.label, "bytes": r.disk_bytes} for r in evicted],
                "freed_bytes": sum(r.disk_bytes for r in evicted),
                "store_bytes": self.usage.total(), "target_bytes": max_size,
                "kept": len(self.usage.kept())}

    async def fsck(self, repair: bool) -> list[dict[str, object]]:
        """Re-hash every ready package of the store against its record; one row per
        package (``damaged``: why, or ""; ``removed``: only packages of this mount are,
        others are left to their mount's daemon)."""
        rows: list[dict[str, object]] = []
        store = self.materializer.store
        for key in await trio.to_thread.run_sync(store.keys):
            if key in self.materializer.materializing():
                continue
            receipt = await trio.to_thread.run_sync(store.receipt, key) or {}
            if partial.is_partial(receipt):  # opened: the files it holds so far
                differences, _ = await trio.to_thread.run_sync(partial.check, store, key, True)
                tree, reason = None, summary(differences)
            else:
                tree, reason = await trio.to_thread.run_sync(checked_tree, store, key, True)
            label = str(receipt.get("label", key))
            if tree is None and not reason and not partial.is_partial(receipt):
                reason = "no valid receipt"
            size = self.usage.size_of(key) or 0
            removed = False
            if reason and repair and self.materializer.hash_of(key) is not None:
                async with self.lock:
                    row = Kept(key, size, 0.0, label)
                    removed = bool(await self._evict([row], set(), force=True))
            if reason:
                log.warning("%s: fsck: %s%s", label, reason,
                            "; removed: it materializes again on access" if removed else "")
            rows.append({"label": label, "key": key, "bytes": size, "damaged": reason,
                         "removed": removed})
        return rows

    def closure(self, specs: list[str]) -> list[dict[str, str]]:
        """The packages ``specs`` name (``name``, ``name@version``, ``name/hashprefix``,
        ``/hashprefix``) and their link/run dependencies, each once: label and path under
        the mount, for ``lazymount preload`` to touch. UsageError for a spec that names
        nothing or more than one package."""
        tree = self.materializer.tree
        roots = [resolve(tree, spec) for spec in specs]
        return [{"label": tree.label(h), "path": tree.prefixes[h], "hash": h}
                for h in closure(tree, roots)]

    def sizes(self, hashes: list[str]) -> dict[str, int | None]:
        """Bytes each package takes in the store (None: not there)."""
        return {h: self.usage.size_of(self.materializer.key(h)) for h in hashes}

    def fill(self, hashes: list[str]) -> list[str]:
        """Complete the packages of ``hashes`` that are opened, in the background; returns
        their labels."""
        started = []
        for dag_hash in hashes:
            opened = self.materializer.opened.get(self.materializer.key(dag_hash))
            if opened is not None and not opened.filling:
                opened.filling = True
                self.materializer.nursery_start(self.materializer.fill, opened)
                started.append(opened.label)
        return started

    def status(self) -> dict[str, object]:
        """The store's part of ``lazymount status``."""
        return {"path": str(self.materializer.store.root), "bytes": self.usage.total(),
                "quota_bytes": self.usage.quota, "packages": len(self.usage.kept())}

    async def command(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        """Answer a control-socket request (``uid`` is the asker's): ``gc`` and
        ``fsck`` with ``repair`` only for root or the daemon's own user."""
        owner = request.get("uid") in (0, os.geteuid())
        if name == "closure":
            specs = request.get("specs")
            if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
                raise UsageError("specs must be a list of strings")
            return {"packages": self.closure(specs)}
        if name == "sizes":
            hashes = request.get("hashes")
            if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
                raise UsageError("hashes must be a list of strings")
            return {"sizes": self.sizes(hashes)}
        if name == "fill":
            hashes = request.get("hashes")
            if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
                raise UsageError("hashes must be a list of strings")
            return {"filling": self.fill(hashes)}
        if name == "gc":
            if not owner:
                raise UsageError("only root or the user the daemon runs as may evict packages")
            max_size = request.get("max_size")
            if max_size is not None and (not isinstance(max_size, int) or max_size < 0):
                raise UsageError("max_size must be a byte count")
            return await self.gc(max_size)
        repair = bool(request.get("repair"))
        if repair and not owner:
            raise UsageError("only root or the user the daemon runs as may repair the store")
        if self.checking:
            raise UsageError("an fsck of this store is running already; ask again once it is "
                             "done")
        self.checking = True
        try:
            return {"packages": await self.fsck(repair), "store": self.status()}
        finally:
            self.checking = False


STORE_COMMANDS = ("gc", "fsck", "closure", "sizes", "fill")


def _when(epoch: float) -> str:
    seconds = max(0.0, time.time() - epoch)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def resolve(tree: InstallTree, spec: str) -> str:
    """The one package of the mount that ``spec`` names: ``name``, ``name@version``,
    ``name/hashprefix`` or ``/hashprefix``. UsageError if none or several match."""
    text = spec.strip()
    name, _, prefix = text.partition("/")
    name, _, version = name.partition("@")
    prefix = prefix.lower()
    matches = []
    for dag_hash in tree.prefixes:
        spec_record = tree.catalog.get(dag_hash)
        if spec_record is None or not dag_hash.startswith(prefix):
            continue
        if name and spec_record.name != name:
            continue
        if version and spec_record.version != version:
            continue
        matches.append(dag_hash)
    if not text or (not name and not prefix):
        raise UsageError(f"{spec!r} is not a spec (name, name@version, name/hash or /hash)")
    if not matches:
        raise UsageError(f"{spec}: no package of the mount matches")
    if len(matches) > 1:
        shown = ", ".join(sorted(tree.label(h) for h in matches)[:5])
        raise UsageError(f"{spec} matches {len(matches)} packages ({shown}...): give "
                         "name@version or name/hash")
    return matches[0]


def closure(tree: InstallTree, roots: list[str]) -> list[str]:
    """``roots`` and every link/run dependency the mount serves, each once, roots first."""
    seen: dict[str, None] = {}
    todo = list(roots)
    while todo:
        dag_hash = todo.pop(0)
        if dag_hash in seen or dag_hash not in tree.prefixes:
            continue
        seen[dag_hash] = None
        spec_record = tree.catalog.get(dag_hash)
        if spec_record is not None:
            todo.extend(spec_record.runtime_deps)
    return list(seen)
