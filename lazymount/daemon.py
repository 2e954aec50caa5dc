"""The daemon: build the object graph, mount, serve until unmounted or signalled.

``serve`` is called in the process that stays attached to the mount (``--foreground``, the
systemd service, or the background child the command line starts). It reports readiness
through a callback once the kernel mount exists, so the command can return only then.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import trio

from lazymount.catalog.hosttarget import HostTarget, runnable_tree
from lazymount.catalog.installtree import InstallTree
from lazymount.catalog.loader import load_catalog
from lazymount.catalog.stored import CatalogStore
from lazymount.config import MountConfig
from lazymount.errors import LazymountError, UsageError
from lazymount.materialize import Materializer, MirrorSource, root_digest
from lazymount.mirror.proxies import ProxyChain
from lazymount.mirror.transport import Mirror, open_mirror
from lazymount.serve import session
from lazymount.serve.bindmount import PrefixBinder, clear_dead_mount
from lazymount.serve.fs import InstallTreeFS
from lazymount.serve.hostdir import HostDirs
from lazymount.spack.upstreamdb import DB_DIR, INDEX, VERIFIER, write_database
from lazymount.store.content import Store
from lazymount.store.shared import open_shared_store
from lazymount.system import libc
from lazymount.system.files import write_atomically
from lazymount.system.mountinfo import fuse_device
from lazymount.trust.policy import Trust

log = logging.getLogger(__name__)

Ready = Callable[[str | None], None]  # None when mounted, else the reason it failed
# FUSE's default read-ahead (128 KiB) halves the speed of a cold sequential read: 1 MiB
# made a cold 48 MiB read 2x faster (bench/, metric 5)
READ_AHEAD_KB = 1024


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def install_sbang(store: Store) -> Path:
    """Our sbang script, kept in the store and served at <mount>/bin/sbang."""
    text = resources.files("lazymount").joinpath("data/sbang").read_bytes()
    target = store.root / "sbang"
    if not target.is_file() or target.read_bytes() != text:
        write_atomically(target, text, mode=0o755, mtime=0)
    return target


def check_mountpoint(path: Path) -> str:
    """The absolute mount root used for relocation; refuses what cannot be mounted on.
    A mount left by a daemon that died (ENOTCONN) is detached first: mounting again is how
    a crashed mount recovers (the store keeps what it had)."""
    try:
        if clear_dead_mount(os.path.abspath(path)):
            log.warning("%s: the daemon that served this mount is gone; detached its dead "
                        "mount and mounting again", path)
    except OSError as exc:
        raise UsageError(f"{path}: a dead mount is in the way: {exc.strerror}") from None
    if not path.is_dir():
        raise UsageError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"{path} is already a mount point (unmount it first: "
                         f"lazymount umount {path})")
    return os.path.realpath(path)


def mount_options(config: MountConfig) -> set[str]:
    options = {"fsname=lazymount", "subtype=lazymount", "ro", "default_permissions"}
    if config.allow_other:
        options.add("allow_other")
    return options


def serve(config: MountConfig, ready: Ready) -> int:
    """Mount and serve until unmounted. Returns the exit status."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 dumps every stack
    trust = None
    try:
        root = check_mountpoint(config.mountpoint)
        store = Store(config.store)
        swept = store.sweep()
        if swept:
            log.info("removed %d unfinished entries from the store", swept)
        sbang = install_sbang(store)
        trust = Trust.load(config.keyring, config.trust_keys,
                           any(m.require_signature for m in config.mirrors))
        return trio.run(_serve, config, root, store, sbang, trust, ready)
    except LazymountError as exc:
        ready(str(exc))
        return exc.exit_code
    finally:
        if trust is not None:
            trust.close()


