"""The mirror's index: which specs exist and how they depend on each other.

The index is unsigned, so it is only a hint of what to show; whatever a package's signed
manifest and spec blob say wins when it is materialized.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import FormatError
from .layout import is_dag_hash

RUNTIME_DEPTYPES = frozenset({"link", "run"})
SUPPORTED_DB_VERSIONS = ("6", "7", "8")


@dataclass(frozen=True)
class SpecRecord:
    """One node of the index: a spec and what we need to place and fetch it."""

    dag_hash: str
    name: str
    version: str
    node: dict[str, Any] = field(repr=False, compare=False)
    in_buildcache: bool = False
    ref_count: int = 0
    mirror: int = 0  # position of the mirror that lists it, in the order given
    runtime_deps: tuple[str, ...] = ()  # hashes of link/run dependencies

    @property
    def external_path(self) -> str | None:
        external = self.node.get("external")
        if isinstance(external, dict) and isinstance(external.get("path"), str):
            return str(external["path"])
        return None


def _check_name(value: Any, what: str, dag_hash: str) -> str:
    if not isinstance(value, str) or not value:
        raise FormatError(f"index record {dag_hash}: {what} is missing or not a string")
    if "/" in value or "\0" in value or value in (".", ".."):
        raise FormatError(f"index record {dag_hash}: {what} {value!r} is not a valid name")
    return value


def _runtime_deps(node: dict[str, Any]) -> tuple[str, ...]:
    deps = []
    for dep in node.get("dependencies") or ():
        if not isinstance(dep, dict):
            continue
        deptypes = (dep.get("parameters") or {}).get("deptypes") or dep.get("type") or ()
        if RUNTIME_DEPTYPES.intersection(deptypes) and isinstance(dep.get("hash"), str):
            deps.append(dep["hash"])
    return tuple(deps)


def parse_index(data: bytes, mirror: int = 0) -> dict[str, SpecRecord]:
    """Parse an index blob (database v6-v8 JSON) into records keyed by DAG hash.

    Raises FormatError for anything that is not such a document. Records whose hash or
    names are unusable are refused as a whole: an index that lies about names is broken.
    """
    try:
        doc = json.loads(data)
        database = doc["database"]
        version = str(database["version"])
        installs = database["installs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"the index is not a Spack database document ({exc})") from None
    if version not in SUPPORTED_DB_VERSIONS:
        raise FormatError(f"the index has database version {version}; supported: 6, 7, 8")
    if not isinstance(installs, dict):
        raise FormatError("the index's installs is not a mapping")
    records: dict[str, SpecRecord] = {}
    for dag_hash, entry in installs.items():
        if not is_dag_hash(dag_hash) or not isinstance(entry, dict):
            raise FormatError(f"the index has a malformed record {str(dag_hash)[:40]!r}")
        node = entry.get("spec")
        if not isinstance(node, dict):
            raise FormatError(f"index record {dag_hash} has no spec")
        records[dag_hash] = SpecRecord(
            dag_hash=dag_hash,
            name=_check_name(node.get("name"), "name", dag_hash),
            version=_check_name(str(node.get("version", "")), "version", dag_hash),
            node=node,
            in_buildcache=bool(entry.get("in_buildcache", False)),
            ref_count=int(entry.get("ref_count", 0) or 0),
            mirror=mirror,
            runtime_deps=_runtime_deps(node),
        )
    return records


def merge_indexes(indexes: list[dict[str, SpecRecord]]) -> dict[str, SpecRecord]:
    """Merge per-mirror indexes in mirror order: a hash is taken from the first mirror that
    has it in its build cache (or that lists it at all, when none has it)."""
    merged: dict[str, SpecRecord] = {}
    for records in indexes:
        for dag_hash, record in records.items():
            current = merged.get(dag_hash)
            if current is None or (record.in_buildcache and not current.in_buildcache):
                merged[dag_hash] = record
    return merged
