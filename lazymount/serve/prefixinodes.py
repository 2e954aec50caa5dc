"""Inode numbers of the prefix directories of one install tree, worked out, not stored.

A listing of 100,000 prefixes hands the kernel 100,000 inodes; a node object and two
table entries for each would stay for the life of the mount. Here a prefix's inode is
``base`` plus its position in the tree's folders (folder after folder, leaves in name
order), so a number maps back to its prefix by arithmetic and binary search. A bit per
prefix remembers which numbers the kernel was given: when the tree is replaced (a refreshed
index), only those become ordinary table entries, so they stay valid.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from lazymount.catalog.installtree import Folder, InstallTree


@dataclass(frozen=True, slots=True)
class PrefixDir:
    relative: str
    dag_hash: str


class PrefixInodes:
    """The inode numbers ``base`` .. ``base + size - 1``: the prefixes of ``tree``."""

    def __init__(self, tree: InstallTree, base: int):
        self.tree, self.base = tree, base
        self.relatives: list[str] = []  # folders that hold prefixes
        self.folders: list[Folder] = []
        self.starts: list[int] = []  # position of each one's first prefix
        self.start_of: dict[str, int] = {}
        size = 0
        for relative, folder in tree.folders.items():
            if folder.leaves:
                self.relatives.append(relative)
                self.folders.append(folder)
                self.starts.append(size)
                self.start_of[relative] = size
                size += len(folder.leaves)
        self.size = size
        self.given = bytearray((size + 7) // 8)  # which numbers the kernel was given

    def holds(self, ino: int) -> bool:
        return self.base <= ino < self.base + self.size

    def inode(self, folder_relative: str, index: int) -> int:
        """The inode of the ``index``-th prefix of a folder, marked as given out."""
        return self._give(self.start_of[folder_relative] + index)

    def inode_of(self, node: PrefixDir) -> int | None:
        """The inode of a prefix of the tree (marked as given out), or None."""
        position = self._position(node)
        return self._give(position) if position is not None else None

    def given_inode_of(self, node: PrefixDir) -> int | None:
        """The inode of a prefix if the kernel was given it, else None."""
        position = self._position(node)
        return self.base + position if position is not None and self._was_given(position) \
            else None

    def _position(self, node: PrefixDir) -> int | None:
        """Where a prefix of the tree is in this range, or None if the tree has no such
        prefix."""
        found = self.tree.locate(node.relative)
        if found is None or found[0].leaves[found[1]] != node.dag_hash:
            return None
        return self.start_of[node.relative.rpartition("/")[0]] + found[1]

    def node(self, ino: int) -> PrefixDir | None:
        """The prefix an inode of this range stands for."""
        if not self.holds(ino):
            return None
        position = ino - self.base
        at = bisect.bisect_right(self.starts, position) - 1
        dag_hash = self.folders[at].leaves[position - self.starts[at]]
        relative = self.relatives[at]
        leaf = self.tree.leaf_name(dag_hash)
        return PrefixDir(f"{relative}/{leaf}" if relative else leaf, dag_hash)

    def given_out(self) -> Iterator[tuple[int, PrefixDir]]:
        """Every inode the kernel was given, with its prefix."""
        for byte_at, byte in enumerate(self.given):
            if byte:
                for bit in range(8):
                    if byte & (1 << bit):
                        ino = self.base + byte_at * 8 + bit
                        node = self.node(ino)
                        assert node is not None
                        yield ino, node

    def _give(self, position: int) -> int:
        self.given[position >> 3] |= 1 << (position & 7)
        return self.base + position

    def _was_given(self, position: int) -> bool:
        return bool(self.given[position >> 3] & (1 << (position & 7)))


class FolderListing:
    """A virtual directory's entries for readdir: its other names first, then its prefixes,
    each named and numbered when the kernel reads that far (a listing of 100,000 prefixes
    is not built as 100,000 tuples)."""

    def __init__(self, others: list[tuple[bytes, int]], inodes: PrefixInodes,
                 relative: str):
        self.others, self.inodes, self.relative = others, inodes, relative
        self.folder = inodes.tree.folders.get(relative)
        self.leaves = self.folder.leaves if self.folder is not None else []

    def __len__(self) -> int:
        return len(self.others) + len(self.leaves)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        if index < len(self.others):
            return self.others[index]
        index -= len(self.others)
        name = self.inodes.tree.leaf_name(self.leaves[index])
        return name.encode("utf-8", "surrogateescape"), self.inodes.inode(self.relative, index)
