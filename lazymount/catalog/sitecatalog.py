"""The site catalog: a mirror's index as ``lazymount publish`` writes it, and as a mount reads
it instead of the JSON document.

A site publishes, under ``lazymount/v1/`` of the mirror (``buildcache/published.py``), a
clearsigned envelope naming the sha256 of the Spack index it was made from and one
content-addressed payload (a msgpack array)::

    [FORMAT, RECORDS, zstd(records), zstd(index document), placement | None]

*records* is the catalog store's own form (an ``IndexTable`` in msgpack; RECORDS is the store's
format, which changes with it), so it decodes straight into records, without a Python object
per field; the *document* is the index
itself, kept compressed in memory and read back only for whole nodes (the Spack database);
*placement* is where the default projection puts every spec (rows in name order per folder),
which a first mount may take instead of projecting 100,000 paths.

A mount uses a catalog only if a trusted key signed it (even for a mirror mounted
``--unsigned``) and it names the index the mirror has now; every record is checked again with
the index parser's own checks (``check_record``), so a signed catalog of a hostile index
shows no more than the JSON would. Otherwise the JSON index is read as before, and the log
says why.
"""

from __future__ import annotations

import array
import errno
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import msgspec
import trio

from lazymount.buildcache import published
from lazymount.buildcache.formats import MAX_INDEX_BYTES, CacheLayout, Identity
from lazymount.buildcache.index import (
    IndexSource,
    IndexTable,
    SpecRecord,
    _good_name,
    check_record,
    records_of,
)
from lazymount.buildcache.layout import is_dag_hash, is_sha256
from lazymount.buildcache.ocitoc import RegistryPublished
from lazymount.catalog.installtree import Folder, InstallTree
from lazymount.catalog.stored import FORMAT as RECORDS
from lazymount.catalog.stored import StoredIndex, _gc_paused
from lazymount.errors import FormatError, IntegrityError, LazymountError, NotInMirror
from lazymount.mirror.transport import Mirror
from lazymount.trust.policy import Trust

log = logging.getLogger(__name__)

FORMAT = 1  # of the payload
MAX_PAYLOAD_BYTES = 1 << 30
MAX_RECORDS_BYTES = 1 << 30  # decompressed; 100,000 specs take 8 MB
MAX_WARNINGS = 10  # refused records logged one by one; the rest are counted
# the rules that place a spec (installtree.py's _Placer, layout.py's projection): a placement
# made under other rules is not used. Bump it when they change what goes where.
PLACING_RULES = 1
ZSTD_LEVEL = 9  # 100,000 specs: 118 MB of JSON -> 10 MB in 1 s (19 saves 4% in 60 s)

_NOT_USED = "%s: the site catalog is not used (%s); reading the JSON index"


# ---- the payload ----------------------------------------------------------------------------


class Placement(msgspec.Struct, array_like=True, frozen=True):
    """Where ``projection`` put the records: per folder, its subdirectories and the rows of
    its prefixes in name order (uint32s); ``layout``: the placing rules (PLACING_RULES)."""

    projection: str
    layout: int
    folders: dict[str, tuple[list[str], bytes]]
    refused: bytes  # rows


def encode(document: bytes, table: IndexTable, tree: InstallTree | None) -> bytes:
    """The payload of a scanned index ``document`` (``table``: ``scan_index(document)``),
    with the placement of ``tree`` (made from the same records) if given. Blocking."""
    import zstandard  # here: a mount that finds no site catalog never needs it

    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    records = compressor.compress(msgspec.msgpack.encode(table))
    packed = compressor.compress(document)
    return msgspec.msgpack.encode([FORMAT, RECORDS, records, packed,
                                   None if tree is None else placement_of(tree)])


def placement_of(tree: InstallTree) -> Placement:
    rows = {dag_hash: record.row for dag_hash, record in tree.catalog.items()}
    return Placement(
        tree.projection, PLACING_RULES,
        {relative: (sorted(folder.subdirs),
                    array.array("I", [rows[h] for h in folder.leaves]).tobytes())
         for relative, folder in tree.folders.items()},
        array.array("I", sorted(rows[h] for h in tree.refused)).tobytes())


