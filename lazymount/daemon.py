"""The daemon: build the object graph, mount, serve until unmounted or signalled.

``serve`` is called in the process that stays attached to the mount (``--foreground``, the
systemd service, or the background daemon the command line forks). It reports readiness
through a callback once the kernel mount exists, so the command can return only then.
"""

from __future__ import annotations

import faulthandler
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import trio

from lazymount.catalog.stored import CatalogStore
from lazymount.config import MountConfig
from lazymount.errors import LazymountError, UsageError
from lazymount.materialize import PIPELINE, Materializer, root_digest
from lazymount.serve import session
from lazymount.serve.bindmount import PrefixBinder, clear_dead_mount
from lazymount.serve.fs import InstallTreeFS
from lazymount.serve.keeper import STORE_COMMANDS, StoreKeeper
from lazymount.service import control, metrics, status
from lazymount.service.live import LiveMount, load_generation, open_mirrors, open_toc_places
from lazymount.spack.upstreamdb import DB_DIR, INDEX, VERIFIER
from lazymount.store.content import Store, create_store_dir
from lazymount.store.quota import StoreUsage
from lazymount.store.shared import open_shared_store
from lazymount.system import libc
from lazymount.system.files import remove_stale_temporaries
from lazymount.system.mountinfo import fuse_device
from lazymount.system.ownership import check_reachable, user_name
from lazymount.system.privileges import (
    DEFAULT_USER,
    PRELOAD,
    RootHelper,
    create_account_hint,
    daemon_account,
    drop_privileges,
    preload,
)
from lazymount.trust.policy import Trust

log = logging.getLogger(__name__)

Ready = Callable[[str | None], None]  # None when mounted, else the reason it failed
# FUSE's default read-ahead (128 KiB) makes a cold sequential read a round trip per 128 KiB
# to the daemon; 1 MiB lets one request fill more of the page cache (bench/ measures it)
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


def sbang_text() -> bytes:
    return resources.files("lazymount").joinpath("data/sbang").read_bytes()


def install_sbang(store: Store, text: bytes) -> Path:
    """Our sbang script, kept in the store and served at <mount>/bin/sbang."""
    return store.put_file("sbang", text, 0o755)


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


STALE_TEMPORARY = 3600.0  # seconds after which a half-written file is a crash's leftover


def sweep_temporaries(root: Path) -> int:
    """Remove the half-written catalog and Spack database files a crash left in the store
    (the packages' own leftovers are ``Store.sweep``'s)."""
    directories = [root / "catalog" / part for part in ("indexes", "mirrors", "trees")]
    try:
        directories += [entry for entry in (root / "spackdb").iterdir() if entry.is_dir()]
    except OSError:
        pass
    return sum(remove_stale_temporaries(directory, STALE_TEMPORARY) for directory in directories)


def mount_options(config: MountConfig) -> set[str]:
    options = {"fsname=lazymount", "subtype=lazymount", "ro", "default_permissions"}
    if config.allow_other:
        options.add("allow_other")
    return options


