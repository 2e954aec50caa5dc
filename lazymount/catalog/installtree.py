"""The install tree the mount shows: where each cached spec's prefix lives under the root.

Computed from the index alone (no I/O): the projection places every spec the index marks
``in_buildcache``; intermediate directories are derived from those paths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from lazymount.buildcache.index import SpecRecord
from lazymount.buildcache.layout import DEFAULT_PROJECTION, Projector, project, projector
from lazymount.errors import FormatError

log = logging.getLogger(__name__)


@dataclass
class InstallTree:
    """Mount root + projection + catalog -> prefix paths and virtual directories."""

    root: str
    catalog: dict[str, SpecRecord]
    projection: str = DEFAULT_PROJECTION
    prefixes: dict[str, str] = field(default_factory=dict)  # hash -> relative path
    by_path: dict[str, str] = field(default_factory=dict)  # relative path -> hash
    dirs: dict[str, set[str]] = field(default_factory=dict)  # relative dir -> child names

    def __post_init__(self) -> None:
        self.dirs[""] = set()
        projectors: dict[tuple[type, int], Projector] = {}
        for dag_hash, record in sorted(self.catalog.items(), key=lambda kv: kv[1].mirror):
            if record.in_buildcache and record.external_path is None:
                key = (type(record), record.kind)  # records of one index sharing their fields
                if key not in projectors:
                    projectors[key] = self._projector(record)
                self._place(dag_hash, record, projectors[key])

    def _projector(self, record: SpecRecord) -> Projector:
        try:
            return projector(self.projection, record.source.kinds[record.kind], self.node_of)
        except FormatError:  # refused again for each record, with its name
            return lambda *_: project(self.projection, record.place, self.node_of)

    @classmethod
    def placed(cls, root: str, catalog: dict[str, SpecRecord], projection: str,
               prefixes: dict[str, str], by_path: dict[str, str], dirs: dict[str, set[str]]
               ) -> InstallTree:
        """A tree whose placement was computed by an earlier mount of the same catalog and
        projection (kept by the catalog store): nothing is projected again."""
        tree = cls.__new__(cls)
        tree.root, tree.catalog, tree.projection = root, catalog, projection
        tree.prefixes, tree.by_path, tree.dirs = prefixes, by_path, dirs
        return tree

    def _place(self, dag_hash: str, record: SpecRecord, project_one: Projector) -> None:
        try:
            relative = project_one(record.name, record.version, dag_hash)
        except FormatError as exc:
            log.warning("%s-%s: not shown: %s", record.name, record.version, exc)
            return
        parent, slash, leaf = relative.rpartition("/")
        if leaf in ("", ".", "..") or (slash and parent not in self.dirs and any(
                part in ("", ".", "..") for part in parent.split("/"))):
            log.warning("%s: projected path %r is unusable; not shown", dag_hash, relative)
            return
        if relative in self.by_path or relative in self.dirs:
            log.warning("%s: path %s clashes with another spec; not shown", dag_hash, relative)
            return
        if parent in self.dirs:  # made for an earlier prefix: no prefix is above it
            self.dirs[parent].add(leaf)
        elif not self._make_dirs(parent.split("/")):
            log.warning("%s: path %s clashes with another spec; not shown", dag_hash, relative)
            return
        else:
            self.dirs[parent] = {leaf}
        self.prefixes[dag_hash] = relative
        self.by_path[relative] = dag_hash

    def _make_dirs(self, parts: list[str]) -> bool:
        """Add the directories ``parts`` names (and those above it); False if one of them
        is a prefix."""
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(a in self.by_path for a in ancestors):
            return False
        for depth, name in enumerate(parts):
            self.dirs.setdefault("/".join(parts[:depth]), set()).add(name)
        return True

    def node_of(self, dag_hash: str) -> dict[str, Any] | None:
        """The placing fields of a hash's index node (``SpecRecord.place``), if the catalog
        has it: enough for a projection, without reading whole nodes."""
        record = self.catalog.get(dag_hash)
        return record.place if record is not None else None

    def prefix_of(self, dag_hash: str) -> str | None:
        """Absolute prefix under the mount for any non-external spec of the index, cached or not
        (a dependency missing from the cache still gets the path Spack would give it)."""
        relative = self.prefixes.get(dag_hash)
        if relative is None:
            record = self.catalog.get(dag_hash)
            if record is None or record.external_path is not None:
                return None
            try:
                relative = project(self.projection, record.place, self.node_of)
            except FormatError:
                return None
        return f"{self.root.rstrip('/')}/{relative}"

    def label(self, dag_hash: str) -> str:
        """Short human name of a spec for log lines: name-version-hash7."""
        record = self.catalog.get(dag_hash)
        if record is None:
            return dag_hash[:7]
        return f"{record.name}-{record.version}-{dag_hash[:7]}"
