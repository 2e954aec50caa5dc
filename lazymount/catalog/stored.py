"""The catalog kept on disk: each mirror's index is parsed once and reused while unchanged.

Under ``STORE/catalog/``::

    indexes/<sha256>.json      an index document as the mirror served it (content-addressed)
    mirrors/<url digest>.bin   the parsed records of one mirror: one JSON header line (format,
                               mirror URL, layout, index checksum, ETag, payload sha256), then
                               its ``IndexTable`` as msgpack (decoded straight into records)
    trees/<digest>.bin         where a tree placed the catalog's specs (a JSON header, then a
                               ``marshal`` payload), per set of indexes and projection

A mount first asks the mirror one small question: has the document that names the index
changed (the v3 index manifest, or v2's ``index.json.hash``)? It asks with If-None-Match when
the server gave an ETag, so an unchanged index costs one small request and a 304. If the
index is the one stored, the records are loaded from here: no download, no JSON parsing.
Otherwise the index is downloaded, parsed, and stored for the next time (a daemon stores it
once it has mounted: ``write_later`` and ``flush``).

Only what is in use is kept: each mirror's current index document and the one before it (a
daemon may still read nodes of the index it served before a refresh), and the placements
made of them; the others are deleted whenever a new index is stored. A file younger than
``PRUNE_GRACE`` is kept too: another daemon sharing the store may have written it a moment
before the records that name it.

Records are light (``SpecRecord``): a record's whole node is read back from the stored index
document, by byte offsets, when something asks for it. A stored file that does not check out
(format, Python version, sha256, shape, a missing document) is ignored and rebuilt from the
mirror. If the mirror cannot be reached, the last stored catalog is used, with a warning: the
index is only a hint, and packages already in the store keep working.

Async functions run on the trio thread; parsing, loading and writing run in worker threads.
"""

from __future__ import annotations

import array
import gc
import hashlib
import json
import json.decoder
import logging
import marshal
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from lazymount.buildcache.formats import LAYOUT_VERSIONS, Identity, discover, stored_layout
from lazymount.buildcache.index import (
    IndexSource,
    IndexTable,
    SpecRecord,
    keyed,
    scan_index,
)
from lazymount.buildcache.layout import is_sha256
from lazymount.catalog.installtree import Folder, InstallTree
from lazymount.errors import FormatError, LazymountError, NotInMirror, StoreError
from lazymount.mirror.transport import Mirror
from lazymount.system.files import write_atomically

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from lazymount.buildcache.formats import CacheLayout
    from lazymount.catalog.sitecatalog import SiteCatalog

    # the site catalog of a mirror for the index an Identity names, or None (sitecatalog.py)
    SiteReader = Callable[[Mirror, CacheLayout, Identity], Awaitable[SiteCatalog | None]]

log = logging.getLogger(__name__)

FORMAT = 7  # bump when a payload changes shape (4: an IndexTable in msgpack; 5: trees by
# order; 6: trees as folders of catalog positions) or what the parser keeps (7: names that
# cannot be placed safely are dropped: an older table may hold them)
PRUNE_GRACE = 600.0  # seconds an unused stored file is kept after it was written


