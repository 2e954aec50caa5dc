"""The mirror's index: which specs exist and how they depend on each other.

The index is unsigned, so it is only a hint of what to show; whatever a package's signed
manifest and spec blob say wins when it is materialized.

``scan_index`` parses a document once (with msgspec: ``indexdecode``; the json module for what
msgspec refuses) into an ``IndexTable``: the records' numbers and what they share. A catalog
holds one ``SpecRecord`` per spec, about 230 bytes each with its hash; whole nodes stay in the
document and are read back by byte offsets (``IndexSource``).
"""

from __future__ import annotations

import json
import json.decoder
import logging
import re
import struct
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, NamedTuple

import msgspec
from msgspec import UNSET

from lazymount.buildcache import indexdecode
from lazymount.buildcache.layout import COMPILER_LANGUAGES, is_dag_hash
from lazymount.errors import FormatError

RUNTIME_DEPTYPES = frozenset({"link", "run"})
# The index is unsigned, and its names become paths, module files, log lines and terminal
# output: each string a record is placed by is checked here, once, and a record that cannot
# be placed safely is dropped. A name or version may not hold a control character, a lone
# surrogate (valid JSON, not UTF-8) or '/', nor start with '.' or '-' (module systems read
# .modulerc, .version and options there), and stays short enough that with its hash it is
# one path component; the other placing strings (namespace, arch, compiler, an external's
# path) hold no control character or surrogate and are bounded too.
MAX_NAME = 100
MAX_TEXT = 4096
_BAD_NAME = re.compile("[\x00-\x1f\x7f-\x9f/\u2028\u2029\ud800-\udfff]|^[.-]")
_BAD_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
SUPPORTED_DB_VERSIONS = ("6", "7", "8")
MAX_SKIP_WARNINGS = 10  # dropped records logged one by one; the rest are counted
_WS = re.compile(r"[ \t\n\r]*")
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_scan_string = json.decoder.scanstring  # type: ignore[attr-defined]

log = logging.getLogger(__name__)


