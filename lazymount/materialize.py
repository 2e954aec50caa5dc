"""Turning a cached spec into a relocated tree in the store, once, on first access.

State per DAG hash: absent -> materializing -> ready | failed (retried after a pause).
Concurrent callers of ``ensure`` for the same hash share one attempt (single flight).
Runs on the trio thread; blocking stages (gpg, extraction, relocation, publish) run in
worker threads under named limiters. The install pipeline (extraction, relocation,
TOCs) is imported on the first access, in a worker thread: a mount serves listings
without it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from lazymount.buildcache.fetch import stream_blob
from lazymount.buildcache.formats import Entry, discover
from lazymount.buildcache.index import SpecRecord
from lazymount.buildcache.manifest import BlobRecord
from lazymount.buildcache.ocitoc import RegistryPublished
from lazymount.catalog.installtree import InstallTree
from lazymount.errors import (
    IntegrityError,
    LazymountError,
    MirrorError,
    MountPathTooLong,
    Withdrawn,
)
from lazymount.install.limits import Limits
from lazymount.mirror.transport import Mirror
from lazymount.store import partial
from lazymount.store.content import Store
from lazymount.store.quota import StoreUsage
from lazymount.store.record import checked_tree, seal, summary
from lazymount.store.shared import HEARTBEAT, MAX_POLL, POLL, ClaimWatch, SharedStore
from lazymount.system.redact import redact
from lazymount.system.sizes import show_size
from lazymount.trust.policy import MirrorTrust

if TYPE_CHECKING:
    from lazymount.install import extract
    from lazymount.install.buildinfo import BuildInfo
    from lazymount.opened import FoundToc, Opened

# imported by the first access (``load_pipeline``), not at mount
PIPELINE = ("lazymount.install.extract", "lazymount.install.relocate",
            "lazymount.install.sbang", "lazymount.opened")

log = logging.getLogger(__name__)

RETRY_AFTER = 30.0  # seconds a failed package answers with its error before trying again


@dataclass
class MirrorSource:
    """A mirror as the materializer uses it: where the bytes are, and what its signed
    documents must carry to be believed."""

    mirror: Mirror
    trust: MirrorTrust


@dataclass
class _State:
    done: trio.Event = field(default_factory=trio.Event)
    tree: Path | None = None
    error: LazymountError | None = None
    failed_at: float = 0.0  # trio.current_time() of the failure: a test clock can move it


def root_digest(tree: InstallTree) -> str:
    """A fixed key per mount root + projection: the relocated bytes depend on both."""
    return hashlib.sha256(f"{tree.root}\0{tree.projection}".encode()).hexdigest()[:10]


class Materializer:
    """Knows how to bring any spec of the tree into the store."""

    def __init__(
        self,
        tree: InstallTree,
        sources: list[MirrorSource],
        store: Store,
        limits: Limits | None = None,
        shared: SharedStore | None = None,
        nursery: trio.Nursery | None = None,
        usage: StoreUsage | None = None,
    ):
        """``nursery``: where attempts and prefetches run, so that no caller's cancellation
        aborts them; without one, the first caller runs an attempt and nothing is
        prefetched."""
        self.tree = tree
        self.sources = sources
        self.store = store
        self.shared = shared  # a store other nodes fill too: looked in first
        self.limits = limits or Limits()
        self.usage = usage or StoreUsage(store)  # the local store: sizes, last uses, quota
        # set by the daemon when there is a quota: evicts what it must so that a new
        # package of so many bytes fits, or raises StoreFull (key, bytes, label)
        self.make_room: Callable[[str, int, str], Awaitable[None]] | None = None
        self.evicting: dict[str, trio.Event] = {}  # hash -> set once its tree is gone
        self.sbang = f"{tree.root.rstrip('/')}/bin/sbang"
        self.states: dict[str, _State] = {}
        self.cpu = trio.CapacityLimiter(2)  # extraction + relocation threads at once
        self.nursery = nursery
        self.root_digest = root_digest(tree)
        self.toc_places: list[Mirror] = []  # where TOCs are besides each mirror (--toc)
        self.opened: dict[str, Opened] = {}  # store key -> a package opened through its TOC
        self.fill_whole = False  # complete every opened package in the background
        # set by the daemon with a quota: evicts what is not in use down to the low-water
        # mark (an opened package grows file by file, past what it fitted when opened)
        self.trim: Callable[[], Awaitable[object]] | None = None
        self._trimming = False

    def key(self, dag_hash: str) -> str:
        return f"{dag_hash}.{self.root_digest}"

    def swap(self, tree: InstallTree, sources: list[MirrorSource]) -> None:
        """Work from a refreshed index (and its mirrors and trust) from now on. Synchronous,
        so no attempt sees a tree of one index with the mirrors of another; attempts under
        way finish with what they started with; failed packages are tried again on their
        next access. The root and projection stay the same."""
        assert root_digest(tree) == self.root_digest
        self.tree, self.sources = tree, sources
        # what failed may work now (another index, mirror or key): the next access tries
        self.states = {h: state for h, state in self.states.items() if state.error is None}

    def hash_of(self, key: str) -> str | None:
        """The DAG hash of a store key of this mount (root and projection), else None."""
        dag_hash, _, digest = key.partition(".")
        return dag_hash if digest == self.root_digest else None

    def materializing(self) -> set[str]:
        """Store keys of the packages being materialized now."""
        return {self.key(h) for h, state in self.states.items() if not state.done.is_set()}

    async def evict(self, dag_hash: str) -> bool:
        """Remove a ready package from the local store; it is ``absent`` again and a later
        access materializes it anew. False (nothing done) while it is materializing. The
        caller makes sure nothing uses it."""
        state = self.states.get(dag_hash)
        if state is not None and not state.done.is_set():
            return False
        key = self.key(dag_hash)
        gone = self.evicting[dag_hash] = trio.Event()
        self.states.pop(dag_hash, None)
        opened = self.opened.pop(key, None)
        self.usage.forget(key)
        removed = False
        try:
            with trio.CancelScope(shield=True):
                if opened is not None:
                    await trio.to_thread.run_sync(opened.close)
                removed = await trio.to_thread.run_sync(self.store.remove, key)
        finally:
            del self.evicting[dag_hash]
            gone.set()
        return removed

    def ready_tree(self, dag_hash: str) -> Path | None:
        """The store tree if already materialized, without any waiting."""
        state = self.states.get(dag_hash)
        if state is not None and state.tree is not None:
            return state.tree
        return None

    def published(self, key: str, walk: bool = True) -> Path | None:
        """The published tree of ``key`` in the shared store, else in our own, or None.
        ``walk``: check the whole tree, once (see Store.tree); a worker thread then."""
        if self.shared is not None:
            tree = self.shared.tree(key, walk)
            if tree is not None:
                return tree
        return self.store.tree(key, walk)

    def status(self, dag_hash: str) -> str:
        """One word (and the reason, for a failure) for the status xattr and logs."""
        opened = self.opened.get(self.key(dag_hash))
        if opened is not None and opened.replaced is None:
            return f"opened: {opened.describe()}"
        state = self.states.get(dag_hash)
        if state is None:
            if partial.is_partial(self.store.receipt(self.key(dag_hash))):
                return "opened"  # before a restart; opened again on its next access
            return "ready" if self.published(self.key(dag_hash), walk=False) else "absent"
        if state.error is not None:
            return f"failed: {state.error}"
        return "ready" if state.tree is not None else "materializing"

    async def ensure(self, dag_hash: str) -> Path:
        """Path of the relocated tree of ``dag_hash``; materializes it on the first call.

        Raises the LazymountError of the attempt (cached for RETRY_AFTER seconds).
        """
        while True:
            while dag_hash in self.evicting:  # its old tree is being deleted: wait for that
                await self.evicting[dag_hash].wait()
            state = self.states.get(dag_hash)
            if state is None or (state.error and
                                 trio.current_time() - state.failed_at > RETRY_AFTER):
                state = self.states[dag_hash] = _State()
                if self.nursery is not None:
                    # in the daemon's nursery, so a caller that is interrupted does not abort
                    # the work other callers wait on
                    self.nursery.start_soon(self._attempt, dag_hash, state)
                else:  # no nursery: the first caller runs it (see _attempt on cancellation)
                    await self._attempt(dag_hash, state)
            await state.done.wait()
            if state.error is not None:
                raise state.error
            if state.tree is not None:
                return state.tree
            # the attempt was cancelled with the caller that ran it: this caller starts anew

    async def _attempt(self, dag_hash: str, state: _State) -> None:
        label = self.tree.label(dag_hash)
        started = time.monotonic()
        try:
            cached = await trio.to_thread.run_sync(self._checked, dag_hash, label)
            if cached is not None:
                state.tree = cached
            elif self.shared is not None and self.shared.writable:
                state.tree = await self._through_shared(dag_hash, label, self.shared)
            else:
                state.tree = await self._materialize(dag_hash, label, self.store)
                log.info("%s: materialized in %.2f s", label, time.monotonic() - started)
            self._prefetch_deps(dag_hash)
        except LazymountError as exc:
            state.error, state.failed_at = exc, trio.current_time()
            message = str(exc)
            log.error("%s", message if message.startswith(label) else f"{label}: {message}")
        except Exception as exc:  # a bug must not take the mount down: log it, answer EIO
            log.exception("%s: unexpected failure", label)
            state.error = LazymountError(f"{label}: internal error: {exc}")
            state.failed_at = trio.current_time()
        except BaseException:  # cancelled: neither ready nor failed, so forget the attempt
            if self.states.get(dag_hash) is state:
                del self.states[dag_hash]
            raise
        finally:
            state.done.set()

    def _checked(self, dag_hash: str, label: str) -> Path | None:
        """Worker thread: the published tree (shared store first), the first time it is
        served after a start, if it still matches its record (one lstat per file). A
        damaged one is not served; in the local store it is removed."""
        key = self.key(dag_hash)
        if self.shared is not None and self.shared.tree(key, walk=False) is not None:
            tree, reason = checked_tree(self.shared, key)
            if tree is not None:
                return tree
            log.warning("%s: not served from the shared store (%s)", label, reason)
        if partial.is_partial(self.store.receipt(key)):
            differences, _ = partial.check(self.store, key, content=False)
            if not differences:
                return None  # opened again through its stored TOC
            tree, reason = None, summary(differences)
        else:
            tree, reason = checked_tree(self.store, key)
        if tree is not None:
            if self.usage.size_of(key) is None:  # published by another daemon meanwhile
                self.usage.found(key)
            return tree
        if reason:
            log.warning("%s: not served from the store (%s): removed; it is materialized "
                        "again", label, reason)
            self.usage.forget(key)
            self.store.remove(key)
        return None

    def _prefetch_deps(self, dag_hash: str) -> None:
        """Start the link/run dependencies that are in the cache, in the background."""
        record = self.tree.catalog.get(dag_hash)
        if self.nursery is None or record is None:
            return
        for dep in record.runtime_deps:
            if dep in self.tree.prefixes and dep not in self.states:
                self.nursery.start_soon(self._prefetch_one, dep)

    async def _prefetch_one(self, dag_hash: str) -> None:
        try:
            await self.ensure(dag_hash)
        except LazymountError:
            pass  # already logged; a user touching it gets the error then

    async def _through_shared(self, dag_hash: str, label: str, shared: SharedStore) -> Path:
        """Materialize into the shared store, unless another node is doing it: then wait
        for its package to be published (or for its claim to go away or stand still)."""
        key = self.key(dag_hash)
        watch: ClaimWatch | None = None
        pause = POLL
        while True:
            tree = await trio.to_thread.run_sync(shared.tree, key)
            if tree is not None:
                return tree
            if await trio.to_thread.run_sync(shared.claim, key):
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._heartbeat, shared, key)
                        # published between our look and our claim?
                        tree = await trio.to_thread.run_sync(shared.tree, key)
                        if tree is None:
                            tree = await self._materialize(dag_hash, label, shared)
                        nursery.cancel_scope.cancel()
                    return tree
                finally:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(shared.release, key)
            if watch is None:
                log.info("%s: another node is materializing it; waiting for it", label)
                watch = ClaimWatch()
            stamp = await trio.to_thread.run_sync(shared.claim_stamp, key)
            if stamp is not None and watch.stood_still(stamp):
                await trio.to_thread.run_sync(shared.break_claim, key, stamp)
                continue
            await trio.sleep(pause)
            pause = min(MAX_POLL, pause * 1.5)

    @staticmethod
    async def _heartbeat(shared: SharedStore, key: str) -> None:
        while True:
            await trio.sleep(HEARTBEAT)
            await trio.to_thread.run_sync(shared.touch_claim, key)

    async def _materialize(self, dag_hash: str, label: str, store: Store) -> Path:
        record = self.tree.catalog.get(dag_hash)
        if record is None:  # a lookup through an inode the kernel kept from an older index
            raise Withdrawn(f"{label}: no longer in the mirrors' index")
        await load_pipeline()
        last: LazymountError = MirrorError(f"no mirror lists {label}")
        sources = self._sources_for(record.mirror)
        for position, source in enumerate(sources):
            try:
                # the mirror's layout (v3, or v2 for old caches) finds and reads the signed
                # documents, asking the mirror's trust to check them; we check that they are
                # of the spec asked for
                layout = await discover(source.mirror)
                entry = await layout.read_entry(source.mirror, record, source.trust, label)
                self._check_signed_spec(entry, dag_hash, record, label)
                if store is self.store:
                    opened = await self._open(source, dag_hash, entry, label)
                    if opened is not None:
                        return opened
                return await self._install(source, dag_hash, entry.tarball, label, store,
                                           entry.signed)
            except (MirrorError, IntegrityError) as exc:
                last = exc  # fail over: another mirror may have an intact copy
                if position + 1 < len(sources):
                    log.warning("%s: %s; trying the next mirror", label, exc)
        raise last

    # ---- packages opened through a table of contents ------------------------------------

    def _places_of_tocs(self, source: MirrorSource) -> list[Mirror]:
        """Where TOCs and their windows are looked for: the mirror itself (a registry keeps
        them under tags, ``buildcache/ocitoc.py``), then each ``--toc`` place. A registry
        is asked only when a key is trusted that could have signed one (its caches are
        mounted --unsigned, often with no key at all)."""
        if source.mirror.kind == "oci":
            own = [RegistryPublished(source.mirror)] if source.trust.trust.verifier else []
            return [*own, *self.toc_places]
        return [source.mirror, *self.toc_places]

    async def _open(self, source: MirrorSource, dag_hash: str, entry: Entry, label: str
                    ) -> Path | None:
        """Open the package through its TOC (the store gets its folders and links, files
        come on first open); None (logged) where there is none or it cannot be used."""
        from lazymount.install import relocate
        from lazymount.opened import Opened, Shape, TocUnusable, find_toc, read_buildinfo

        key = self.key(dag_hash)
        try:
            # opened before a restart: its stored TOC (verified then) and the files it holds
            found, reopened = await trio.to_thread.run_sync(self._stored_toc, key, entry,
                                                            label)
            if found is None:
                found = await find_toc(self._places_of_tocs(source), source.trust.trust,
                                       entry.tarball, label)
            if found is None:
                return None
            opened = Opened(key, label, found, Shape(found.toc, label), source.mirror,
                            entry.tarball, self.store, self._start)
            info = read_buildinfo(opened)
            self._check_root_length(info, label)
            mapping = relocate.prefix_map(info, self.tree.root, self.tree.prefix_of,
                                          self.sbang)
            opened.prepare(info, mapping, self.sbang)
            opened.origin = (source, entry)
            if found.place is None:
                opened.window_places = self._places_of_tocs(source)
            opened.grown = functools.partial(self._grown, key)
            if reopened is None:
                tree = await self._publish_opened(opened, dag_hash, source, label)
            else:
                tree = opened.tree
                opened.present, opened.present_bytes = reopened
        except (TocUnusable, MirrorError) as exc:
            log.warning("%s: its table of contents is not used (%s); it is materialized "
                        "whole", label, exc)
            return None
        self.opened[key] = opened
        log.info("%s: opened through its table of contents (%d files, %s)", label,
                 len(opened.sizes), show_size(sum(opened.sizes.values())))
        if self.fill_whole:
            opened.filling = True
            self._start(lambda: self.fill(opened))
        return tree

    def _stored_toc(self, key: str, entry: Entry, label: str
                    ) -> tuple[FoundToc | None, tuple[set[str], int] | None]:
        """Worker thread: the TOC of a partial package of the store for this tarball, and
        the files (and bytes) its tree holds; (None, None) if there is none."""
        from lazymount.buildcache.toc import parse_toc
        from lazymount.opened import FoundToc

        receipt = self.store.receipt(key)
        if not partial.is_partial(receipt) or receipt is None or \
                receipt.get("tarball") != entry.tarball.checksum:
            return None, None
        plaintext = partial.read_toc(self.store, key, receipt.get("toc"))
        if plaintext is None:
            return None, None
        try:
            toc = parse_toc(plaintext, f"{self.store.pkgs / key / partial.TOC}")
        except LazymountError:
            return None, None
        filled = partial.filled(self.store, key)
        present = {rel for rel in filled
                   if os.path.lexists(self.store.pkgs / key / "tree" / rel)}
        return FoundToc(toc, plaintext, None), (present, sum(filled[r][0] for r in present))

    async def fill(self, opened: Opened) -> None:
        """Fetch every file of an opened package not there yet, one at a time (the files
        being read go first), then complete it (``--fill whole``, ``lazymount preload``)."""
        for rel in opened.shape.files():
            if opened.replaced is not None or self.opened.get(opened.key) is not opened:
                return
            try:
                await self.open_file(opened, rel)
            except LazymountError as exc:
                log.warning("%s: not completed: %s", opened.label, exc)
                return

    async def _complete(self, opened: Opened) -> None:
        """Seal an opened package that holds every file: from now on it is a package like
        one materialized whole."""
        assert opened.origin is not None
        source, entry = opened.origin
        key = opened.key
        origin = {"hash": self.hash_of(key), "signed": entry.signed,
                  "tarball": entry.tarball.checksum}
        receipt = await trio.to_thread.run_sync(self.store.receipt, key)
        if receipt is None or self.opened.get(key) is not opened:
            return
        # files were hashed as they were filled in: read only those with other names
        known = await trio.to_thread.run_sync(partial.filled, self.store, key)
        sealed = await trio.to_thread.run_sync(seal, opened.tree, origin, known)
        await trio.to_thread.run_sync(partial.complete, self.store, key, receipt, sealed)
        if self.opened.get(key) is opened:
            del self.opened[key]
        await trio.to_thread.run_sync(opened.close)
        self.usage.published(key, sealed.disk_bytes + 3 * 4096, opened.label)
        log.info("%s: completed (%d files, %s)", opened.label, sealed.files,
                 show_size(opened.present_bytes))

    def _grown(self, key: str, disk_bytes: int) -> None:
        """An opened package took ``disk_bytes`` more: past the quota, packages not in use
        are evicted down to its low-water mark, in the background."""
        self.usage.grow(key, disk_bytes)
        quota = self.usage.quota
        if (quota is not None and self.usage.total() > quota and self.trim is not None
                and not self._trimming):
            self._trimming = True
            self._start(self._trim)

    async def _trim(self) -> None:
        try:
            assert self.trim is not None
            await self.trim()
        except LazymountError as exc:
            log.warning("the store is over its quota: %s", exc)
        finally:
            self._trimming = False

    def _start(self, work: Callable[[], Awaitable[None]]) -> None:
        assert self.nursery is not None
        self.nursery.start_soon(work)

    def nursery_start(self, work: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``work(*args)`` in the daemon's nursery."""
        assert self.nursery is not None
        self.nursery.start_soon(work, *args)

    async def _publish_opened(self, opened: Opened, dag_hash: str, source: MirrorSource,
                              label: str) -> Path:
        from lazymount.opened import TocUnusable, make_skeleton

        key = opened.key
        staging = await trio.to_thread.run_sync(self.store.new_staging, key)
        try:
            try:
                tree = await trio.to_thread.run_sync(make_skeleton, staging, opened)
            except OSError as exc:  # a name this file system refuses, a full disk...
                raise TocUnusable(f"cannot make its folders and links in the store "
                                  f"({exc.strerror})") from None
            toc_sha256 = await trio.to_thread.run_sync(partial.write_toc, staging,
                                                       opened.plaintext)
            disk_bytes = 4096 * (3 + len(opened.shape.children))
            if self.make_room is not None:
                await self.make_room(key, disk_bytes, label)
            receipt = {"hash": dag_hash, "label": label, "mirror": redact(source.mirror.url),
                       "tarball": opened.tarball.checksum, "root": self.tree.root,
                       "prefix": self.tree.prefix_of(dag_hash), "partial": True,
                       "toc": toc_sha256, "disk_bytes": disk_bytes}
            published = await trio.to_thread.run_sync(
                self.store.publish, staging, tree, key, receipt)
        except BaseException:
            self.usage.release(key)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.store.discard, staging)
            raise
        self.usage.published(key, disk_bytes, label)
        return published

    def partial(self, path: str) -> tuple[Opened, str] | None:
        """The opened package a store path lies in, and the path below its tree."""
        pkgs = f"{self.store.pkgs}/"
        if not self.opened or not path.startswith(pkgs):
            return None
        key, _, rest = path[len(pkgs):].partition("/")
        opened = self.opened.get(key)
        if opened is None or not (rest == "tree" or rest.startswith("tree/")):
            return None
        return opened, rest[5:]

    async def open_file(self, opened: Opened, rel: str) -> None:
        """Make a file of an opened package present; if its TOC fails it, the package is
        materialized whole instead (once, whoever asked first) and this waits for that."""
        from lazymount.opened import TocUnusable

        if opened.replaced is None:
            try:
                await opened.ensure(rel)
                if opened.filled() and not opened.completing:
                    opened.completing = True
                    self._start(lambda: self._complete(opened))
                return
            except TocUnusable as exc:
                if opened.replaced is None:
                    self._replace(opened, str(exc))
        await self.settled(opened)

    async def settled(self, opened: Opened) -> None:
        """Wait for a replacement of ``opened`` under way (nothing if none is)."""
        if opened.replaced is not None:
            await opened.replaced.wait()
            if opened.failure is not None:
                raise opened.failure

    def _replace(self, opened: Opened, reason: str) -> None:
        opened.replaced = trio.Event()
        opened.reason = reason
        message = reason if reason.startswith(opened.label) else f"{opened.label}: {reason}"
        log.warning("%s; its table of contents is not used: it is materialized whole", message)
        self._start(lambda: self._whole(opened))

    async def _whole(self, opened: Opened) -> None:
        """Replace an opened package with the whole tarball's tree (same store path)."""
        assert opened.replaced is not None and opened.origin is not None
        source, entry = opened.origin
        dag_hash = entry.root.get("hash") if isinstance(entry.root, dict) else None
        while opened.busy():  # no new file starts; those under way land in the old tree
            await trio.sleep(0.05)
        try:
            assert isinstance(dag_hash, str)
            await self._install(source, dag_hash, entry.tarball, opened.label, self.store,
                                entry.signed, replace=True)
        except LazymountError as exc:
            opened.failure = exc
            log.error("%s", exc)
            await trio.to_thread.run_sync(self.store.remove, opened.key)
            self.usage.forget(opened.key)
        finally:
            if self.opened.get(opened.key) is opened:
                del self.opened[opened.key]
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(opened.close)
            if opened.failure is not None and isinstance(dag_hash, str):
                failed = self.states[dag_hash] = _State(error=opened.failure,
                                                        failed_at=time.monotonic())
                failed.done.set()
            opened.replaced.set()

    def _sources_for(self, first: int) -> list[MirrorSource]:
        """Every mirror, the one whose index lists the package (position ``first``) first."""
        return [self.sources[first]] + [s for i, s in enumerate(self.sources) if i != first]

    def _check_signed_spec(self, entry: Entry, dag_hash: str, expected: SpecRecord,
                           label: str) -> None:
        """The signed document must be of the hash asked for: its spec's root node must be
        it (the signature does not cover the document's path)."""
        root = entry.root if isinstance(entry.root, dict) else {}
        if root.get("hash") != dag_hash:
            raise IntegrityError(f"{label}: the {entry.signed} is for spec "
                                 f"{root.get('hash')}, not {dag_hash}")
        if root.get("name") != expected.name or str(root.get("version")) != expected.version:
            raise IntegrityError(f"{label}: the {entry.signed}'s spec is {root.get('name')}@"
                                 f"{root.get('version')}, not what the index says")

    async def _install(self, source: MirrorSource, dag_hash: str, tarball: BlobRecord,
                       label: str, store: Store, signed: str, replace: bool = False) -> Path:
        """Download + extract (streamed), relocate, seal (the record), fit into the quota
        (the local store only), publish into ``store``. ``replace``: an opened package of
        the same key is in the store; it goes just before this one is published."""
        from lazymount.install import extract

        key = self.key(dag_hash)
        size = "an unknown size" if tarball.length is None else show_size(tarball.length)
        log.info("%s: fetching %s from %s", label, size, source.mirror.url)
        staging = await trio.to_thread.run_sync(store.new_staging, key)
        local = store is self.store
        # with a quota, a package bigger than it can ever hold stops early
        limits = dataclasses.replace(self.limits, room=self.usage.room(()) if local else None)
        try:
            async with self.cpu:
                extracted = await stream_blob(
                    source.mirror, tarball, label,
                    lambda reader: extract.extract_tarball(
                        reader, tarball.compression, staging, limits, label),
                    # a v2 tarball has no signed length: bound it like its expanded size
                    max_bytes=self.limits.max_bytes,
                )
                changed = await trio.to_thread.run_sync(
                    self._relocate, dag_hash, extracted, label)
                origin = {"hash": dag_hash, "signed": signed, "tarball": tarball.checksum}
                # files hashed while extracting and not rewritten since are not read again
                unchanged = {path: content for path, content in extracted.contents.items()
                             if path not in changed}
                sealed = await trio.to_thread.run_sync(seal, extracted.root, origin, unchanged)
            # the entry: the tree, its record, the receipt and the directory itself
            disk_bytes = sealed.disk_bytes + _blocks(len(sealed.data)) + 2 * 4096
            if local and self.make_room is not None:
                await self.make_room(key, disk_bytes, label)
            receipt = {"hash": dag_hash, "label": label, "mirror": redact(source.mirror.url),
                       "tarball": tarball.checksum, "root": self.tree.root,
                       "prefix": self.tree.prefix_of(dag_hash), "record": sealed.sha256,
                       "disk_bytes": disk_bytes}
            if replace:
                self.usage.forget(key)
                await trio.to_thread.run_sync(store.remove, key)
            published = await trio.to_thread.run_sync(
                store.publish, staging, extracted.root, key, receipt, sealed.data)
            if local:
                self.usage.published(key, disk_bytes, label)
            log.info("%s: %d files, %s unpacked", label, extracted.files,
                     show_size(extracted.bytes))
            return published
        except BaseException:
            self.usage.release(key)
            with trio.CancelScope(shield=True):  # clean up even when cancelled
                await trio.to_thread.run_sync(store.discard, staging)
            raise

    def _relocate(self, dag_hash: str, extracted: extract.Extracted, label: str) -> set[str]:
        """Worker thread: rewrite build-time paths to paths under the mount. Returns the
        paths (relative to the prefix) of the files it changed."""
        from lazymount.install import relocate
        from lazymount.install.sbang import add_sbang

        info = extracted.buildinfo
        self._check_root_length(info, label)
        mapping = relocate.prefix_map(info, self.tree.root, self.tree.prefix_of, self.sbang)
        report = relocate.relocate_prefix(extracted.root, info, mapping, label)
        sbanged = add_sbang(extracted.root, self.sbang, label, extracted.scripts)
        return {*report.changed, *sbanged}

    def _check_root_length(self, info: BuildInfo, label: str) -> None:
        old_root, new_root = info.buildpath, self.tree.root
        if info.relocate_binaries and len(new_root) > len(old_root):
            raise MountPathTooLong(
                f"{label}: the mount path {new_root} is {len(new_root) - len(old_root)} "
                f"characters longer than the build root {old_root}; use a shorter mount path "
                "or a cache built with padded_length"
            )


async def load_pipeline() -> None:
    """Import the install pipeline in a worker thread (once; the imports take 50-100 ms,
    which the trio thread keeps answering the file system through)."""
    if not all(name in sys.modules for name in PIPELINE):
        await trio.to_thread.run_sync(_import_pipeline)


def _import_pipeline() -> None:
    for name in PIPELINE:
        __import__(name)  # as an import statement does (-X importtime names it)


def _blocks(length: int) -> int:
    """Disk bytes of a file of ``length`` bytes, in 4 KiB blocks."""
    return -(-length // 4096) * 4096