# ---- what a mount takes from it -------------------------------------------------------------


@dataclass
class SiteCatalog:
    """A checked catalog: ``records``, the catalog store's form of its records (what this
    version accepted); the index document, compressed; its placement, if any."""

    checksum: str  # sha256 of the index it was made from
    records: bytes
    rows: int
    packed: bytes
    placement: Placement | None  # None too if this version refused a record
    absent: frozenset[int]  # rows without a record

    def _fits(self, placement: Placement) -> bool:
        """Every row placed once (as a prefix or refused), each with a record, in folders
        whose names are names and whose subdirectories are folders too."""
        rows = _rows(b"".join(leaves for _, leaves in placement.folders.values()))
        refused = _rows(placement.refused)
        if rows is None or refused is None:
            return False
        listed = set(rows) | set(refused)
        return (len(listed) == len(rows) + len(refused) and not listed & self.absent
                and max(listed, default=0) < self.rows
                and all(_good_folder(relative) and all(
                    "/" not in name and _join(relative, name) in placement.folders
                    for name in subdirs)
                    for relative, (subdirs, _) in placement.folders.items()))

    def place(self, root: str, catalog: dict[str, SpecRecord], projection: str
              ) -> InstallTree | None:
        """The tree of ``catalog`` (this catalog's records, alone) as its placement has it,
        or None if the placement is missing, made for another projection or other placing
        rules, or does not fit the records. Blocking."""
        placement = self.placement
        if placement is None or placement.projection != projection or \
                placement.layout != PLACING_RULES or not catalog:
            return None
        if not self._fits(placement):
            log.warning("the site catalog's placement does not fit its records; placing them")
            return None
        hash_of = next(iter(catalog.values())).source.hashes.__getitem__  # every row's
        placed = {relative: Folder(set(subdirs), list(map(hash_of, array.array("I", leaves))))
                  for relative, (subdirs, leaves) in placement.folders.items()}
        refused = list(map(hash_of, array.array("I", placement.refused)))
        return InstallTree.placed(root, catalog, projection, placed, refused)

    def catalog(self, position: int) -> dict[str, SpecRecord]:
        """The records keyed by hash, as listed by the mirror at ``position``, their whole
        nodes read from the document held in memory (a mount without a catalog store).
        Blocking."""
        table = IndexTable(*msgspec.msgpack.decode(self.records, type=_TABLE))
        return records_of(table, position, IndexSource(
            _unpacked(self.packed, self.checksum, "the site catalog's index")))

    def nodes(self, path: Path, records: Path | None = None) -> StoredIndex:
        """The whole nodes, read from the document (decompressed on first use, then
        stored at ``path`` by the catalog store)."""
        return PackedIndex(path, self.checksum, self.packed, records)


class PackedIndex(StoredIndex):
    """A stored index whose document is still in memory, compressed: decompressed (and its
    sha256 checked against the index the catalog names) on the first read or save."""

    def __init__(self, path: Path, checksum: str, packed: bytes, records: Path | None):
        self._plain: bytes | None = None
        super().__init__(path, checksum, records=records)
        self._packed: bytes | None = packed  # after the base class set ``_data`` to None

    def save(self) -> None:
        """As StoredIndex.save; OSError too if the document is not the index the catalog
        names (the catalog store then keeps nothing of it, and logs why)."""
        try:
            super().save()
        except FormatError as exc:
            raise OSError(errno.EINVAL, str(exc)) from None

    @property
    def _data(self) -> bytes | None:
        if self._packed is not None:  # StoredIndex reads it under its lock
            self._plain = _unpacked(self._packed, self.checksum, self.name)
            self._packed = None
        return self._plain

    @_data.setter
    def _data(self, value: bytes | None) -> None:
        self._plain = value
        if value is None:
            self._packed = None