class CatalogStore:
    """The on-disk catalog of every mirror a store has mounted. Safe to share between
    concurrent loads of different mirrors; several daemons may share a store (every file
    is replaced atomically)."""

    def __init__(self, root: Path, *, write_later: bool = False):
        self.root = root
        self.indexes = root / "indexes"
        self.mirrors = root / "mirrors"
        self.trees = root / "trees"
        self.loaded: dict[str, str] = {}  # mirror URL -> checksum of the index its records are of
        self.placements: dict[str, SiteCatalog] = {}  # URL -> its site catalog, until placed
        self.unchecked: set[str] = set()  # URLs loaded from here without asking their mirror
        # a daemon stores what a first load parsed after it has mounted (``flush``): writing
        # the 118 MB document and the tables is off the path to a usable mount
        self.write_later = write_later
        self._pending: list[Callable[[], None]] = []
        self._pending_lock = threading.Lock()

    def flush(self) -> None:
        """Write what loads left for later (with ``write_later``). A write that fails is
        logged: the mount works without it, and the next one parses again. Blocking; any
        thread."""
        while True:
            with self._pending_lock:
                if not self._pending:
                    return
                write = self._pending.pop(0)
            try:
                write()
            except Exception:  # a bug here must not take the mount down
                log.exception("storing the catalog failed")

    def _store(self, write: Callable[[], None]) -> None:
        if self.write_later:
            with self._pending_lock:
                self._pending.append(write)
        else:
            write()

    def records_path(self, url: str) -> Path:
        return self.mirrors / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.bin"

    async def load(self, mirror: Mirror, position: int, site: SiteReader | None = None, *,
                   ask: bool = True) -> dict[str, SpecRecord]:
        """The records of one mirror's index, from the store when the index is unchanged,
        else from ``site`` (the site catalog, if it gives one for the mirror's index), else
        from the JSON index. Without ``ask``, stored records are used without asking the
        mirror first (the URL goes into ``unchecked``: ``unchanged`` asks later). Raises a
        LazymountError naming the mirror (only if there is no stored catalog to fall back
        on)."""
        saved = await trio.to_thread.run_sync(self._read_saved, mirror.url)
        identity: Identity | None = None
        if saved is not None and not ask:
            records = await trio.to_thread.run_sync(
                self._load_records, saved[0], saved[1], position)
            if records is not None:
                self.unchecked.add(mirror.url)
                return records
            saved = None
        if saved is not None:
            header, payload = saved
            try:
                identity = await stored_layout(mirror, header["layout"]).index_identity(
                    mirror, header.get("etag"))
            except NotInMirror:
                identity = None  # the index moved (another layout?): look again
            except LazymountError as exc:
                log.warning("%s; using the catalog stored at the last mount", exc)
                identity = Identity(True, None, header.get("etag"))
            if identity is not None and (identity.unchanged
                                         or identity.checksum == header["checksum"]):
                records = await trio.to_thread.run_sync(
                    self._load_records, header, payload, position)
                if records is not None:
                    if identity.etag != header.get("etag"):
                        await trio.to_thread.run_sync(
                            self._save, dict(header, etag=identity.etag), payload)
                    return records
                saved = None
        layout = await discover(mirror)
        if identity is None or identity.unchanged:
            identity = await layout.index_identity(mirror, None)
        if site is not None:
            catalog = await site(mirror, layout, identity)
            if catalog is not None:
                return await trio.to_thread.run_sync(
                    self._adopt, mirror.url, layout.version, identity, catalog, position)
        blob = await layout.read_index(mirror, identity.named)
        return await trio.to_thread.run_sync(
            self._build, mirror.url, layout.version, identity, blob, position, saved)

    async def unchanged(self, mirror: Mirror) -> bool:
        """True if ``mirror`` still has the index whose records were loaded last: one small
        request, conditional when the server gave an ETag (a 304). False if it changed or
        was not loaded from here. Raises a LazymountError naming the mirror if it fails."""
        checksum = self.loaded.get(mirror.url)
        header = await trio.to_thread.run_sync(self._read_header, mirror.url)
        if checksum is None or header is None or header.get("checksum") != checksum:
            return False
        try:
            identity = await stored_layout(mirror, header.get("layout", 3)).index_identity(
                mirror, header.get("etag"))
        except NotInMirror:
            return False  # the index moved: a full load looks again
        return identity.unchanged or identity.checksum == checksum

    def _read_header(self, url: str) -> dict[str, Any] | None:
        """The header line of the stored records of ``url`` (not checked: ``load`` does)."""
        return _header_of(self.records_path(url))

    def tree(self, root: str, catalog: dict[str, SpecRecord], projection: str,
             urls: list[str]) -> InstallTree:
        """The install tree of a catalog loaded from the mirrors ``urls`` (in order): placed
        as an earlier mount placed it when the same indexes and projection were used, else
        computed (a second or more for 100,000 specs) and kept. Blocking; any thread."""
        identity = json.dumps([FORMAT, projection, [(u, self.loaded.get(u)) for u in urls]])
        path = self.trees / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.bin"
        try:
            data = path.read_bytes()
            line, _, payload = data.partition(b"\n")
            header = json.loads(line)
            if (header.get("identity") == identity
                    and header.get("python") == list(sys.version_info[:2])):
                if header.get("payload") != hashlib.sha256(payload).hexdigest():
                    raise ValueError("sha256 mismatch")
                with _gc_paused():
                    return _placed_tree(root, catalog, projection, marshal.loads(payload))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError, TypeError, IndexError) as exc:
            log.warning("the stored placement %s is damaged (%s); placing again", path, exc)
        with _gc_paused():
            tree = self._site_placed(root, catalog, projection, urls) or \
                InstallTree(root, catalog, projection)
        self._store(lambda: _save_tree(path, identity, tree))
        return tree

    def _site_placed(self, root: str, catalog: dict[str, SpecRecord], projection: str,
                     urls: list[str]) -> InstallTree | None:
        """The tree of a one-mirror catalog as the site catalog it came from placed it (if
        that is the index loaded, and the placement fits)."""
        sites, self.placements = self.placements, {}  # once: each holds its payload
        site = sites.get(urls[0]) if len(urls) == 1 else None
        if site is None or site.checksum != self.loaded.get(urls[0]):
            return None
        return site.place(root, catalog, projection)

    # ---- worker threads -------------------------------------------------------------------

    def _read_saved(self, url: str) -> tuple[dict[str, Any], bytes] | None:
        """The stored header and payload for ``url``, if they check out."""
        path = self.records_path(url)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the stored catalog %s (%s); rebuilding it", path,
                        exc.strerror)
            return None
        line, _, payload = data.partition(b"\n")
        try:
            header = json.loads(line)
            good = (isinstance(header, dict) and header.get("format") == FORMAT
                    and header.get("python") == list(sys.version_info[:2])
                    and header.get("url") == url and header.get("layout") in LAYOUT_VERSIONS
                    and is_sha256(str(header.get("checksum")))
                    and header.get("payload") == hashlib.sha256(payload).hexdigest())
        except ValueError:
            good = False
        if not good:
            log.warning("the stored catalog of %s is damaged or out of date; rebuilding it", url)
            path.unlink(missing_ok=True)
            return None
        return header, payload

    def _load_records(self, header: dict[str, Any], payload: bytes, position: int
                      ) -> dict[str, SpecRecord] | None:
        document = self.indexes / f"{header['checksum']}.json"
        if not document.is_file():  # whole nodes could not be read: fetch it again
            log.warning("the stored index of %s is missing; rebuilding it", header["url"])
            return None
        self.loaded[header["url"]] = header["checksum"]
        source = StoredIndex(document, header["checksum"],
                             records=self.records_path(header["url"]))
        try:
            return _decoded(payload, source, position)
        except (msgspec.DecodeError, ValueError, IndexError) as exc:
            log.warning("the stored catalog of %s is damaged (%s); rebuilding it",
                        header["url"], exc)
            return None

    def _build(self, url: str, layout: int, identity: Identity, blob: bytes, position: int,
               saved: tuple[dict[str, Any], bytes] | None) -> dict[str, SpecRecord]:
        """Records of a downloaded index: the stored ones if it is the stored index (a v2
        mirror without index.json.hash), else parsed and stored for the next mount."""
        # a blob the identity names (v3, OCI) was checked against its sha256 as it came in:
        # hashing 118 MB again would cost a first mount 0.15 s
        named = identity.named
        checksum = named.checksum if named is not None else hashlib.sha256(blob).hexdigest()
        # an ETag read before a newer index was published must not vouch for this one
        etag = identity.etag if identity.checksum in (None, checksum) else None
        if saved is not None and saved[0]["checksum"] == checksum:
            records = self._load_records(saved[0], saved[1], position)
            if records is not None:
                return records
        with _gc_paused():
            table = scan_index(blob)
            payload = msgspec.msgpack.encode(table)
        rows = len(table.records)
        del table  # with the parse's other leftovers: records made now are laid out together
        nodes = StoredIndex(self.indexes / f"{checksum}.json", checksum, data=blob)
        return self._keep(url, layout, checksum, etag, payload, rows, nodes, position)

    def _adopt(self, url: str, layout: int, identity: Identity, catalog: SiteCatalog,
               position: int) -> dict[str, SpecRecord]:
        """Records of a site catalog made from the index ``identity`` names: kept as if
        parsed here."""
        assert identity.checksum is not None
        self.placements[url] = catalog
        nodes = catalog.nodes(self.indexes / f"{identity.checksum}.json",
                              self.records_path(url))
        return self._keep(url, layout, identity.checksum, identity.etag, catalog.records,
                          catalog.rows, nodes, position)

    def _keep(self, url: str, layout: int, checksum: str, etag: str | None, payload: bytes,
              rows: int, nodes: StoredIndex, position: int) -> dict[str, SpecRecord]:
        """The records of a stored-form ``payload``, stored for the next mount."""
        self.loaded[url] = checksum
        header = {"format": FORMAT, "python": list(sys.version_info[:2]), "url": url,
                  "layout": layout, "checksum": checksum, "etag": etag,
                  "records": rows}  # rows, dropped ones too
        self._store(lambda: self._save_index(header, payload, nodes))
        # decoded from the stored form, as a remount does: the records get memory of their
        # own instead of holes between the parse's freed objects, so a first mount holds no
        # more memory than a remount; the decode is cheap next to the parse
        return _decoded(payload, nodes, position)

    def _save_index(self, header: dict[str, Any], payload: bytes, nodes: StoredIndex) -> None:
        """Store a parsed index: its document (then read back from disk), then its records.
        The mount works without them (logged): the next one parses again."""
        try:
            nodes.save()
            self._save(header, payload)
        except OSError as exc:
            log.warning("cannot store the catalog of %s: %s", header["url"], exc.strerror)
            return
        self.prune()

    def _save(self, header: dict[str, Any], payload: bytes) -> None:
        header = dict(header, payload=hashlib.sha256(payload).hexdigest())
        before = self._read_header(header["url"]) or {}
        previous = (before.get("checksum") if before.get("checksum") != header["checksum"]
                    else before.get("previous"))
        if isinstance(previous, str) and is_sha256(previous):
            header["previous"] = previous  # kept by ``prune`` while this index is current
        data = json.dumps(header).encode() + b"\n" + payload
        write_atomically(self.records_path(header["url"]), data, make_parents=True)

    def prune(self) -> None:
        """Delete the index documents no mirror's stored records name as their current or
        previous index, and the placements made of other indexes, unless younger than
        PRUNE_GRACE. Blocking; any thread."""
        keep = set(self.loaded.values())
        for path in _listing(self.mirrors, ".bin"):
            header = _header_of(path) or {}
            keep.update(str(header.get(key)) for key in ("checksum", "previous"))
        old = time.time() - PRUNE_GRACE
        for path in _listing(self.indexes, ".json"):
            if path.name.removesuffix(".json") not in keep:
                _remove_if_older(path, old)
        for path in _listing(self.trees, ".bin"):
            if not _tree_indexes(path) <= keep:
                _remove_if_older(path, old)


