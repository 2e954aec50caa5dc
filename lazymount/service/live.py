"""The running mount's changing parts: mirrors, keys, the index and the tree it places.

A *generation* is what one reading of the configuration and the mirrors' indexes gives.
``LiveMount.refresh`` asks each mirror, with one small conditional request, whether its
index changed; if one did (or a reload changed the mirrors or keys), it loads the new
catalog and places the new tree in worker threads, then swaps it in in one synchronous
step on the trio thread: the materializer and the filesystem change together, and a
listing is made from one index or the other, never from both. Packages that are open or
running keep being served (their inodes and store trees stay); the Spack database is then
rewritten to match. One refresh runs at a time; the periodic one, ``lazymount refresh``
and SIGHUP all come here.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from lazymount.catalog.hosttarget import HostTarget, runnable_tree
from lazymount.catalog.installtree import InstallTree
from lazymount.catalog.loader import load_catalog
from lazymount.catalog.stored import CatalogStore
from lazymount.config import MountConfig
from lazymount.errors import LazymountError, UsageError
from lazymount.materialize import Materializer, MirrorSource
from lazymount.mirror.jitter import refresh_delays
from lazymount.mirror.proxies import ProxyChain
from lazymount.mirror.transport import Mirror, open_mirror
from lazymount.serve.fs import InstallTreeFS
from lazymount.serve.hostdir import HostDirs
from lazymount.spack.modulefiles import ModuleTree
from lazymount.spack.upstreamdb import DB_DIR, INDEX, VERIFIER, write_database
from lazymount.store.content import Store
from lazymount.trust.policy import Trust

log = logging.getLogger(__name__)

DATABASE_FILES = [f"{DB_DIR}/{name}" for name in (INDEX, VERIFIER)]


def load_trust(config: MountConfig) -> Trust:
    """The keys ``config`` trusts (keyring and key files). Raises UsageError, also when
    they cannot be read (a daemon running as ``--user`` may not reach root's files)."""
    try:
        return Trust.load(config.keyring, config.trust_keys,
                          any(m.require_signature for m in config.mirrors))
    except OSError as exc:
        raise UsageError(f"cannot read the trusted keys: {exc.strerror}: "
                         f"{exc.filename}") from None


@dataclass
class Generation:
    """Mirrors, keys and tree from one reading of the configuration and the indexes."""

    config: MountConfig
    mirrors: list[Mirror]
    trust: Trust
    tree: InstallTree  # every package of the index
    shown: InstallTree  # what the mount lists (``targets = "host"`` hides some)
    host: HostDirs
    modules: ModuleTree  # the module files of ``shown``

    @property
    def sources(self) -> list[MirrorSource]:
        return [MirrorSource(m, self.trust.for_mirror(c.require_signature))
                for m, c in zip(self.mirrors, self.config.mirrors, strict=True)]


def open_mirrors(config: MountConfig) -> list[Mirror]:
    proxies = ProxyChain.parse(config.proxies) if config.proxies else None
    return [open_mirror(m.url, config.timeouts, config.ca_certs, proxies, m.credentials)
            for m in config.mirrors]


def open_toc_places(config: MountConfig) -> list[Mirror]:
    """The places ``--toc`` names, read like mirrors."""
    proxies = ProxyChain.parse(config.proxies) if config.proxies else None
    return [open_mirror(url, config.timeouts, config.ca_certs, proxies) for url in config.tocs]


async def load_generation(config: MountConfig, root: str, catalogs: CatalogStore,
                          mirrors: list[Mirror], trust: Trust, stored_first: bool = False,
                          places: list[Mirror] | None = None) -> Generation:
    """Load the catalog of ``mirrors`` and place its tree (worker threads); with
    ``stored_first``, a stored catalog is used without asking its mirror (a mount: the
    check follows once mounted, ``LiveMount.check_stored``). Raises a LazymountError if no
    mirror's index can be read (and none is stored)."""
    catalog = await load_catalog(mirrors, catalogs, trust, stored_first, places or ())
    tree = await trio.to_thread.run_sync(
        catalogs.tree, root, catalog, config.projection, [m.url for m in mirrors])
    host = HostTarget(config.host_target)
    shown = tree
    if config.targets == "host":
        shown = await trio.to_thread.run_sync(runnable_tree, tree, host)
        log.info("--targets host: showing the %d of %d packages this CPU (%s) runs",
                 len(shown.prefixes), len(tree.prefixes), host.name)
    # the catalog and tree live as long as the mount (or until the next refresh): keep them
    # out of every later garbage-collection pass, which would otherwise walk every record
    modules = ModuleTree.build(shown)  # the roots: their files are laid out on first look
    gc.freeze()
    return Generation(config, mirrors, trust, tree, shown, HostDirs(tree, host, modules),
                      modules)


# settings a running mount cannot change: a reload that changes them says so
FIXED = ("mountpoint", "store", "projection", "allow_other", "bind_ready", "limits",
         "metrics_listen", "host_target", "targets", "host_view", "shared_store", "tocs",
         "fill")


class LiveMount:
    """The current generation of a mount, and the refreshes that replace it."""

    def __init__(self, generation: Generation, root: str, store: Store,
                 catalogs: CatalogStore, materializer: Materializer,
                 reload_config: Callable[[], MountConfig] | None = None):
        self.current = generation
        self.root = root
        self.store = store
        self.catalogs = catalogs
        self.materializer = materializer
        self.operations: InstallTreeFS | None = None  # set once mounted
        self.database: Path | None = None  # where the Spack database is written, if it is
        self.reload_config = reload_config  # re-reads the file under the command line
        self.started = time.time()
        self.refreshed: float = time.time()  # last time the indexes were found current
        self.refresh_error: str | None = None  # why the last refresh failed, if it did
        self.retired: list[Generation] = []  # replaced, closed at the end (work may use them)
        self._lock = trio.Lock()
        self._database_lock = trio.Lock()
        self._reschedule = trio.Event()  # set when a reload changes index_refresh

    @property
    def config(self) -> MountConfig:
        return self.current.config

    # ---- the periodic check ------------------------------------------------------------

    async def run_periodically(self) -> None:
        """Refresh every ``index_refresh`` seconds (with the jitter that spreads a fleet's
        requests: ``mirror.jitter``), or when woken."""
        interval = 0.0
        delays: Iterator[float] = iter(())
        while True:
            if self.config.index_refresh != interval:  # first time, or changed by a reload
                interval = self.config.index_refresh
                delays = refresh_delays(interval) if interval > 0 else iter(())
            with trio.move_on_after(next(delays, math.inf)) as waited:
                await self._reschedule.wait()
            self._reschedule = trio.Event()
            if waited.cancelled_caught:  # the time came (not a reload changing the interval)
                await self.refresh("periodic check")

    async def check_stored(self) -> None:
        """Right after a mount served from the stored catalog: ask the mirrors whether
        their indexes changed since (a refresh: a changed one is swapped in)."""
        urls = sorted(self.catalogs.unchecked)
        self.catalogs.unchecked.clear()
        if not urls:
            return
        log.info("serving the catalog stored at the last mount; checking %s now",
                 ", ".join(urls))
        answer = await self.refresh("the check after mounting")
        if not answer.get("changed") and "error" not in answer:
            log.info("the check after mounting: the stored catalog is current")

    # ---- refresh and reload --------------------------------------------------------------

    async def refresh(self, why: str, reload: bool = False) -> dict[str, object]:
        """Check the indexes (after re-reading the configuration if ``reload``) and swap in
        a new generation if anything changed. Returns what happened, for the asker."""
        async with self._lock:
            interval = self.config.index_refresh
            try:
                return await self._refresh(why, reload)
            except LazymountError as exc:
                self.refresh_error = str(exc)
                log.error("refresh (%s) failed, still serving the index of %s: %s", why,
                          _when(self.refreshed), exc)
                return {"changed": False, "error": str(exc)}
            except Exception as exc:  # a bug must not take the mount down: log it, go on
                log.exception("refresh (%s): unexpected error", why)
                self.refresh_error = f"internal error: {exc}"
                return {"changed": False, "error": self.refresh_error}
            finally:
                if self.config.index_refresh != interval:  # a reload changed it
                    self._reschedule.set()

    async def _refresh(self, why: str, reload: bool) -> dict[str, object]:
        old = self.current
        config = old.config
        if reload and self.reload_config is not None:
            config = await trio.to_thread.run_sync(self.reload_config)
            for name in FIXED:
                if getattr(config, name) != getattr(old.config, name):
                    log.warning("reload: %s changed; it takes effect when the mount is "
                                "mounted again", name)
                    config = _keep(config, name, getattr(old.config, name))
            if config.store_quota != self.materializer.usage.quota:
                log.info("reload: the store quota is now %s", config.store_quota or "none")
                self.materializer.usage.quota = config.store_quota  # checked at the next fit
        mirrors_changed = (
            [m.url for m in config.mirrors] != [m.url for m in old.config.mirrors]
            or (config.timeouts, config.ca_certs, config.proxies)
            != (old.config.timeouts, old.config.ca_certs, old.config.proxies))
        keys_changed = (
            (config.trust_keys, config.keyring) != (old.config.trust_keys, old.config.keyring)
            or [m.require_signature for m in config.mirrors]
            != [m.require_signature for m in old.config.mirrors])
        trust = old.trust
        if keys_changed:
            trust = await trio.to_thread.run_sync(load_trust, config)
        elif reload:  # the keyring may have changed under the same name: read it again
            try:
                trust = await trio.to_thread.run_sync(load_trust, config)
            except LazymountError as exc:
                log.warning("reload: %s; keeping the keys read before", exc)
        try:
            if not mirrors_changed and await self._indexes_unchanged():
                self.current = Generation(config, old.mirrors, trust, old.tree, old.shown,
                                          old.host, old.modules)
                if trust is not old.trust:  # same tree, new keys
                    self.materializer.swap(old.tree, self.current.sources)
                    self.retired.append(Generation(old.config, [], old.trust, old.tree,
                                                   old.shown, old.host, old.modules))
                self.refreshed, self.refresh_error = time.time(), None
                log.debug("refresh (%s): the index is unchanged", why)
                return {"changed": False, "packages": len(old.tree.prefixes)}
        except BaseException:
            if trust is not old.trust:
                trust.close()
            raise
        mirrors = open_mirrors(config) if mirrors_changed else old.mirrors
        try:
            new = await load_generation(config, self.root, self.catalogs, mirrors, trust,
                                        places=self.materializer.toc_places)
        except BaseException:
            if mirrors is not old.mirrors:
                for mirror in mirrors:
                    await mirror.aclose()
            if trust is not old.trust:
                trust.close()
            raise
        await self._swap(old, new)
        added = len(new.tree.prefixes.keys() - old.tree.prefixes.keys())
        removed = len(old.tree.prefixes.keys() - new.tree.prefixes.keys())
        log.info("refresh (%s): %d packages now (%d new, %d removed)", why,
                 len(new.tree.prefixes), added, removed)
        await trio.to_thread.run_sync(self.catalogs.flush)  # what the load left to store
        await self._rewrite_database(new.tree)
        return {"changed": True, "packages": len(new.tree.prefixes), "added": added,
                "removed": removed}

    async def _indexes_unchanged(self) -> bool:
        """True if every mirror still has the index loaded (one small request each). A
        mirror that cannot be asked counts as unchanged unless another one changed (then
        the full load falls back on its stored catalog); if none changed, its error is
        raised, so the refresh reports it."""
        answers: list[bool | LazymountError] = []

        async def ask(mirror: Mirror) -> None:
            try:
                answers.append(await self.catalogs.unchanged(mirror))
            except LazymountError as exc:
                answers.append(exc)

        async with trio.open_nursery() as nursery:
            for mirror in self.current.mirrors:
                nursery.start_soon(ask, mirror)
        if False in answers:
            return False
        for answer in answers:
            if isinstance(answer, LazymountError):
                raise answer
        return True

    async def _swap(self, old: Generation, new: Generation) -> None:
        if old.modules.laid_out:  # the kernel may know old module names: compare whole trees
            await trio.to_thread.run_sync(new.modules.lay_out)
        # no await between these: the materializer and the filesystem change together
        self.materializer.swap(new.tree, new.sources)
        if self.operations is not None:
            self.operations.swap_tree(new.shown)
            self.operations.swap_modules(new.modules)
        self.current = new
        self.refreshed, self.refresh_error = time.time(), None
        if new.mirrors is not old.mirrors or new.trust is not old.trust:
            self.retired.append(old)
        if self.operations is not None:
            await self.operations.swap_host(new.host)

    async def write_first_database(self) -> None:
        """Write (or keep, if unchanged) the Spack database of the mounted index in a
        worker thread, then let lookups of ``.spack-db/`` through; on failure (logged) it
        is not served."""
        operations, directory = self.operations, self.database
        assert operations is not None and directory is not None
        assert operations.files_pending is not None
        try:
            async with self._database_lock:
                await trio.to_thread.run_sync(write_database, self.current.tree, directory,
                                              time.time())
        except LazymountError as exc:
            log.warning("no Spack database (%s): the mount works, but not as a Spack "
                        "upstream", exc)
            operations.drop_files(DATABASE_FILES)
            self.database = None
        finally:
            operations.files_pending.set()

    async def _rewrite_database(self, tree: InstallTree) -> None:
        """The Spack database follows the index: rewritten, then the kernel forgets its
        cached pages. On failure the old one stays (logged)."""
        if self.database is None or self.operations is None:
            return
        try:
            async with self._database_lock:
                await trio.to_thread.run_sync(write_database, tree, self.database, time.time())
        except LazymountError as exc:
            log.warning("the Spack database was not rewritten (%s); it lists the previous "
                        "index", exc)
            return
        await trio.to_thread.run_sync(self.operations.invalidate_files, DATABASE_FILES)

    async def aclose(self) -> None:
        """Close the mirrors and keys of the current and every replaced generation."""
        seen: set[int] = set()
        for generation in [*self.retired, self.current]:
            for mirror in generation.mirrors:
                if id(mirror) not in seen:
                    seen.add(id(mirror))
                    await mirror.aclose()
            if id(generation.trust) not in seen:
                seen.add(id(generation.trust))
                generation.trust.close()


def _keep(config: MountConfig, name: str, value: Any) -> MountConfig:
    return replace(config, **{name: value})


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