def _unpacked(packed: bytes, checksum: str, name: str) -> bytes:
    try:
        document = _decompress(packed, MAX_INDEX_BYTES)
    except FormatError as exc:
        raise FormatError(f"{name} is damaged ({exc})") from None
    if hashlib.sha256(document).hexdigest() != checksum:
        raise FormatError(f"{name} is damaged (it is not the index {checksum[:12]})")
    return document


async def read(mirror: Mirror, layout: CacheLayout, identity: Identity, trust: Trust | None,
               places: Sequence[Mirror] = ()) -> SiteCatalog | None:
    """The site catalog for the index ``identity`` names: from the mirror itself (a
    registry keeps it under a tag, ``buildcache/ocitoc.py``: asked only when a key is
    trusted that could have signed it), else from the first of ``places`` (``--toc``
    URLs) with one that can be used; None (the log says why) if the JSON index must be
    read. Fetches each place's envelope and, where it names the mirror's index, its
    payload."""
    own: list[Mirror] = [mirror] if mirror.kind == "url" else []
    if mirror.kind == "oci" and trust is not None and trust.verifier is not None:
        own = [RegistryPublished(mirror)]
    candidates = own + list(places)
    if not candidates:
        return None
    if identity.checksum is None:
        log.info(_NOT_USED, mirror.url, "the mirror names no sha256 of its index")
        return None
    reasons = []
    for place in candidates:
        where = f"the site catalog of {place.url}"
        try:
            try:
                envelope = await place.read(published.catalog_path(),
                                            published.MAX_ENVELOPE_BYTES, revalidate=True)
            except NotInMirror:
                continue  # none there
            payload = await _payload(place, layout, identity, trust, envelope, where)
            catalog = await trio.to_thread.run_sync(decode, payload, identity.checksum, where)
        except LazymountError as exc:
            reasons.append(str(exc) if place in own else f"at {place.url}: {exc}")
            continue
        log.info("%s: index of %d specs from the site catalog%s (%d bytes)", mirror.url,
                 catalog.rows, "" if place in own else f" at {place.url}", len(payload))
        return catalog
    if reasons:
        log.warning(_NOT_USED, mirror.url, "; ".join(reasons))
    else:
        log.info("%s: no site catalog; reading the JSON index", mirror.url)
    return None


async def _payload(mirror: Mirror, layout: CacheLayout, identity: Identity,
                   trust: Trust | None, envelope: bytes, where: str) -> bytes:
    """The payload a trusted envelope names, checked. Raises a LazymountError saying why
    it cannot be used."""
    if trust is None or trust.verifier is None:
        raise FormatError("no key is trusted to sign it (give --trust-key)")
    body = published.open_envelope(await trust.verify(envelope, where), "catalog", where)
    index, payload = body.get("index"), body.get("payload")
    if not isinstance(index, dict) or not isinstance(payload, dict):
        raise FormatError(f"{where}: it names no index or payload")
    made_from = str(index.get("sha256"))[:64]
    if made_from != identity.checksum:
        raise FormatError(f"it was made from the index {made_from[:12]}, and the mirror has "
                          f"{str(identity.checksum)[:12]}")
    if index.get("layout") != layout.version:
        raise FormatError(f"it was made from a layout {str(index.get('layout'))[:8]} cache, "
                          f"and the mirror is layout {layout.version}")
    if payload.get("records") != RECORDS:  # another version's records: not downloaded
        raise FormatError(f"its records are of format {str(payload.get('records'))[:20]}, "
                          f"this version reads {RECORDS} (publish again with it)")
    checksum, size = payload.get("sha256"), payload.get("size")
    if not (isinstance(checksum, str) and is_sha256(checksum) and isinstance(size, int)
            and 0 < size <= MAX_PAYLOAD_BYTES):
        raise FormatError(f"{where}: its payload is not named by sha256 and size")
    data = await mirror.read(published.blob_path(checksum), size)  # content-addressed
    if len(data) != size:
        raise IntegrityError(f"its payload is truncated ({len(data)} of {size} bytes)")
    if hashlib.sha256(data).hexdigest() != checksum:
        raise IntegrityError(f"its payload is corrupt (its sha256 is not {checksum[:12]})")
    return data