class StoredIndex(IndexSource):
    """Whole index nodes, read back from a stored index document by byte offsets.

    The document's sha256 is checked once, on the first read. Thread: any (a lock guards
    the file)."""

    def __init__(self, path: Path, checksum: str, *, verified: bool = False,
                 data: bytes | None = None, records: Path | None = None):
        super().__init__(data, f"the stored index {path}")
        self.path = path
        self.checksum = checksum
        self.records = records  # the stored records made from it: dropped if it is damaged
        self._lock = threading.Lock()
        self._checked = verified

    def save(self) -> None:
        """Write the document held in memory to ``path``, and read from there from now on.
        Raises OSError (it stays in memory)."""
        with self._lock:
            data = self._data
        if data is not None:
            write_atomically(self.path, data, make_parents=True)
            with self._lock:
                self._data, self._checked = None, True

    def read(self, start: int, end: int) -> bytes:
        with self._lock:
            if self._data is not None:
                return self._data[start:end]
            try:
                with open(self.path, "rb") as handle:
                    if not self._checked:
                        if hashlib.file_digest(handle, "sha256").hexdigest() != self.checksum:
                            if self.records is not None:  # the next mount downloads it again
                                self.records.unlink(missing_ok=True)
                            raise FormatError(f"the stored index {self.path} is damaged")
                        self._checked = True
                    return os.pread(handle.fileno(), end - start, start)
            except OSError as exc:
                raise StoreError(f"cannot read the stored index {self.path}: "
                                 f"{exc.strerror}") from None