class SpecRecord(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One node of the index: a spec and what we need to place and fetch it.

    Compact, for 100,000s of them: what records of one index share lives in their
    ``source`` (their hashes, names and versions, the distinct sets of placing fields, where
    each whole node is in the document), and a record holds its numbers in those tables,
    packed in one bytes object. Each index's records are of a subclass that names its
    source and mirror (``IndexSource.record_class``), so that the catalog store decodes
    them straight from its file (msgpack, fields in this order).
    """

    # uint32s: its row in source.hashes, name and version in source.strings, its placing
    # fields besides name, version and hash in source.kinds, then the rows of its link/run
    # dependencies in source.hashes
    numbers: bytes
    in_buildcache: bool = False
    ref_count: int = 0

    source: ClassVar[IndexSource]
    mirror: ClassVar[int]  # position of the mirror that lists it, in the order given

    @property
    def row(self) -> int:
        return int(_U32.unpack_from(self.numbers)[0])

    @property
    def dag_hash(self) -> str:
        return self.source.hashes[int(_U32.unpack_from(self.numbers)[0])]

    @property
    def name(self) -> str:
        return self.source.strings[int(_U32.unpack_from(self.numbers, 4)[0])]

    @property
    def version(self) -> str:
        return self.source.strings[int(_U32.unpack_from(self.numbers, 8)[0])]

    @property
    def kind(self) -> int:
        return int(_U32.unpack_from(self.numbers, 12)[0])

    @property
    def runtime_deps(self) -> tuple[str, ...]:
        """Hashes of its link/run dependencies."""
        hashes = self.source.hashes
        return tuple(hashes[row] for (row,) in _U32.iter_unpack(self.numbers[16:]))

    @property
    def place(self) -> dict[str, Any]:
        """The node's fields that place it under a projection and in a v2 cache (see
        ``placement``): a new dict each time, whose values are shared (read them only)."""
        return {"name": self.name, "version": self.version, "hash": self.dag_hash,
                **self.source.kinds[self.kind]}

    @property
    def node(self) -> dict[str, Any]:
        """The index's whole spec node, read back from the index document. Raises
        FormatError if a stored index is damaged, StoreError if it cannot be read."""
        return self.source.node(self.row)

    @property
    def external_path(self) -> str | None:
        external = self.source.kinds[self.kind].get("external")
        if isinstance(external, dict) and isinstance(external.get("path"), str):
            return str(external["path"])
        return None

    def _identity(self) -> tuple[Any, ...]:
        return (self.dag_hash, self.name, self.version, self.in_buildcache, self.ref_count,
                self.mirror, self.runtime_deps)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SpecRecord) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())


# one scanned record: hash, name, version, placing fields (but name, version and hash),
# in_buildcache, ref_count, runtime deps, then the byte offsets of its entry in the document
Row = tuple[str, str, str, dict[str, Any], bool, int, tuple[str, ...], int, int]
_U32 = struct.Struct("<I")
_SPAN = struct.Struct("<QQ")


class IndexTable(NamedTuple):
    """One index document, parsed: what the catalog store keeps (as msgpack)."""

    hashes: list[str]  # the records' hashes in row order, then dependencies it does not list
    strings: list[str]  # the distinct names and versions
    kinds: list[dict[str, Any]]  # the distinct placing fields
    spans: bytes  # per row, the byte offsets of its entry in the document (_SPAN)
    records: list[Any]  # per row, the fields of its SpecRecord (a tuple, a record or None
    # for a record dropped)


def placement(node: dict[str, Any]) -> dict[str, Any]:
    """The fields of a (checked) node that ``layout.project`` and the v2 cache paths read:
    name, version, hash, namespace, arch, compiler (a v4 field or a migration annotation),
    the path of an external, and the edges that provide a compiler. Shares nothing mutable
    with ``node``."""
    place: dict[str, Any] = {key: node[key] for key in ("name", "version", "hash", "namespace")
                             if key in node}
    arch = node.get("arch")
    if isinstance(arch, dict):
        target = arch.get("target", "")
        place["arch"] = {"platform": arch.get("platform", ""),
                         "platform_os": arch.get("platform_os", ""),
                         "target": target.get("name", "") if isinstance(target, dict) else target}
    if isinstance(node.get("compiler"), dict):
        place["compiler"] = dict(node["compiler"])
    annotations = node.get("annotations")
    if isinstance(annotations, dict) and "compiler" in annotations:
        place["annotations"] = {"compiler": annotations["compiler"]}
    external = node.get("external")
    if isinstance(external, dict):
        place["external"] = {"path": external.get("path")}
    edges = []
    for dep in node.get("dependencies") or ():
        parameters = dep.get("parameters") if isinstance(dep, dict) else None
        virtuals = parameters.get("virtuals") if isinstance(parameters, dict) else None
        if isinstance(virtuals, list) and any(v in COMPILER_LANGUAGES for v in virtuals):
            edges.append({"name": dep.get("name"), "hash": dep.get("hash"),
                          "parameters": {"virtuals": list(virtuals)}})
    if edges:
        place["dependencies"] = edges
    return place


def _check_name(value: Any, what: str, dag_hash: str) -> str:
    if not isinstance(value, str) or not value:
        raise FormatError(f"index record {dag_hash}: {what} is missing or not a string")
    if not _good_name(value):
        raise FormatError(f"index record {dag_hash}: {what} {value[:MAX_NAME]!r} is not a "
                          f"valid name (no control character, '/' or lone surrogate, no "
                          f"leading '.' or '-', at most {MAX_NAME} characters)")
    return value


def _check_texts(facts: dict[str, Any], dag_hash: str) -> None:
    """Refuse placing fields with a string that cannot be placed safely (see MAX_TEXT),
    or an external whose path is not absolute and plain (no '.' or '..' part)."""
    bad = _bad_text(facts)
    if bad is not None:
        raise FormatError(f"index record {dag_hash}: {bad[:80]!r} cannot be placed safely "
                          f"(a control character or lone surrogate, or over {MAX_TEXT} "
                          "characters)")
    external = facts.get("external")
    path = external.get("path") if isinstance(external, dict) else None
    if isinstance(path, str) and not _plain_path(path):
        raise FormatError(f"index record {dag_hash}: external path {str(path)[:80]!r} is "
                          "not an absolute path")


def _bad_text(value: Any) -> str | None:
    """The first string in ``value`` (nested lists and mappings, keys too) that cannot be
    placed safely, or None."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if len(item) > MAX_TEXT or _BAD_TEXT.search(item):
                return item
        elif isinstance(item, dict):
            pending += item.keys()
            pending += item.values()
        elif isinstance(item, list | tuple):
            pending += item
    return None


