"""The install tree the mount shows: where each cached spec's prefix lives under the root.

Computed from the index alone (no I/O): the projection places every spec the index marks
``in_buildcache``; intermediate directories are derived from those paths.

Packed for 100,000s of specs: a prefix's path is not kept but projected again when asked
for (one string format), and a virtual directory keeps the hashes of the prefixes right
inside it in the order of their names, so that a name is found by binary search. What the
tree holds per spec is one reference in one list, not entries in a dict of paths, its
inverse and sets of names, which for a big index cost more than the records themselves.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from dataclasses import dataclass
from typing import Any

from lazymount.buildcache.index import SpecRecord
from lazymount.buildcache.layout import DEFAULT_PROJECTION, Projector, project, projector
from lazymount.errors import FormatError

log = logging.getLogger(__name__)

Keep = Callable[[SpecRecord], bool]  # which placed specs a tree shows


@dataclass(slots=True)
class Folder:
    """A virtual directory: the names of its subdirectories, and the hashes of the prefixes
    right inside it, in the order of their names."""

    subdirs: set[str]
    leaves: list[str]


class InstallTree:
    """Mount root + projection + catalog -> prefix paths and virtual directories.

    ``prefixes`` (hash -> relative path), ``by_path`` (its inverse) and ``dirs`` (relative
    directory -> its child names) are read-only mappings over the packed form."""

    folders: dict[str, Folder]  # relative directory -> what is in it
    refused: frozenset[str]  # placeable, but not shown (logged when placed)
    keep: Keep | None  # shows only the placed specs it accepts (a filtered tree)

    def __init__(self, root: str, catalog: dict[str, SpecRecord],
                 projection: str = DEFAULT_PROJECTION):
        self._setup(root, catalog, projection)
        self.folders = _Placer(self).place()
        self.count = sum(len(f.leaves) for f in self.folders.values())

    def _setup(self, root: str, catalog: dict[str, SpecRecord], projection: str) -> None:
        self.root, self.catalog, self.projection = root, catalog, projection
        self.folders, self.refused, self.keep = {}, frozenset(), None
        self.count = 0
        self._projectors: dict[tuple[type, int], Projector] = {}
        self.prefixes: Mapping[str, str] = _Prefixes(self)
        self.by_path: Mapping[str, str] = _ByPath(self)
        self.dirs: Mapping[str, Set[str]] = _Dirs(self)

    @classmethod
    def placed(cls, root: str, catalog: dict[str, SpecRecord], projection: str,
               folders: dict[str, Folder], refused: Iterable[str] = (),
               keep: Keep | None = None) -> InstallTree:
        """A tree whose placement was worked out before (by an earlier mount of the same
        catalog and projection, kept by the catalog store; or by filtering a tree):
        nothing is projected."""
        tree = cls.__new__(cls)
        tree._setup(root, catalog, projection)
        tree.folders, tree.refused, tree.keep = folders, frozenset(refused), keep
        tree.count = sum(len(f.leaves) for f in folders.values())
        return tree

    def filtered(self, keep: Keep) -> InstallTree:
        """The same tree showing only the prefixes ``keep`` accepts, without the
        directories left empty. Paths do not change; the catalog is shared."""
        folders = {relative: Folder(set(), [h for h in folder.leaves
                                            if keep(self.catalog[h])])
                   for relative, folder in self.folders.items()}
        for relative in sorted(folders, key=lambda r: -r.count("/") - 1 if r else 1):
            folder = folders[relative]
            folder.subdirs = {name for name in self.folders[relative].subdirs
                              if _join(relative, name) in folders}
            if relative and not folder.leaves and not folder.subdirs:
                del folders[relative]
        return InstallTree.placed(self.root, self.catalog, self.projection, folders,
                                  self.refused, keep)

    # ---- one spec -----------------------------------------------------------------------

    def shows(self, dag_hash: str) -> bool:
        """Whether the tree has a prefix for ``dag_hash``; no path is worked out."""
        record = self.catalog.get(dag_hash)
        return (record is not None and record.in_buildcache and record.external_path is None
                and dag_hash not in self.refused
                and (self.keep is None or self.keep(record)))

    def path_of(self, dag_hash: str, record: SpecRecord) -> str:
        """The relative path the projection gives a record. Raises FormatError."""
        key = (type(record), record.kind)
        project_one = self._projectors.get(key)
        if project_one is None:
            project_one = self._projectors[key] = self._projector(record)
        return project_one(record.name, record.version, dag_hash)

    def _projector(self, record: SpecRecord) -> Projector:
        try:
            return projector(self.projection, record.source.kinds[record.kind], self.node_of)
        except FormatError:  # refused again for each record, with its name
            return lambda _n, _v, h: project(self.projection, self.catalog[h].place,
                                             self.node_of)

    def leaf_name(self, dag_hash: str) -> str:
        """The last component of a shown prefix's path."""
        return self.path_of(dag_hash, self.catalog[dag_hash]).rpartition("/")[2]

    def locate(self, relative: str) -> tuple[Folder, int] | None:
        """The folder holding the prefix at ``relative`` and its position in the folder's
        leaves, or None if no prefix is there."""
        parent, _, leaf = relative.rpartition("/")
        folder = self.folders.get(parent)
        if folder is None or not folder.leaves:
            return None
        index = bisect.bisect_left(folder.leaves, leaf, key=self.leaf_name)
        if index < len(folder.leaves) and self.leaf_name(folder.leaves[index]) == leaf:
            return folder, index
        return None

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