# ---------------------------------------------------------------------------------------------
# Helpers


def _header_of(path: Path) -> dict[str, Any] | None:
    """The JSON header line of a stored file (not checked), or None."""
    try:
        with open(path, "rb") as handle:
            header = json.loads(handle.readline(1 << 20))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _listing(directory: Path, suffix: str) -> list[Path]:
    try:
        return [path for path in directory.iterdir() if path.name.endswith(suffix)]
    except FileNotFoundError:
        return []


def _tree_indexes(path: Path) -> set[str]:
    """The index checksums a stored placement was made of ({""}: unreadable)."""
    try:
        identity = json.loads((_header_of(path) or {})["identity"])
        return {str(checksum) for _url, checksum in identity[2]}
    except (KeyError, ValueError, TypeError, IndexError):
        return {""}


def _remove_if_older(path: Path, limit: float) -> None:
    try:
        if path.stat().st_mtime < limit:
            path.unlink()
    except FileNotFoundError:
        pass  # another daemon sharing the store pruned it first
    except OSError as exc:  # the mount works with it
        log.warning("cannot delete the unused %s: %s", path, exc.strerror)


def _save_tree(path: Path, identity: str, tree: InstallTree) -> None:
    """Keep the placement of a tree for the next mount of the same indexes and projection;
    the mount works without it (logged). A folder's prefixes are kept as their positions
    in the catalog's order, so that a mount loading them keys them with the catalog's own
    hash strings (100,000 of them: 8 MB not held twice)."""
    payload = marshal.dumps(stored_placement(tree))
    header = {"identity": identity, "python": list(sys.version_info[:2]),
              "payload": hashlib.sha256(payload).hexdigest()}
    try:
        write_atomically(path, json.dumps(header).encode() + b"\n" + payload, make_parents=True)
    except OSError as exc:
        log.warning("cannot store the placement of the catalog: %s", exc.strerror)