def _plain_path(path: str) -> bool:
    return path.startswith("/") and not any(part in (".", "..") for part in path.split("/"))


def _check_version(value: Any, dag_hash: str) -> str:
    # Spack writes versions as strings; very old databases may hold a bare number
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise FormatError(f"index record {dag_hash}: version is missing or not a string")
    return _check_name(str(value), "version", dag_hash)


def _check_shape(node: dict[str, Any], dag_hash: str) -> None:
    """Refuse a node whose fields, used to place and fetch it, have the wrong types."""

    def bad(reason: str) -> FormatError:
        return FormatError(f"index record {dag_hash}: {reason}")

    arch = node.get("arch")
    if arch is not None:
        if not isinstance(arch, dict):
            raise bad("arch is not a mapping")
        if not all(isinstance(arch.get(k, ""), str) for k in ("platform", "platform_os")):
            raise bad("arch platform is not a name")
        target = arch.get("target", "")
        if isinstance(target, dict):
            target = target.get("name", "")
        if not isinstance(target, str):
            raise bad("arch target is not a name")
    for key in ("compiler", "external", "parameters"):
        if node.get(key) is not None and not isinstance(node[key], dict):
            raise bad(f"{key} is not a mapping")
    if not isinstance(node.get("namespace", ""), str):
        raise bad("namespace is not a name")
    deps = node.get("dependencies")
    if deps is not None and not isinstance(deps, list):
        raise bad("dependencies is not a list")


def _runtime_deps(node: dict[str, Any]) -> tuple[str, ...]:
    deps = []
    for dep in node.get("dependencies") or ():
        if not isinstance(dep, dict):
            continue
        parameters = dep.get("parameters")
        deptypes = (parameters.get("deptypes") if isinstance(parameters, dict) else None) or \
            dep.get("type") or ()
        if isinstance(deptypes, str):
            deptypes = (deptypes,)
        if not isinstance(deptypes, list | tuple):
            continue
        if RUNTIME_DEPTYPES.intersection(t for t in deptypes if isinstance(t, str)) and \
                isinstance(dep.get("hash"), str):
            deps.append(dep["hash"])
    return tuple(deps)