def changed_names(old: InstallTree, new: InstallTree) -> Iterator[tuple[str, str]]:
    """(directory, name) of every name that one tree has and the other has not (the same
    projection: a hash in the same folder of both has the same name there, so only the
    hashes that came or went are projected)."""
    for relative in old.folders.keys() | new.folders.keys():
        before, after = old.folders.get(relative), new.folders.get(relative)
        for name in (before.subdirs if before else set()) ^ (after.subdirs if after else set()):
            yield relative, name
        kept = set(before.leaves if before else ()) & set(after.leaves if after else ())
        for tree, folder in ((old, before), (new, after)):
            for dag_hash in folder.leaves if folder else ():
                if dag_hash not in kept:
                    yield relative, tree.leaf_name(dag_hash)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class _Placer:
    """Places every spec of a tree's catalog once (the first mount of an index)."""

    def __init__(self, tree: InstallTree):
        self.tree = tree
        self.dirs: dict[str, set[str]] = {"": set()}  # every name in each directory
        self.leaves: dict[str, list[tuple[str, str]]] = {}  # the prefixes: (name, hash)
        self.refused: list[str] = []

    def place(self) -> dict[str, Folder]:
        catalog = self.tree.catalog
        for dag_hash, record in sorted(catalog.items(), key=lambda kv: kv[1].mirror):
            if record.in_buildcache and record.external_path is None:
                self._place(dag_hash, record)
        self.tree.refused = frozenset(self.refused)
        folders = {}
        for relative, names in self.dirs.items():
            leaves = sorted(self.leaves.get(relative, ()))
            names.difference_update(leaf for leaf, _ in leaves)
            folders[relative] = Folder(names, [dag_hash for _, dag_hash in leaves])
        return folders

    def _place(self, dag_hash: str, record: SpecRecord) -> None:
        try:
            relative = self.tree.path_of(dag_hash, record)
        except FormatError as exc:
            log.warning("%s-%s: not shown: %s", record.name, record.version, exc)
            self.refused.append(dag_hash)
            return
        parent, slash, leaf = relative.rpartition("/")
        names = self.dirs.get(parent)
        if leaf in ("", ".", "..") or (slash and names is None and any(
                part in ("", ".", "..") for part in parent.split("/"))):
            log.warning("%s: projected path %r is unusable; not shown", dag_hash, relative)
            self.refused.append(dag_hash)
        elif names is not None and leaf in names:  # a prefix or a directory is there
            log.warning("%s: path %s clashes with another spec; not shown", dag_hash, relative)
            self.refused.append(dag_hash)
        elif names is None and not self._make_dirs(parent.split("/")):
            log.warning("%s: path %s clashes with another spec; not shown", dag_hash, relative)
            self.refused.append(dag_hash)
        else:  # a directory made for an earlier prefix has no prefix above it
            self.dirs.setdefault(parent, set()).add(leaf)
            self.leaves.setdefault(parent, []).append((leaf, dag_hash))

    def _make_dirs(self, parts: list[str]) -> bool:
        """Add the directories ``parts`` names (and those above it); False if one of them
        is a prefix."""
        for depth in range(1, len(parts) + 1):
            above, name = "/".join(parts[:depth - 1]), parts[depth - 1]
            if name in self.dirs.get(above, ()) and "/".join(parts[:depth]) not in self.dirs:
                return False  # a name there that is not a directory: a prefix
        for depth, name in enumerate(parts):
            self.dirs.setdefault("/".join(parts[:depth]), set()).add(name)
        return True