def decode(payload: bytes, checksum: str, where: str) -> SiteCatalog:
    """The checked catalog of a payload made from the index ``checksum``. Raises
    FormatError. Blocking."""
    try:
        form, kind, records, packed, placement = msgspec.msgpack.decode(
            payload, type=tuple[int, int, bytes, bytes, Placement | None])
    except (msgspec.DecodeError, ValueError) as exc:
        raise FormatError(f"{where}: the payload is not a catalog ({exc})") from None
    if (form, kind) != (FORMAT, RECORDS):
        raise FormatError(f"{where}: payload format {form}.{kind} is not {FORMAT}.{RECORDS}")
    stored = _decompress(records, MAX_RECORDS_BYTES)
    with _gc_paused():  # 100,000 tuples
        try:
            table = IndexTable(*msgspec.msgpack.decode(stored, type=_TABLE))
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            raise FormatError(f"{where}: its records are unreadable ({exc})") from None
        kept = check_table(table, where)
    if kept is not table:  # the store keeps what this version accepted, placed here
        stored, placement = msgspec.msgpack.encode(kept), None
    absent = frozenset(row for row, fields in enumerate(kept.records) if fields is None) \
        if None in kept.records else frozenset()
    return SiteCatalog(checksum, stored, len(kept.records), packed, placement, absent)


def _rows(data: bytes) -> array.array[int] | None:
    """uint32s, or None if ``data`` does not hold a whole number of them."""
    if len(data) % 4:
        return None
    rows = array.array("I")
    rows.frombytes(data)
    return rows


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _good_folder(relative: str) -> bool:
    return relative == "" or all(part not in ("", ".", "..") and "\0" not in part
                                 for part in relative.split("/"))


# the stored form: what ``stored._decoded`` reads, with plain tuples for the records
_TABLE = tuple[list[str], list[str], list[dict[str, Any]], bytes,
               list[tuple[bytes, bool, int] | None]]


def _decompress(data: bytes, limit: int) -> bytes:
    """One zstd frame, refused past ``limit`` bytes (its size is in its header)."""
    import zstandard

    try:
        size = zstandard.frame_content_size(data)
        if size < 0 or size > limit:
            raise FormatError(f"a compressed part of {size} bytes is not allowed")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise FormatError(f"a compressed part is corrupt ({exc})") from None