def stored_placement(tree: InstallTree) -> tuple[str, dict[str, tuple[list[str], bytes]],
                                                 list[str]]:
    """What is kept of a tree's placement: the catalog's order, each folder's subdirectory
    names and the catalog positions of its prefixes, the refused hashes."""
    position = {dag_hash: n for n, dag_hash in enumerate(tree.catalog)}
    folders = {relative: (sorted(folder.subdirs),
                          array.array("I", [position[h] for h in folder.leaves]).tobytes())
               for relative, folder in tree.folders.items()}
    return _order(tree.catalog), folders, sorted(tree.refused)


def _placed_tree(root: str, catalog: dict[str, SpecRecord], projection: str,
                 stored: Any) -> InstallTree:
    """The tree a stored placement gives. Raises ValueError if it was not made for the
    catalog's hashes in this order."""
    order, stored_folders, refused = stored
    if order != _order(catalog):
        raise ValueError("made for another catalog")
    hashes = list(catalog)
    folders = {}
    for relative, (subdirs, leaves) in stored_folders.items():
        positions = array.array("I")
        positions.frombytes(leaves)
        folders[relative] = Folder(set(subdirs), [hashes[n] for n in positions])
    return InstallTree.placed(root, catalog, projection, folders, refused)


def _order(catalog: dict[str, SpecRecord]) -> str:
    """The digest of a catalog's hashes in order."""
    return hashlib.sha256("".join(catalog).encode()).hexdigest()


def _decoded(payload: bytes, source: StoredIndex, position: int) -> dict[str, SpecRecord]:
    """The records of a stored ``IndexTable``, keyed by hash; ``source`` takes its tables.
    Raises msgspec.DecodeError or ValueError if it is not one."""
    record = source.record_class(position)
    decoder = msgspec.msgpack.Decoder(tuple[list[str], list[str], list[dict[str, Any]], bytes,
                                            list[record | None]])  # type: ignore[valid-type]
    with _gc_paused():
        table = IndexTable(*decoder.decode(payload))
        _check_rows(table)
        source.fill(table)
        return keyed(table.hashes, table.records)


def _check_rows(table: IndexTable) -> None:
    """Raises ValueError if a stored table's parts disagree (its sha256 checked out, so
    only a bug could do this; the rows themselves are not walked, to keep a mount fast)."""
    rows = len(table.spans) // 16
    if len(table.spans) % 16 or len(table.records) != rows or rows > len(table.hashes):
        raise ValueError("its parts do not match")


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while 100,000s of containers are made: a collection
    pass over all of them every few thousand allocations made parsing 4x slower. Nested and
    concurrent uses are counted; the collector is restored by the last one."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()