async def _serve(config: MountConfig, root: str, store: Store, sbang: Path,
                 trust: Trust, ready: Ready) -> int:
    proxies = ProxyChain.parse(config.proxies) if config.proxies else None
    mirrors: list[Mirror] = [open_mirror(m.url, config.timeouts, config.ca_certs, proxies)
                             for m in config.mirrors]
    try:
        started = time.monotonic()
        catalogs = CatalogStore(store.root / "catalog")
        catalog = await load_catalog(mirrors, catalogs)
        tree = await trio.to_thread.run_sync(
            catalogs.tree, root, catalog, config.projection, [m.url for m in mirrors])
        # the catalog and tree live as long as the mount: keep them out of every later
        # garbage-collection pass (100,000 records made each pass take ~0.1 s)
        gc.freeze()
        release_memory()  # what parsing the index left in worker-thread arenas
        log.info("catalog of %d specs ready in %.2f s", len(catalog), time.monotonic() - started)
        sources = [MirrorSource(m, trust.for_mirror(c.require_signature))
                   for m, c in zip(mirrors, config.mirrors, strict=True)]
        shared = (await trio.to_thread.run_sync(open_shared_store, config.shared_store)
                  if config.shared_store is not None else None)
        database = store.root / "spackdb" / root_digest(tree)
        files = _spack_database_files(database)
        host = HostTarget(config.host_target)
        shown = tree
        if config.targets == "host":
            shown = await trio.to_thread.run_sync(runnable_tree, tree, host)
            log.info("--targets host: showing the %d of %d packages this CPU (%s) runs",
                     len(shown.prefixes), len(tree.prefixes), host.name)
        mounted = False
        try:
            # the nursery first: what serves the mount starts its background work there
            async with _unwrapped_errors(), trio.open_nursery() as nursery:
                materializer = Materializer(tree, sources, store, config.limits, shared, nursery)
                operations = InstallTreeFS(
                    shown, materializer, sbang, files,
                    PrefixBinder(root, nursery) if config.bind_ready else None,
                    HostDirs(tree, host), host_dir=config.host_view,
                    # written while already serving: 100,000 specs take seconds
                    files_pending=trio.Event() if files else None,
                    # the kernel clamps read-ahead when it hears our INIT answer: raise it after
                    after_init=lambda: nursery.start_soon(_raise_readahead, root))
                session.mount(operations, root, mount_options(config))
                mounted = True
                log.info("mounted %d packages from %s at %s", len(tree.prefixes),
                         ", ".join(m.url for m in mirrors), root)
                ready(None)
                sd_notify("READY=1")
                nursery.start_soon(_stop_on_signal)
                if files:
                    nursery.start_soon(_write_spack_database, tree, database, operations)
                # returns on terminate() or when the mount goes away (fusermount3 -u)
                await session.serve()
                nursery.cancel_scope.cancel()
        finally:
            if mounted:
                sd_notify("STOPPING=1")
                session.close(unmount=os.path.ismount(root))
        log.info("unmounted %s", root)
        return 0
    finally:
        for mirror in mirrors:
            await mirror.aclose()


@asynccontextmanager
async def _unwrapped_errors() -> AsyncIterator[None]:
    """A LazymountError raised alone in a nursery comes out as itself (trio wraps it in an
    ExceptionGroup), so that ``serve`` reports it like any other."""
    try:
        yield
    except* LazymountError as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _spack_database_files(directory: Path) -> dict[str, Path]:
    """Where the upstream database Spack reads (``.spack-db/``) will be, by path under the
    mount; empty (logged) if its directory cannot be made: the mount still serves packages."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("no Spack database (cannot create %s: %s): the mount works, but not as a "
                    "Spack upstream", directory, exc.strerror)
        return {}
    return {f"{DB_DIR}/{name}": directory / name for name in (INDEX, VERIFIER)}


async def _write_spack_database(tree: InstallTree, directory: Path,
                                operations: InstallTreeFS) -> None:
    """Write (or keep, if unchanged) the database in a worker thread, then let lookups of
    ``.spack-db/`` through; on failure (logged) it is not served."""
    assert operations.files_pending is not None
    try:
        await trio.to_thread.run_sync(write_database, tree, directory, time.time())
    except LazymountError as exc:
        log.warning("no Spack database (%s): the mount works, but not as a Spack upstream",
                    exc)
        operations.drop_files([f"{DB_DIR}/{name}" for name in (INDEX, VERIFIER)])
    finally:
        operations.files_pending.set()
    release_memory()


def release_memory() -> None:
    """Hand freed heap back to the system. Big one-off work in worker threads (the database
    of 100,000 specs) leaves glibc's per-thread arenas holding ~130 MB otherwise."""
    libc.malloc_trim()


async def _raise_readahead(root: str) -> None:
    await trio.to_thread.run_sync(raise_readahead, root)


def raise_readahead(root: str, kib: int = READ_AHEAD_KB) -> None:
    """Raise the read-ahead of the FUSE mount at ``root`` (its bdi in sysfs; root only,
    else a no-op). Reads the device from mountinfo: a stat of our own mount before it is
    served would wait forever."""
    device = fuse_device(root)
    if device is None:
        return
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:
        log.debug("read-ahead of %s left as it is: %s", root, exc.strerror)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("got %s: unmounting", signal.Signals(signum).name)
            session.terminate()
            return