def _count(value: Any) -> int:
    """ref_count is informational: anything but a whole number (of 64 bits) counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) \
        and -1 << 63 <= value < 1 << 63 else 0


def check_record(dag_hash: str, entry: Any, start: int = 0, end: int = 0) -> Row:
    """The row of one record of ``installs``, checked; ``start`` and ``end``: the byte
    offsets of its entry in the document. Raises FormatError naming the record."""
    if not is_dag_hash(dag_hash) or not isinstance(entry, dict):
        raise FormatError(f"the index has a malformed record {str(dag_hash)[:40]!r}")
    node = entry.get("spec")
    if not isinstance(node, dict):
        raise FormatError(f"index record {dag_hash} has no spec")
    # the path under the mount shows the node's hash; the signed spec is bound to the key
    if "hash" in node and node["hash"] != dag_hash:
        raise FormatError(f"index record {dag_hash}: spec hash {str(node['hash'])[:40]} "
                          "is not the record's key")
    _check_shape(node, dag_hash)
    name = _check_name(node.get("name"), "name", dag_hash)
    version = _check_version(node.get("version"), dag_hash)
    facts = placement(node)
    for key in ("name", "version", "hash"):
        facts.pop(key, None)
    _check_texts(facts, dag_hash)
    deps = _runtime_deps(node)
    for dep in deps:
        if not is_dag_hash(dep):
            raise FormatError(f"index record {dag_hash}: dependency hash {dep[:40]!r} is not "
                              "a DAG hash")
    return (dag_hash, name, version, facts, bool(entry.get("in_buildcache", False)),
            _count(entry.get("ref_count", 0)), deps, start, end)


def parse_index(data: bytes, mirror: int = 0) -> dict[str, SpecRecord]:
    """Parse an index blob (database v6-v8 JSON) into records keyed by DAG hash, whose
    whole nodes are read back from ``data`` on use.

    Raises FormatError for anything that is not such a document; malformed records are
    dropped with a warning (see ``scan_index``). Pure but for the log; any thread.
    """
    return records_of(scan_index(data), mirror, IndexSource(data))


def records_of(table: IndexTable, mirror: int, source: IndexSource) -> dict[str, SpecRecord]:
    """The SpecRecords of a scanned index, keyed by hash; ``source`` takes its tables."""
    source.fill(table)
    record = source.record_class(mirror)
    return keyed(table.hashes, [None if fields is None else record(*fields)
                                for fields in table.records])


def keyed(hashes: list[str], records: list[SpecRecord | None]) -> dict[str, SpecRecord]:
    """Records by hash: the records of an IndexTable's rows (None for one dropped) with
    the hashes of those rows (the hashes past them are dependencies the index lacks)."""
    return {dag_hash: record
            for dag_hash, record in zip(hashes[:len(records)], records, strict=True)
            if record is not None}


class IndexSource:
    """What the records of one index share: their hashes, their distinct placing fields,
    and the index document their whole nodes are read back from (by the byte spans of
    their entries). This one holds the document in memory; the catalog store's reads it
    from disk. Thread: any."""

    def __init__(self, data: bytes | None = None, name: str = "the index"):
        self.hashes: list[str] = []
        self.strings: list[str] = []
        self.kinds: list[dict[str, Any]] = []
        self.spans = b""
        self.name = name  # for messages
        self._data = data

    def fill(self, table: IndexTable) -> None:
        self.hashes, self.strings = table.hashes, table.strings
        self.kinds, self.spans = table.kinds, table.spans

    def record_class(self, mirror: int) -> type[SpecRecord]:
        """The SpecRecord subclass of this index's records, listed by mirror ``mirror``."""
        return type("SpecRecord", (SpecRecord,), {"source": self, "mirror": mirror,
                                                  "__module__": __name__})

    def node(self, row: int) -> dict[str, Any]:
        """Raises FormatError if the document does not hold the record where it was."""
        dag_hash = self.hashes[row]
        start, end = _SPAN.unpack_from(self.spans, 16 * row)
        text = self.read(start, end)
        try:
            node = _decode_entry(text)["spec"]
        except (ValueError, KeyError, TypeError, RecursionError):
            node = None
        if not isinstance(node, dict) or node.get("hash", dag_hash) != dag_hash:
            raise FormatError(f"{self.name} is damaged (record {dag_hash})")
        return node if "hash" in node else {**node, "hash": dag_hash}

    def read(self, start: int, end: int) -> bytes:
        assert self._data is not None
        return self._data[start:end]