def serve(config: MountConfig, ready: Ready,
          reload_config: Callable[[], MountConfig] | None = None) -> int:
    """Mount and serve until unmounted. Returns the exit status. ``reload_config`` reads
    the configuration again (SIGHUP)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 dumps every stack
    os.umask(0o022)  # nothing the daemon makes is writable by others
    trust = None
    start = Start()
    root = None
    try:
        root = check_mountpoint(config.mountpoint)
        # read while still root: the daemon may not reach these files as another user
        keys = Trust.read_keys(config.keyring, config.trust_keys)
        sbang_script = sbang_text()
        start.control = control.bind(root, config.allow_other)
        start.control_path = start.control.getsockname()
        become_user(config, root, start)
        store = Store(config.store)
        store.check_entries()
        swept = store.sweep() + sweep_temporaries(store.root)
        if swept:
            log.info("removed %d unfinished entries from the store", swept)
        sbang = install_sbang(store, sbang_script)
        trust = Trust.from_keys(keys, any(m.require_signature for m in config.mirrors))
        return trio.run(_serve, config, root, store, sbang, trust, ready, reload_config, start)
    except LazymountError as exc:
        if trust is not None:
            trust.close()
        ready(str(exc))
        return exc.exit_code
    finally:
        start.close(root)


@dataclass
class Start:
    """What is made before the daemon gives up root, for later: the control socket, and
    with --user the FUSE device of the mount already made and the read-ahead helper."""

    control: socket.socket | None = None
    control_path: str = ""  # where it is bound: runtime_dir() differs after --user
    device: int | None = None
    readahead: RootHelper | None = None
    served: bool = False

    def close(self, root: str | None) -> None:
        if self.readahead is not None:
            self.readahead.close()
        if self.device is not None and not self.served and root is not None:
            session.unmount(root)  # mounted, then failed before serving: take it away
        if self.control is not None:
            _remove_socket(self.control, self.control_path)


def become_user(config: MountConfig, root: str, start: Start) -> None:
    """Mount as root, then switch for good to ``config.user`` (started as root without
    it: the ``lazymount`` account, if there is one), keeping CAP_SYS_ADMIN only
    (unmounting, --bind-ready). Everything read from a mirror is read after this."""
    account = daemon_account(config.user)
    if account is None:
        if os.geteuid() == 0:
            log.warning("there is no user %r to run the daemon as: it keeps running as root "
                        "and parses what mirrors send as root (create it: %s; or give "
                        "--user root)", DEFAULT_USER, create_account_hint(DEFAULT_USER))
        return
    if os.geteuid() != 0:
        if account.uid == os.geteuid():
            return
        raise UsageError(f"--user {account.name} needs root (the daemon runs as "
                         f"{user_name(os.geteuid())})")
    if account.uid == 0:
        log.warning("--user %s: the daemon keeps running as root, and parses what mirrors "
                    "send as root", account.name)
        return
    check_reachable(Path(root), account.uid, account.gid, "the mount point", account.name)
    check_reachable(config.store, account.uid, account.gid, "the store", account.name)
    create_store_dir(config.store, account.uid, account.gid)
    # the install pipeline and httpx too: a mount that keeps its user imports them when
    # first needed, but the account may not reach the interpreter's files (/root/...) then
    preload(PRELOAD + PIPELINE + ("httpx", "httpcore"))
    start.device = session.premount(root, mount_options(config), account.uid, account.gid)
    start.readahead = RootHelper(lambda: raise_readahead(root))
    try:
        drop_privileges(account)
    except OSError as exc:
        raise UsageError(f"cannot switch to the user {account.name}: {exc}") from None
    log.info("mounted %s; running as %s from now on, with CAP_SYS_ADMIN only", root,
             account.name)


async def _serve(config: MountConfig, root: str, store: Store, sbang: Path, trust: Trust,
                 ready: Ready, reload_config: Callable[[], MountConfig] | None,
                 start: Start) -> int:
    mirrors = open_mirrors(config)
    live: LiveMount | None = None
    try:
        started = time.monotonic()
        catalogs = CatalogStore(store.root / "catalog", write_later=True)
        places = open_toc_places(config)  # site catalogs and TOCs besides the mirrors
        generation = await load_generation(config, root, catalogs, mirrors, trust,
                                           stored_first=True, places=places)
        log.info("catalog of %d specs ready in %.2f s", len(generation.tree.catalog),
                 time.monotonic() - started)
        shared = (await trio.to_thread.run_sync(open_shared_store, config.shared_store)
                  if config.shared_store is not None else None)
        database = store.root / "spackdb" / root_digest(generation.tree)
        files = _spack_database_files(database)
        control_socket, start.control = start.control, None
        assert control_socket is not None
        usage = StoreUsage(store, config.store_quota)
        await trio.to_thread.run_sync(usage.load)
        mounted = False
        try:
            # the nursery first: what serves the mount starts its background work there
            async with _unwrapped_errors(), trio.open_nursery() as nursery:
                materializer = Materializer(generation.tree, generation.sources, store,
                                            config.limits, shared, nursery, usage)
                materializer.toc_places = places
                materializer.fill_whole = config.fill == "whole"
                binder = PrefixBinder(root, nursery) if config.bind_ready else None
                operations = InstallTreeFS(
                    generation.shown, materializer, sbang, files, binder,
                    generation.host, host_dir=config.host_view, modules=generation.modules,
                    # written while already serving: 100,000 specs take seconds
                    files_pending=trio.Event() if files else None,
                    # the kernel clamps read-ahead when it hears our INIT answer: raise it after
                    after_init=lambda: nursery.start_soon(_raise_readahead, root, start))
                keeper = StoreKeeper(root, operations, binder)
                materializer.make_room = keeper.make_room  # a reload may set a quota
                materializer.trim = functools.partial(keeper.gc, None)
                live = LiveMount(generation, root, store, catalogs, materializer,
                                 reload_config)
                live.operations, live.database = operations, database if files else None
                nursery.start_soon(control.serve, control_socket, _answerer(live, keeper))
                if config.metrics_listen is not None:
                    await nursery.start(_serve_metrics, live, config.metrics_listen)
                session.mount(operations, root, mount_options(config), start.device)
                mounted = start.served = True
                log.info("mounted %d packages from %s at %s", len(generation.tree.prefixes),
                         ", ".join(m.url for m in mirrors), root)
                ready(None)
                sd_notify("READY=1")
                nursery.start_soon(_store_catalog, catalogs)
                nursery.start_soon(_handle_signals, live, nursery)
                nursery.start_soon(live.check_stored)  # the mirrors, not asked yet
                nursery.start_soon(live.run_periodically)
                if config.store_quota is not None and usage.total() > config.store_quota:
                    nursery.start_soon(keeper.gc, None)  # the quota was lowered
                if files:
                    nursery.start_soon(_first_database, live)
                # returns on terminate() or when the mount goes away (fusermount3 -u)
                await session.serve()
                nursery.cancel_scope.cancel()
        finally:
            usage.flush()  # last uses, so LRU order survives the restart
            if mounted:
                sd_notify("STOPPING=1")
                if start.device is not None:  # libfuse did not mount it: cannot unmount it
                    session.close(unmount=False)
                    session.unmount(root)
                else:
                    session.close(unmount=os.path.ismount(root))
            _remove_socket(control_socket, start.control_path)
        log.info("unmounted %s", root)
        return 0
    finally:
        if live is not None:
            await live.aclose()  # every generation's mirrors and trust
        else:
            for mirror in mirrors:
                await mirror.aclose()
            trust.close()


def _answerer(live: LiveMount, keeper: StoreKeeper) -> control.Handler:
    """What the control socket answers: the status, a package's state, a refresh, and the
    store's commands (gc, fsck, preload's closure)."""

    async def answer(request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command in STORE_COMMANDS:
            return await keeper.command(str(command), request)
        if command == "status":
            return await status.collect(live)
        if command == "package":
            return await status.package_at(live, str(request.get("path", "")))
        if command == "refresh":
            if request.get("uid") not in (0, os.geteuid()):
                return {"error": "only root or the user who mounted it may refresh a mount"}
            return await live.refresh("lazymount refresh")
        return {"error": f"unknown command {command!r}"}

    return answer


async def _serve_metrics(live: LiveMount, listen: tuple[str, int],
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async def text() -> str:
        return metrics.exposition(await status.collect(live))

    host, port = listen
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    task_status.started()
    await metrics.serve_http(listeners, text)


def _remove_socket(sock: socket.socket, path: str) -> None:
    """Close the control socket and remove it, by the path it was bound to (once served,
    the socket is closed already and cannot say where it was). After --user the daemon may
    not remove it from the root-owned directory: the next mount there replaces it."""
    sock.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.debug("the control socket %s stays: %s", path, exc.strerror)


async def _store_catalog(catalogs: CatalogStore) -> None:
    """Once mounted: store what the first load parsed, then give back what parsing left
    in worker-thread arenas."""
    await trio.to_thread.run_sync(catalogs.flush)
    release_memory()


async def _first_database(live: LiveMount) -> None:
    await live.write_first_database()
    release_memory()


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


def release_memory() -> None:
    """Hand freed heap back to the system. Big one-off work in worker threads (the database
    of 100,000 specs) leaves glibc's per-thread arenas holding ~130 MB otherwise."""
    libc.malloc_trim()


async def _raise_readahead(root: str, start: Start) -> None:
    helper, start.readahead = start.readahead, None
    if helper is not None:  # the daemon is no longer root: its helper still is
        await trio.to_thread.run_sync(helper.run)
    else:
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


async def _handle_signals(live: LiveMount, nursery: trio.Nursery) -> None:
    """SIGTERM and SIGINT unmount; SIGHUP reloads the configuration and the index (and
    never unmounts: users keep their files)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("got SIGHUP: reloading the configuration and the index")
                nursery.start_soon(live.refresh, "SIGHUP", True)
                continue
            log.info("got %s: unmounting", signal.Signals(signum).name)
            session.terminate()
            return