# ---- the read-only views --------------------------------------------------------------------


class _Prefixes(Mapping[str, str]):
    """hash -> relative path of every shown prefix (projected when asked)."""

    def __init__(self, tree: InstallTree):
        self.tree = tree

    def __getitem__(self, dag_hash: str) -> str:
        if not self.tree.shows(dag_hash):
            raise KeyError(dag_hash)
        return self.tree.path_of(dag_hash, self.tree.catalog[dag_hash])

    def __contains__(self, dag_hash: object) -> bool:
        return isinstance(dag_hash, str) and self.tree.shows(dag_hash)

    def __iter__(self) -> Iterator[str]:
        for folder in self.tree.folders.values():
            yield from folder.leaves

    def __len__(self) -> int:
        return self.tree.count


class _ByPath(Mapping[str, str]):
    """relative path -> hash of every shown prefix."""

    def __init__(self, tree: InstallTree):
        self.tree = tree

    def __getitem__(self, relative: str) -> str:
        found = self.tree.locate(relative) if isinstance(relative, str) else None
        if found is None:
            raise KeyError(relative)
        folder, index = found
        return folder.leaves[index]

    def __iter__(self) -> Iterator[str]:
        for dag_hash in self.tree.prefixes:
            yield self.tree.prefixes[dag_hash]

    def __len__(self) -> int:
        return self.tree.count


class _Dirs(Mapping[str, Set[str]]):
    """relative directory -> the names in it (subdirectories and prefixes)."""

    def __init__(self, tree: InstallTree):
        self.tree = tree

    def __getitem__(self, relative: str) -> Set[str]:
        return _Names(self.tree, relative, self.tree.folders[relative])

    def __contains__(self, relative: object) -> bool:
        return relative in self.tree.folders

    def __iter__(self) -> Iterator[str]:
        return iter(self.tree.folders)

    def __len__(self) -> int:
        return len(self.tree.folders)


class _Names(Set[str]):
    """The names in one folder."""

    def __init__(self, tree: InstallTree, relative: str, folder: Folder):
        self.tree, self.relative, self.folder = tree, relative, folder

    @classmethod
    def _from_iterable(cls, names: Iterable[str]) -> set[str]:  # type: ignore[override]
        return set(names)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return (name in self.folder.subdirs
                or self.tree.locate(_join(self.relative, name)) is not None)

    def __iter__(self) -> Iterator[str]:
        yield from self.folder.subdirs
        yield from map(self.tree.leaf_name, self.folder.leaves)

    def __len__(self) -> int:
        return len(self.folder.subdirs) + len(self.folder.leaves)

    def __repr__(self) -> str:
        return f"{{{', '.join(map(repr, sorted(self)))}}}"