def _decode_entry(text: bytes) -> Any:
    """An entry as JSON values: by msgspec (3x the json module's speed; the Spack database
    reads all 100,000), or by the json module for what only it reads (NaN, 1e400)."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return json.loads(text)


def _table(rows: list[Row]) -> IndexTable:
    """The table of scanned rows: equal names, versions and placing fields stored once (a
    100,000-spec index has a few thousand names and versions, a handful of arch triples
    and compilers), dependencies as row numbers. A record whose fields cannot be stored (a
    number past 64 bits) is dropped with a warning."""
    hashes = [row[0] for row in rows]
    rows_of = {dag_hash: number for number, dag_hash in enumerate(hashes)}
    strings: dict[str, int] = {}
    kinds: list[dict[str, Any]] = []
    kind_of: dict[bytes, int] = {}
    by_identity: dict[int, int] = {}  # rows share placing fields: each is encoded once
    records: list[tuple[bytes, bool, int] | None] = []
    spans: list[int] = []
    encode, row_of, string = msgspec.msgpack.encode, rows_of.get, strings.setdefault
    for number, (dag_hash, name, version, facts, cached, refs, deps, start, end) in \
            enumerate(rows):
        spans += (start, end)  # by row, kept or not
        kind = by_identity.get(id(facts), -1)  # ``rows`` keeps each alive: ids are unique
        if kind < 0:
            try:
                kind = kind_of.setdefault(encode(facts), len(kinds))
            except (OverflowError, TypeError):
                log.warning("index record %s: a value cannot be stored; not shown", dag_hash)
                records.append(None)
                continue
            if kind == len(kinds):
                kinds.append(facts)
            by_identity[id(facts)] = kind
        dep_rows = [row_of(dep, -1) for dep in deps]
        if -1 in dep_rows:  # dependencies the index does not list: rows past its records
            dep_rows = [_row_of(dep, rows_of, hashes) for dep in deps]
        numbers = (number, string(name, len(strings)), string(version, len(strings)), kind,
                   *dep_rows)
        records.append((struct.pack(f"<{len(numbers)}I", *numbers), cached, refs))
    return IndexTable(hashes, list(strings), kinds, struct.pack(f"<{len(spans)}Q", *spans),
                      records)


def _row_of(dag_hash: str, rows_of: dict[str, int], hashes: list[str]) -> int:
    """The row of ``dag_hash``, added past the others if it has none."""
    row = rows_of.get(dag_hash)
    if row is None:
        row = rows_of[dag_hash] = len(hashes)
        hashes.append(dag_hash)
    return row


def merge_indexes(indexes: list[dict[str, SpecRecord]]) -> dict[str, SpecRecord]:
    """Merge per-mirror indexes in mirror order: a hash is taken from the first mirror that
    has it in its build cache (or that lists it at all, when none has it)."""
    if len(indexes) == 1:  # one mirror: its records as they are (100,000: 0.1 s saved)
        return indexes[0]
    merged: dict[str, SpecRecord] = {}
    for records in indexes:
        for dag_hash, record in records.items():
            current = merged.get(dag_hash)
            if current is None or (record.in_buildcache and not current.in_buildcache):
                merged[dag_hash] = record
    return merged


# ---------------------------------------------------------------------------------------------
# Parsing an index once: every record with the byte span of its entry


def scan_index(blob: bytes) -> IndexTable:
    """The checked records of an index document (Spack database v6-v8 JSON), each with the
    byte offsets of its ``installs`` entry (so that whole nodes need not be kept in memory).

    Raises FormatError for anything that is not such a document. A record whose hash, names
    or fields are unusable is dropped with a warning, and the others are kept: the index is
    only a hint, and one bad record must not hide a whole mirror. Decoded with msgspec
    (``indexdecode``; about 0.5 s per 100 MB); a document msgspec cannot read is scanned with
    the json module. Blocking; any thread.
    """
    if not blob.isascii():
        try:
            blob.decode()
        except UnicodeDecodeError:
            raise FormatError("the index is not UTF-8 JSON") from None
    decoded = indexdecode.decode(blob)
    if decoded is None:
        return _table(_scan_with_json(blob))
    version, entries = decoded
    _check_database(version, entries is not None)
    assert entries is not None
    rows: list[Row] = []
    dropped = _Dropped()
    shared: dict[Any, dict[str, Any]] = {}
    for dag_hash, raw, start, end in entries:
        try:
            rows.append(_decoded_row(dag_hash, raw, start, end, shared))
        except FormatError as exc:
            dropped.note(exc)
    dropped.close()
    return _table(rows)


class _Dropped:
    """Malformed records dropped from an index: the first few logged one by one, the rest
    counted in one line at the end."""

    def __init__(self) -> None:
        self.count = 0

    def note(self, exc: FormatError) -> None:
        self.count += 1
        if self.count <= MAX_SKIP_WARNINGS:
            log.warning("%s; not shown", exc)

    def close(self) -> None:
        if self.count > MAX_SKIP_WARNINGS:
            log.warning("%d more malformed index records not shown",
                        self.count - MAX_SKIP_WARNINGS)


def _check_database(version: Any, installs: bool) -> None:
    if not installs or version is None:
        raise FormatError("the index is not a Spack database document (it has no "
                          "database version and installs)")
    if str(version) not in SUPPORTED_DB_VERSIONS:
        raise FormatError(f"the index has database version {version!s:.20}; supported: 6, 7, 8")


def _decoded_row(dag_hash: str, raw: Any, start: int, end: int,
                 shared: dict[Any, dict[str, Any]]) -> Row:
    """The row of one raw entry: from its typed decoding, or, for an entry the typed
    schemas refuse or that needs a closer look, from ``check_record`` (whose FormatError
    names what is wrong)."""
    try:
        entry = indexdecode.entry_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        entry = None
    row = _typed_row(dag_hash, entry, start, end, shared) if entry is not None else None
    if row is not None:
        return row
    try:
        value = json.loads(bytes(raw))
    except (ValueError, RecursionError):
        raise FormatError(f"the index has a malformed record {dag_hash[:40]!r}") from None
    return check_record(dag_hash, value, start, end)


def _typed_row(dag_hash: str, entry: indexdecode.Entry, start: int, end: int,
               shared: dict[Any, dict[str, Any]]) -> Row | None:
    """The row ``check_record`` makes of the same entry, or None if it needs its
    checks (a bad hash or name, a number for a version). Placing fields made of the
    namespace and arch alone (most records) are taken from ``shared`` when it has them."""
    node = entry.spec
    name, version = node.name, node.version
    if not (is_dag_hash(dag_hash) and node.hash in (UNSET, dag_hash)
            and _good_name(name) and _good_name(version)):
        return None
    runtime, edges = _typed_edges(node.dependencies or ())
    if not all(map(is_dag_hash, runtime)):
        return None
    if edges or node.compiler is not None or node.external is not None or \
            node.annotations is not None and node.annotations.compiler is not UNSET:
        facts = _typed_facts(node, edges)
        if not _safe_facts(facts):
            return None
    else:
        known = shared.get((node.namespace, node.arch))
        if known is None:
            known = _typed_facts(node, edges)
            if not _safe_facts(known):
                return None
            shared[(node.namespace, node.arch)] = known
        facts = known
    return (dag_hash, name, version, facts, bool(entry.in_buildcache),
            _count(entry.ref_count), runtime, start, end)


def _typed_facts(node: indexdecode.Node, edges: list[dict[str, Any]]) -> dict[str, Any]:
    """The placing fields of a typed node as ``placement`` makes them, but for name,
    version and hash."""
    facts: dict[str, Any] = {}
    if node.namespace is not UNSET:
        facts["namespace"] = node.namespace
    arch = node.arch
    if arch is not None:
        target = arch.target
        facts["arch"] = {"platform": arch.platform, "platform_os": arch.platform_os,
                         "target": target if isinstance(target, str) else target.name}
    if node.compiler is not None:
        facts["compiler"] = node.compiler
    if node.annotations is not None and node.annotations.compiler is not UNSET:
        facts["annotations"] = {"compiler": node.annotations.compiler}
    if node.external is not None:
        facts["external"] = {"path": node.external.path}
    if edges:
        facts["dependencies"] = edges
    return facts


def _good_name(value: Any) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_NAME and not _BAD_NAME.search(value)


def _safe_facts(facts: dict[str, Any]) -> bool:
    external = facts.get("external")
    path = external.get("path") if external is not None else None
    return _bad_text(facts) is None and (not isinstance(path, str) or _plain_path(path))


def _typed_edges(edges: Iterable[Any]) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    """(runtime dependency hashes, edges that provide a compiler) of typed edges, as
    ``_runtime_deps`` and ``placement`` find them in a node."""
    runtime: list[str] = []
    compilers: list[dict[str, Any]] = []
    for edge in edges:
        parameters = edge.parameters
        deptypes = (parameters.deptypes if parameters is not None else None) or edge.type or ()
        if isinstance(deptypes, str):
            deptypes = (deptypes,)
        # only strings equal "link" or "run": the same test as _runtime_deps's
        if isinstance(deptypes, list | tuple) and isinstance(edge.hash, str) and \
                ("link" in deptypes or "run" in deptypes):
            runtime.append(edge.hash)
        virtuals = parameters.virtuals if parameters is not None else None
        if virtuals and isinstance(virtuals, list) and \
                any(v in COMPILER_LANGUAGES for v in virtuals):
            compilers.append({"name": edge.name, "hash": edge.hash,
                              "parameters": {"virtuals": list(virtuals)}})
    return tuple(runtime), compilers


# ---------------------------------------------------------------------------------------------
# The json-module scanner: for documents msgspec cannot read (it accepts what ``json`` does)


def _scan_with_json(blob: bytes) -> list[Row]:
    try:
        text = blob.decode()
    except UnicodeDecodeError:
        raise FormatError("the index is not UTF-8 JSON") from None
    cursor = _Cursor(text)
    rows: list[Row] = []
    version: Any = None
    installs = False
    try:
        for key in cursor.members():
            if key != "database":
                cursor.value()
                continue
            for field in cursor.members():
                if field == "version":
                    version = cursor.value()
                elif field == "installs":
                    installs = True
                    _scan_installs(cursor, rows)
                else:
                    cursor.value()
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise FormatError(f"the index is not a Spack database document ({reason})") from None
    _check_database(version, installs)
    if not blob.isascii():
        rows = _byte_offsets(text, rows)
    return rows


def _scan_installs(cursor: _Cursor, rows: list[Row]) -> None:
    if cursor.text[cursor.skip():cursor.pos + 1] != "{":
        raise FormatError("the index's installs is not a mapping")
    dropped = _Dropped()
    for dag_hash in cursor.members():
        start = cursor.skip()
        entry = cursor.value()
        try:
            rows.append(check_record(dag_hash, entry, start, cursor.pos))
        except FormatError as exc:
            dropped.note(exc)
    dropped.close()


def _byte_offsets(text: str, rows: list[Row]) -> list[Row]:
    """Rows with character offsets turned into UTF-8 byte offsets (rows are in text order)."""
    out: list[Row] = []
    chars = octets = 0
    for row in rows:
        octets += len(text[chars:row[7]].encode())
        start = octets
        octets += len(text[row[7]:row[8]].encode())
        chars = row[8]
        out.append((*row[:7], start, octets))
    return out


class _Cursor:
    """A position in a JSON text; values are decoded by the json module's C scanner."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def skip(self) -> int:
        """Skip whitespace; returns the position."""
        self.pos = _WS.match(self.text, self.pos).end()  # type: ignore[union-attr]
        return self.pos

    def _take(self) -> str:
        char = self.text[self.skip():self.pos + 1]
        self.pos += 1
        return char

    def value(self) -> Any:
        try:
            value, self.pos = _scan(self.text, self.skip())
        except StopIteration:
            raise ValueError(f"no JSON value at character {self.pos}") from None
        return value

    def members(self) -> Iterator[str]:
        """The keys of the object at the cursor; the caller consumes each key's value."""
        if self._take() != "{":
            raise ValueError(f"no JSON object at character {self.pos - 1}")
        if self.text[self.skip():self.pos + 1] == "}":
            self.pos += 1
            return
        while True:
            if self._take() != '"':
                raise ValueError(f"no key at character {self.pos - 1}")
            key, self.pos = _scan_string(self.text, self.pos)
            if self._take() != ":":
                raise ValueError(f"no ':' at character {self.pos - 1}")
            yield key
            separator = self._take()
            if separator == "}":
                return
            if separator != ",":
                raise ValueError(f"no ',' or '}}' at character {self.pos - 1}")
