"""The FUSE filesystem: a read-only install tree backed by the index and the store.

The kinds of node (``Node``), each a small frozen value:
  * ``VirtualDir``: the root, ``<platform>-<target>/`` and every folder above the prefixes,
    ``.spack-db/`` and the folders of ``modules/``, answered without the store;
  * ``PrefixDir``: one per cached spec: stat answered from the index, but looking inside
    one awaits its materialization; its inode is worked out from its place in the tree,
    not stored (``prefixinodes``);
  * ``RealNode``: a file, link or directory of a materialized tree in the store, or one of
    the files the daemon writes (``bin/sbang``, the Spack database), served as it is (a
    file of an opened package not fetched yet: stat and name from its TOC, fetched on open);
  * ``HostDir`` and ``HostLink``: the folders of ``host/`` and ``modules/host/``, and in
    ``host/`` per name and version a link to the best build this CPU runs (``hostdir``);
  * ``ModuleText``: a Tcl or Lua module file or module index, made from the index when
    read (``spack/modulefiles``);
  * ``HostText``: a module file of ``modules/host/``, made when its folder is listed.

Everything served is immutable, so the kernel is told to cache entries, attributes and
pages for long. Handlers run on the trio thread; none talks to the network or gpg: they
await the materializer and read the store. Any error becomes an errno, never an exception
that would end the mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

from lazymount.catalog.installtree import InstallTree, changed_names
from lazymount.errors import LazymountError
from lazymount.materialize import Materializer
from lazymount.serve.bindmount import PrefixBinder
from lazymount.serve.hostdir import HOST_DIR, HostDirs
from lazymount.serve.prefixinodes import FolderListing, PrefixDir, PrefixInodes
from lazymount.spack.hostmodules import HOST_MODULES
from lazymount.spack.modulefiles import MODULES_DIR, ModuleTree
from lazymount.system import xattrs

log = logging.getLogger(__name__)

TIMEOUT = 24 * 3600.0  # immutable content: the kernel may keep entries and attributes a day
STATUS_XATTR = xattrs.STATUS.encode()
PROJECTION_XATTR = xattrs.PROJECTION.encode()
STORE_XATTR = xattrs.STORE.encode()
TARGET_XATTR = xattrs.TARGET.encode()
CHOICE_XATTR = xattrs.CHOICE.encode()
SERVED_XATTRS = frozenset({STATUS_XATTR, PROJECTION_XATTR, STORE_XATTR, TARGET_XATTR,
                           CHOICE_XATTR})

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _unserved(name: bytes) -> int:
    """The error for an attribute the mount does not serve. `ls -l` asks every entry for
    its SELinux label and POSIX ACLs (3 round trips per entry: 20 s for a folder of 100,000
    prefixes); "not supported", what a file system without labels and ACLs answers, makes
    it stop asking for the rest of the mount after the first entry."""
    return errno.EOPNOTSUPP if name.startswith((b"security.", b"system.")) else pyfuse3.ENOATTR


def errors_to_errno(handler: F) -> F:
    """Turn every failure of a handler into a FUSEError: a raise of anything else would
    end the whole mount."""

    @functools.wraps(handler)
    async def wrapper(*args: Any) -> Any:
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except LazymountError as exc:  # logged once by whoever raised it
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _is_own_thread(tid: int) -> bool:
    """True if the kernel request came from a thread of this process."""
    return os.path.exists(f"/proc/self/task/{tid}")


@dataclass(frozen=True, slots=True)
class VirtualDir:
    relative: str  # path under the mount root, "" for the root


@dataclass(frozen=True, slots=True)
class RealNode:
    path: str  # absolute path in the store


@dataclass(frozen=True, slots=True)
class HostDir:
    relative: str  # "host" or "host/<name>"


@dataclass(frozen=True, slots=True)
class HostLink:
    relative: str
    target: str  # what readlink answers


@dataclass(frozen=True, slots=True)
class ModuleText:
    relative: str  # a module file or module-index.yaml under modules/
    generation: int = 0  # which ModuleTree: a refresh makes new nodes (new inodes)


@dataclass(frozen=True, slots=True)
class HostText:
    relative: str  # a module file of modules/host/
    text: bytes


Node = VirtualDir | PrefixDir | RealNode | HostDir | HostLink | ModuleText | HostText
Listing = list[tuple[bytes, int]] | FolderListing  # a directory's entries: name and inode
VIRTUAL_FH = 1 << 40  # file handles of ModuleText opens start here (others are store fds)


class InstallTreeFS(pyfuse3.Operations):
    """pyfuse3 operations over an InstallTree and a Materializer."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: InstallTree, materializer: Materializer, sbang: Path,
                 files: dict[str, Path] | None = None, binder: PrefixBinder | None = None,
                 host: HostDirs | None = None, host_dir: bool = True, *,
                 files_pending: trio.Event | None = None,
                 modules: ModuleTree | None = None,
                 after_init: Callable[[], object] | None = None):
        """``files``: more store files to serve read-only, by path under the mount
        (e.g. ``.spack-db/index.json``); ``bin/sbang`` is always served. ``binder``:
        bind-mounts each ready package on its prefix (``--bind-ready``). ``host``: what the
        host target runs (for the target xattr and log lines), and ``host/`` if ``host_dir``
        (left out if the install tree has a top directory of that name). ``modules``: serves
        ``modules/`` (likewise).
        ``files_pending``: set once ``files`` are written (the Spack database is written
        after mounting): a lookup of one of them waits for it. ``after_init``: runs once
        the kernel says hello; it must not block."""
        super().__init__()
        if host is not None and host_dir and HOST_DIR in tree.dirs[""]:
            log.warning("no %s/ view: the projection puts a directory of that name at the "
                        "top of the mount", HOST_DIR)
            host_dir = False
        self.host = host
        self.host_dir = host_dir and host is not None
        if modules is not None and MODULES_DIR in tree.dirs[""]:
            log.warning("no %s/: the projection puts a directory of that name at the top of "
                        "the mount", MODULES_DIR)
            modules = None
        self.modules = modules
        self.modules_generation = 0
        self.texts: dict[int, bytes] = {}  # open ModuleText handles -> content
        self.binder = binder
        self.after_init = after_init
        self.tree = tree
        self.materializer = materializer
        self.sbang = sbang
        self.files = {"bin/sbang": str(sbang), **{k: str(v) for k, v in (files or {}).items()}}
        self.file_dirs: dict[str, set[str]] = {}  # directories that hold those files
        self._index_files()
        self.files_pending = files_pending
        self.mounted_at = time.time_ns()
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: VirtualDir("")}
        self.inodes: dict[Node, int] = {VirtualDir(""): pyfuse3.ROOT_INODE}
        self.listings: dict[int, Listing] = {}  # open directory handles
        # what a store tree holds never changes: each real node is stat'ed and each real
        # directory listed once (the Spack database files, rewritten by a refresh, are
        # forgotten by ``invalidate_files``)
        self.real_attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.real_listings: dict[int, Listing] = {}
        self.next_handle = 1
        self.next_inode = pyfuse3.ROOT_INODE + 1
        self.prefix_inodes = self._number_prefixes(tree)
        self.uid, self.gid = os.getuid(), os.getgid()
        # open files per store key: a package with one is never evicted
        self.pkgs = f"{materializer.store.pkgs}/"
        self.open_keys: Counter[str] = Counter()
        self.handle_keys: dict[int, str] = {}

    def _index_files(self) -> None:
        self.file_dirs.clear()
        for relative in self.files:
            parts = relative.split("/")
            for depth, name in enumerate(parts):
                self.file_dirs.setdefault("/".join(parts[:depth]), set()).add(name)

    def swap_tree(self, tree: InstallTree) -> int:
        """Serve ``tree`` (a refreshed index) from now on; returns how many names came or
        went. One assignment on the trio thread: every lookup and listing sees one index or
        the other, never a mix. Inodes handed out before stay valid, so a package that is
        open or running keeps being served. The kernel's cached entries (found and not
        found) for the names that changed are dropped, so it asks again."""
        old, self.tree = self.tree, tree
        for ino, node in self.prefix_inodes.given_out():  # they stay valid
            self.nodes[ino] = node
            self.inodes[node] = ino
        self.prefix_inodes = self._number_prefixes(tree)
        changed = 0
        for relative, name in changed_names(old, tree):
            changed += 1
            parent = self.inodes.get(VirtualDir(relative))
            if parent is not None:  # else never looked up: the kernel holds nothing of it
                pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)
        return changed

    async def swap_host(self, host: HostDirs) -> None:
        """Serve ``host/`` from a refreshed index; the kernel forgets the links that
        changed. Nothing to do if ``host/`` is not shown."""
        if self.host is None:
            return
        old, self.host = self.host, host
        looked = [(node, ino) for node, ino in self.inodes.items() if isinstance(node, HostDir)]
        for node, ino in looked:  # only if someone looked: the old choice was then made
            before = await old.children(node.relative) or {}
            after = await host.children(node.relative) or {}
            for name in before.keys() | after.keys():
                if name not in before or name not in after or before[name] != after[name]:
                    pyfuse3.invalidate_entry_async(ino, os.fsencode(name), ignore_enoent=True)

    def swap_modules(self, modules: ModuleTree) -> None:
        """Serve the module files of a refreshed index. Their nodes are new (a text may
        change: module-index.yaml does), so the kernel forgets every module file it looked
        up and every name that came or went. Nothing to do if ``modules/`` is not shown."""
        if self.modules is None:
            return
        old, self.modules = self.modules, modules
        self.modules_generation += 1
        stale: set[tuple[str, str]] = set()
        for relative in old.dirs.keys() | modules.dirs.keys():
            for name in old.dirs.get(relative, set()) ^ modules.dirs.get(relative, set()):
                stale.add((relative, name))
        for node in list(self.inodes):
            if isinstance(node, ModuleText):
                directory, _, name = node.relative.rpartition("/")
                stale.add((directory, name))
        for directory, name in stale:
            parent = self.inodes.get(VirtualDir(directory))
            if parent is not None:  # never looked up: the kernel holds nothing of it
                pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)

    def invalidate_files(self, names: list[str]) -> None:
        """Make the kernel forget what it cached of some of ``files`` (rewritten in place
        by a refresh: the Spack database). Blocking: call from a worker thread."""
        for name in names:
            ino = self.inodes.get(RealNode(self.files[name])) if name in self.files else None
            if ino is not None:
                self.real_attrs.pop(ino, None)
                try:
                    pyfuse3.invalidate_inode(ino)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        log.warning("cannot invalidate %s: %s", name, exc.strerror)

    def drop_files(self, names: list[str]) -> None:
        """Stop serving some of ``files`` (they could not be written)."""
        for name in names:
            self.files.pop(name, None)
        self._index_files()

    async def _written(self, child: Node | None) -> None:
        """Wait until an extra store file exists, if ``child`` is one still being written."""
        if (self.files_pending is not None and isinstance(child, RealNode)
                and child.path != str(self.sbang)):
            await self.files_pending.wait()

    def init(self) -> None:
        """FUSE INIT, before it is answered: hands over to ``after_init`` (which must not
        block; it schedules work to run once the answer is in)."""
        if self.after_init is not None:
            self.after_init()

    # ---- inode table ----------------------------------------------------------------

    def _number_prefixes(self, tree: InstallTree) -> PrefixInodes:
        inodes = PrefixInodes(tree, self.next_inode)
        self.next_inode += inodes.size
        return inodes

    def _inode(self, node: Node) -> int:
        ino = self.inodes.get(node)
        if ino is None and isinstance(node, PrefixDir):
            ino = self.prefix_inodes.inode_of(node)
        if ino is None:
            ino = self.next_inode
            self.next_inode += 1
            self.nodes[ino] = node
            self.inodes[node] = ino
        return ino

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino) or self.prefix_inodes.node(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def _modules_below(self, relative: str) -> None:
        """Before a path under ``modules/`` is resolved: the module files laid out (once, in
        a worker thread; a mount does not wait for them)."""
        modules = self.modules
        if modules is not None and not modules.laid_out and (
                relative == MODULES_DIR or relative.startswith(MODULES_DIR + "/")):
            await trio.to_thread.run_sync(modules.lay_out)

    def _child(self, parent: VirtualDir, name: str) -> Node | None:
        relative = f"{parent.relative}/{name}" if parent.relative else name
        if relative == HOST_DIR and self.host_dir:
            return HostDir(relative)
        dag_hash = self.tree.by_path.get(relative)
        if dag_hash is not None:
            return PrefixDir(relative, dag_hash)
        if relative in self.tree.dirs:
            return VirtualDir(relative)
        if relative in self.files:
            return RealNode(self.files[relative])
        if relative in self.file_dirs:
            return VirtualDir(relative)
        if relative == HOST_MODULES and self.host_dir and self.modules is not None:
            return HostDir(relative)
        if self.modules is not None:
            if self.modules.is_file(relative):
                return ModuleText(relative, self.modules_generation)
            if self.modules.is_dir(relative):
                return VirtualDir(relative)
        return None

    def _children(self, parent: VirtualDir) -> list[str]:
        """The names of a virtual directory, but for its prefixes (``_virtual_listing``)."""
        folder = self.tree.folders.get(parent.relative)
        names = set(folder.subdirs) if folder is not None else set()
        names.update(self.file_dirs.get(parent.relative, ()))
        if self.modules is not None:
            names.update(self.modules.dirs.get(parent.relative, ()))
        if parent.relative == "" and self.host_dir:
            names.add(HOST_DIR)
        if parent.relative == MODULES_DIR and self.host_dir and self.modules is not None:
            names.add(HOST_MODULES.rpartition("/")[2])
        return sorted(names)

    async def _host_children(self, parent: HostDir) -> dict[str, Node]:
        """The entries of a directory of ``host/``: decided from the index alone."""
        assert self.host is not None
        entries = await self.host.children(parent.relative)
        children: dict[str, Node] = {}
        for name, target in (entries or {}).items():
            relative = f"{parent.relative}/{name}"
            if target is None:
                children[name] = HostDir(relative)
            elif isinstance(target, bytes):
                children[name] = HostText(relative, target)
            else:
                children[name] = HostLink(relative, target)
        return children

    async def _real_dir(self, node: Node, ctx: Any) -> str | None:
        """Store path of a directory node's contents; materializes a prefix. None if virtual."""
        if isinstance(node, PrefixDir):
            ready = self.materializer.ready_tree(node.dag_hash)
            if ready is None:
                if ctx is not None and _is_own_thread(ctx.pid):
                    # our own worker reaching into the mount would wait on itself forever
                    log.error("%s: the daemon itself looked inside the package it is "
                              "materializing; refused", self.tree.label(node.dag_hash))
                    raise pyfuse3.FUSEError(errno.EDEADLK)
                if self.host is not None:
                    self.host.warn_foreign(node.dag_hash)
                ready = await self.materializer.ensure(node.dag_hash)
            self.materializer.usage.touch(self.materializer.key(node.dag_hash))
            if self.binder is not None and self.materializer.partial(str(ready)) is None:
                # from now on the kernel serves it from the store
                self.binder.request(node.relative, str(ready))
            return str(ready)
        if isinstance(node, RealNode):
            return node.path
        return None

    def key_of(self, path: str) -> str | None:
        """The store key of a path inside a package of the local store, else None."""
        if not path.startswith(self.pkgs):
            return None
        return path[len(self.pkgs):].split("/", 1)[0]

    def forget_package(self, dag_hash: str) -> None:
        """A package left the store: make the kernel look its prefix up again (so the next
        access materializes it) and drop what it cached of its files."""
        relative = self.tree.prefixes.get(dag_hash)
        if relative is None:
            return
        parent, _, name = relative.rpartition("/")
        parent_ino = self.inodes.get(VirtualDir(parent))
        if parent_ino is not None:
            pyfuse3.invalidate_entry_async(parent_ino, os.fsencode(name), ignore_enoent=True)
        prefix = PrefixDir(relative, dag_hash)
        prefix_ino = self.inodes.get(prefix) or self.prefix_inodes.given_inode_of(prefix)
        if prefix_ino is not None:
            self.real_listings.pop(prefix_ino, None)
        below = f"{self.pkgs}{self.materializer.key(dag_hash)}/"
        for ino, node in list(self.nodes.items()):
            if isinstance(node, RealNode) and node.path.startswith(below):
                self.real_attrs.pop(ino, None)
                self.real_listings.pop(ino, None)
                try:
                    pyfuse3.invalidate_inode(ino)
                except OSError:
                    pass  # the kernel never heard of it, or has forgotten it

    # ---- packages opened through a table of contents ----------------------------------
    # Their store tree holds the folders, the links and the files fetched so far; the TOC
    # answers for the other files (stats, listings), and their first open fetches them.

    def _toc_attr(self, ino: int, path: str) -> pyfuse3.EntryAttributes | None:
        found = self.materializer.partial(path)
        shape = found[0].attr(found[1]) if found is not None else None
        if shape is None:
            return None
        mode, size, links = shape
        attr = self._dir_attr(ino)
        attr.st_mode, attr.st_size, attr.st_nlink = mode, size, links
        attr.st_blocks = -(-size // 512)
        attr.st_blksize = 1 << 17
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = 0
        return attr

    async def _in_toc(self, path: str) -> bool:
        """True for a file of an opened package not fetched yet (or fetched meanwhile: a
        package being replaced by its whole tree is waited for)."""
        found = self.materializer.partial(path)
        if found is None:
            return False
        opened, rel = found
        if opened.replaced is not None:
            await self.materializer.settled(opened)
            return os.path.lexists(path)
        return opened.is_file(rel)

    def _toc_names(self, directory: str) -> list[str]:
        found = self.materializer.partial(directory)
        return found[0].listing(found[1]) if found is not None else []

    async def _fetched(self, path: str) -> bool:
        """Fetch a file of an opened package; False if ``path`` is none."""
        found = self.materializer.partial(path)
        if found is None or not found[0].is_file(found[1]):
            return False
        await self.materializer.open_file(*found)
        return True

    # ---- attributes -------------------------------------------------------------------

    def _dir_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        attr = self._timeouts(pyfuse3.EntryAttributes())
        attr.st_ino = ino
        attr.st_mode = stat.S_IFDIR | 0o755
        attr.st_nlink = 2
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_blksize = 4096
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.mounted_at
        return attr

    def _real_attr(self, ino: int, path: str) -> pyfuse3.EntryAttributes:
        attr = self.real_attrs.get(ino)
        if attr is None:
            attr = self.real_attrs[ino] = self._stat_attr(ino, path)
        return attr

    def _stat_attr(self, ino: int, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            attr = self._toc_attr(ino, path)  # a file of an opened package, not fetched yet
            if attr is None:
                raise
            return attr
        attr = self._timeouts(pyfuse3.EntryAttributes())
        attr.st_ino = ino
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid, attr.st_gid = st.st_uid, st.st_gid
        attr.st_size = st.st_size
        attr.st_blocks = st.st_blocks
        attr.st_blksize = 1 << 17  # invite large reads
        attr.st_atime_ns, attr.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    @staticmethod
    def _timeouts(attr: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        return attr

    def _link_attr(self, ino: int, node: HostLink) -> pyfuse3.EntryAttributes:
        attr = self._dir_attr(ino)
        attr.st_mode = stat.S_IFLNK | 0o777
        attr.st_nlink = 1
        attr.st_size = len(os.fsencode(node.target))
        return attr

    def _text_attr(self, ino: int, node: ModuleText) -> pyfuse3.EntryAttributes:
        assert self.modules is not None
        attr = self._dir_attr(ino)
        attr.st_mode = stat.S_IFREG | 0o444
        attr.st_nlink = 1
        attr.st_size = len(self.modules.text(node.relative))
        return attr

    def _attr(self, ino: int, node: Node) -> pyfuse3.EntryAttributes:
        if isinstance(node, RealNode):
            return self._real_attr(ino, node.path)
        if isinstance(node, ModuleText):
            return self._text_attr(ino, node)
        if isinstance(node, HostText):
            attr = self._dir_attr(ino)
            attr.st_mode, attr.st_nlink = stat.S_IFREG | 0o444, 1
            attr.st_size = len(node.text)
            return attr
        if isinstance(node, HostLink):
            return self._link_attr(ino, node)
        return self._dir_attr(ino)

    def _negative(self) -> pyfuse3.EntryAttributes:
        """A cached 'no such entry': st_ino 0 with a timeout."""
        attr = self._timeouts(pyfuse3.EntryAttributes())
        attr.st_ino = 0
        return attr

    # ---- lookups ---------------------------------------------------------------------

    @errors_to_errno
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        parent = self._node(parent_inode)
        text = os.fsdecode(name)
        if isinstance(parent, VirtualDir):
            await self._modules_below(parent.relative)
            child = self._child(parent, text)
            if isinstance(child, RealNode):
                await self._written(child)
                child = self._child(parent, text)  # it may have been dropped meanwhile
            if child is None:
                return self._negative()
        elif isinstance(parent, HostDir):
            child = (await self._host_children(parent)).get(text)
            if child is None:
                return self._negative()
        elif isinstance(parent, HostLink | ModuleText | HostText):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        else:
            directory = await self._real_dir(parent, ctx)
            assert directory is not None
            path = os.path.join(directory, text)
            if not os.path.lexists(path) and not await self._in_toc(path):
                return self._negative()
            child = RealNode(path)
        ino = self._inode(child)
        return self._attr(ino, child)

    @errors_to_errno
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attr(inode, self._node(inode))

    async def forget(self, inode_list: Any) -> None:
        pass  # inodes stay valid for the life of the mount: the content never changes

    @errors_to_errno
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        node = self._node(inode)
        if isinstance(node, HostLink):
            return os.fsencode(node.target)
        if not isinstance(node, RealNode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(os.readlink(node.path))

    # ---- directories -------------------------------------------------------------------

    @errors_to_errno
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        node = self._node(inode)
        if isinstance(node, VirtualDir):
            await self._modules_below(node.relative)
            names = self._children(node)
            for name in names:
                if (f"{node.relative}/{name}" if node.relative else name) in self.files:
                    await self._written(self._child(node, name))
            listing = self._virtual_listing(node, names)
        elif isinstance(node, HostDir):
            children = await self._host_children(node)
            listing = [(os.fsencode(n), self._inode(children[n])) for n in sorted(children)]
        elif isinstance(node, HostLink | ModuleText | HostText):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        else:
            directory = await self._real_dir(node, ctx)
            assert directory is not None
            listing = self._real_listing(inode, directory)
        handle = self.next_handle
        self.next_handle += 1
        self.listings[handle] = listing
        return handle

    def _virtual_listing(self, node: VirtualDir, names: list[str]) -> Listing:
        """The entries of a virtual directory: ``names``, then its prefixes, whose names
        and inodes are worked out as readdir reaches them (a prefix wins over another
        entry of the same name, as in ``_child``)."""
        others = []
        for name in names:
            child = self._child(node, name)
            if child is not None and not isinstance(child, PrefixDir):
                others.append((os.fsencode(name), self._inode(child)))
        return FolderListing(others, self.prefix_inodes, node.relative)

    def _real_listing(self, inode: int, directory: str) -> Listing:
        """The entries of a store directory, listed once."""
        listing = self.real_listings.get(inode)
        if listing is None:
            names = set(os.listdir(directory)) | set(self._toc_names(directory))
            listing = [(os.fsencode(name), self._inode(RealNode(os.path.join(directory, name))))
                       for name in sorted(names)]
            self.real_listings[inode] = listing
        return listing

    @errors_to_errno
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self.listings.get(fh, [])
        reply, real_attrs, nodes = pyfuse3.readdir_reply, self.real_attrs, self.nodes
        prefixes = listing.inodes if isinstance(listing, FolderListing) else None
        for index in range(start_id, len(listing)):
            name, ino = listing[index]
            if prefixes is not None and prefixes.holds(ino):
                attr = self._dir_attr(ino)
                if prefixes is not self.prefix_inodes:  # opened before a refresh
                    self._keep(ino, prefixes)
            else:
                attr = real_attrs.get(ino) or self._attr(ino, nodes[ino])
            if not reply(token, name, attr, index + 1):
                return

    def _keep(self, ino: int, prefixes: PrefixInodes) -> None:
        """Keep serving a prefix inode of a replaced tree."""
        node = prefixes.node(ino)
        if node is not None:
            self.nodes[ino] = node
            self.inodes[node] = ino

    async def releasedir(self, fh: int) -> None:
        self.listings.pop(fh, None)

    # ---- files ------------------------------------------------------------------------

    @errors_to_errno
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if isinstance(node, HostLink):  # opening a link follows it: never reached
            raise pyfuse3.FUSEError(errno.ELOOP)
        if isinstance(node, ModuleText | HostText):
            handle = VIRTUAL_FH + self.next_handle
            self.next_handle += 1
            if isinstance(node, HostText):
                self.texts[handle] = node.text
            else:
                assert self.modules is not None
                self.texts[handle] = self.modules.text(node.relative)
            return pyfuse3.FileInfo(fh=handle, keep_cache=True)
        if not isinstance(node, RealNode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        try:
            fd = os.open(node.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if not await self._fetched(node.path):
                raise
            fd = os.open(node.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        key = self.key_of(node.path)
        if key is not None:
            self.handle_keys[fd] = key
            self.open_keys[key] += 1
            self.materializer.usage.touch(key)
        # immutable content: the kernel may keep its pages across opens
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @errors_to_errno
    async def read(self, fh: int, off: int, size: int) -> bytes:
        text = self.texts.get(fh)
        if text is not None:
            return text[off:off + size]
        return os.pread(fh, size, off)

    async def release(self, fh: int) -> None:
        if self.texts.pop(fh, None) is not None:
            return
        key = self.handle_keys.pop(fh, None)
        if key is not None:
            self.open_keys[key] -= 1
            if self.open_keys[key] <= 0:
                del self.open_keys[key]
        try:
            os.close(fh)
        except OSError:
            pass

    # ---- the rest ---------------------------------------------------------------------

    @errors_to_errno
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.materializer.store.root)
        data = pyfuse3.StatvfsData()
        data.f_bsize, data.f_frsize = st.f_bsize, st.f_frsize
        data.f_blocks, data.f_bfree, data.f_bavail = st.f_blocks, 0, 0
        data.f_files, data.f_ffree, data.f_favail = st.f_files, 0, 0
        data.f_namemax = 255
        return data

    @errors_to_errno
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        if name not in SERVED_XATTRS:
            raise pyfuse3.FUSEError(_unserved(name))
        node = self._node(inode)
        if name == PROJECTION_XATTR and inode == pyfuse3.ROOT_INODE:
            return self.tree.projection.encode()
        if name == STORE_XATTR and inode == pyfuse3.ROOT_INODE:
            return os.fsencode(self.materializer.store.root)
        if name == TARGET_XATTR and isinstance(node, PrefixDir) and self.host is not None:
            return self.host.target_status(node.dag_hash).encode()
        if name == CHOICE_XATTR and isinstance(node, HostDir) and self.host is not None:
            text = await self.host.describe(node.relative)
            if text is not None:
                return text.encode()
        if name != STATUS_XATTR or not isinstance(node, PrefixDir):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        # a package not yet asked for is looked up in the store: not on the trio thread
        status = await trio.to_thread.run_sync(self.materializer.status, node.dag_hash)
        return status.encode()

    @errors_to_errno
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        node = self._node(inode)
        if inode == pyfuse3.ROOT_INODE:
            return [PROJECTION_XATTR, STORE_XATTR]
        if isinstance(node, PrefixDir):
            return [STATUS_XATTR] + ([TARGET_XATTR] if self.host is not None else [])
        if isinstance(node, HostDir) and node.relative != HOST_DIR:
            return [CHOICE_XATTR]
        return []