def check_table(table: IndexTable, where: str) -> IndexTable:
    """``table`` with every record the JSON path would refuse dropped (a new table if any
    is): each distinct name and version is tested as the index parser tests it (its fast
    test, then ``check_record``), each distinct set of placing fields goes through
    ``check_record``, every hash a record is or depends on at run time must be a DAG hash,
    and every number must point into the table. Raises FormatError if the parts do not fit
    together.

    Column-wise, for 100,000 records: the records' numbers are joined and read as arrays,
    and only the few thousand distinct values are checked one by one (50 ms)."""
    rows = len(table.records)
    if len(table.spans) != 16 * rows or rows > len(table.hashes):
        raise FormatError(f"{where}: its parts do not match")
    if None in table.records:  # rows the publisher's parser dropped
        kept: Sequence[int] = [row for row, fields in enumerate(table.records)
                               if fields is not None]
        numbers = [table.records[row][0] for row in kept]
    else:
        kept, numbers = range(rows), list(map(itemgetter(0), table.records))
    if any(size < 16 or size % 4 for size in set(map(len, numbers))):
        raise FormatError(f"{where}: a record is malformed")
    heads = array.array("I", b"".join([n[:16] for n in numbers]))
    tails = array.array("I", b"".join([n[16:] for n in numbers]))
    columns = [heads[column::4] for column in range(4)]
    if columns[0] != array.array("I", kept) or \
            max(columns[1], default=0) >= len(table.strings) or \
            max(columns[2], default=0) >= len(table.strings) or \
            max(columns[3], default=0) >= len(table.kinds) or \
            max(tails, default=0) >= len(table.hashes):
        raise FormatError(f"{where}: a record points outside the table")
    # as the JSON parser reads a record: a name or version its fast test passes is good,
    # any other goes through check_record, which says why (or takes it after all)
    strings = table.strings
    bad: dict[int, dict[int, str]] = {
        1: _errors({n for n in set(columns[1]) if not _good_name(strings[n])}, strings,
                   _name_error),
        2: _errors({n for n in set(columns[2]) if not _good_name(strings[n])}, strings,
                   _version_error),
        3: _errors(set(columns[3]), table.kinds, _kind_error)}
    # every hash a record is or depends on at run time must be a DAG hash (check_record's rule)
    good_hashes = _all_dag_hashes(table.hashes)
    if not any(bad.values()) and good_hashes:
        return table
    bad_rows = set() if good_hashes else {
        row for row, dag_hash in enumerate(table.hashes) if not is_dag_hash(dag_hash)}
    records = list(table.records)
    refused = _Refused(where)
    for place, row in enumerate(kept):
        dag_hash = table.hashes[row]
        reasons = [bad[column][columns[column][place]] for column in (1, 2, 3)
                   if columns[column][place] in bad[column]]
        if row in bad_rows:
            reasons.insert(0, f"{dag_hash[:40]!r} is not a DAG hash")
        elif bad_rows and len(numbers[place]) > 16:
            deps = bad_rows.intersection(array.array("I", numbers[place][16:]))
            if deps:
                reasons.append(f"dependency hash {table.hashes[min(deps)][:40]!r} is not "
                               "a DAG hash")
        if reasons:
            refused.note(dag_hash, reasons[0])
            records[row] = None
    refused.close()
    return table._replace(records=records)


_BASE32 = b"abcdefghijklmnopqrstuvwxyz234567"


def _all_dag_hashes(hashes: list[str]) -> bool:
    """``all(map(is_dag_hash, hashes))``, at C speed: one regex match per hash is slow for
    a big index."""
    if set(map(len, hashes)) - {32}:
        return False
    joined = "".join(hashes)
    return joined.isascii() and not joined.encode().translate(None, _BASE32)


def _errors(numbers: set[int], values: list[Any], check: Any) -> dict[int, str]:
    """Why ``check`` refuses each of ``values`` at ``numbers`` that it refuses."""
    reasons = {number: check(values[number]) for number in numbers}
    return {number: reason for number, reason in reasons.items() if reason is not None}


_PROBE = "a" * 32  # a well-formed hash the checks run under; messages name the real one


def _why(entry: dict[str, Any]) -> tuple[str | None, Any]:
    try:
        row = check_record(_PROBE, entry)
    except FormatError as exc:
        return str(exc).replace(f"index record {_PROBE}: ", ""), None
    return None, row


def _name_error(value: Any) -> str | None:
    return _why({"spec": {"name": value, "version": "0"}})[0]


def _version_error(value: Any) -> str | None:
    return _why({"spec": {"name": "x", "version": value}})[0]


def _kind_error(facts: Any) -> str | None:
    """Why the placing fields ``facts`` are refused: the parser's checks, and they must be
    what it would take from a node holding them (nothing else rides along)."""
    if not isinstance(facts, dict) or facts.keys() & {"name", "version", "hash"}:
        return "its placing fields are malformed"
    reason, row = _why({"spec": {**facts, "name": "x", "version": "0"}})
    if reason is None and row[3] != facts:
        return "its placing fields are not what its node gives"
    return reason


class _Refused:
    """Records of a catalog the parser's checks refuse: the first few logged one by one."""

    def __init__(self, where: str):
        self.where, self.count = where, 0

    def note(self, dag_hash: str, reason: str) -> None:
        self.count += 1
        if self.count <= MAX_WARNINGS:
            log.warning("%s: record %s: %s; not shown", self.where, dag_hash[:40], reason)

    def close(self) -> None:
        if self.count > MAX_WARNINGS:
            log.warning("%s: %d more records not shown", self.where, self.count - MAX_WARNINGS)
