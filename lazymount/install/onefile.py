"""One member of a package made ready on its own: written, relocated and moved into a tree.

An opened package (one with a table of contents) is filled file by file, so each file goes
through the same relocation a whole prefix goes through (``relocate.relocate_prefix`` and
``sbang.add_sbang``), run on a work folder that holds that file alone at its path: the rules
that apply to a file depend on its bytes, its path and the mapping, never on its
neighbours. The skeleton of a package (its directories and symbolic links) is relocated the
same way, with no file listed. Blocking; any worker thread.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lazymount.errors import about
from lazymount.install import relocate
from lazymount.install.buildinfo import BuildInfo
from lazymount.install.prefixfiles import Prefix
from lazymount.install.sbang import add_sbang

FILE_MODE_KEEP = 0o755  # what extraction keeps of a file's mode (no setuid, no writes by others)


def file_mode(mode: int) -> int:
    """The permission bits a file of the tarball gets in the store (as extraction gives)."""
    return (mode & FILE_MODE_KEEP) | 0o400


def dir_mode(mode: int) -> int:
    """The permission bits a directory of the tarball gets in the store."""
    return (mode & FILE_MODE_KEEP) | 0o700


def relocate_skeleton(prefix_dir: Path, info: BuildInfo, mapping: list[tuple[str, str]],
                      what: str) -> None:
    """Re-point the listed symbolic links of a prefix that holds only directories and links."""
    only_links = dataclasses.replace(info, relocate_textfiles=(), relocate_binaries=(),
                                     hardlinks_deduped=True)
    relocate.relocate_prefix(prefix_dir, only_links, mapping, what)


class Lists:
    """The relocation lists of one package's build info, as sets (looked up per file)."""

    def __init__(self, info: BuildInfo):
        self.info = info
        self.texts = set(info.relocate_textfiles)
        self.binaries = set(info.relocate_binaries)


def write_relocated(folder: Path, name: str, rel: str, data: bytes, mode: int, lists: Lists,
                    mapping: list[tuple[str, str]], sbang: str, what: str
                    ) -> tuple[Path, bool]:
    """Write ``data`` as ``folder/name`` (a new name in a work folder: the file of ``rel``
    made there, so no folders are made per file) with the store's mode for ``mode``, and
    relocate it as a whole prefix would have relocated ``rel``; returns its path and whether
    relocation changed it."""
    path = folder / name
    with os.fdopen(create(path), "wb") as handle:
        handle.write(data)
        os.fchmod(handle.fileno(), file_mode(mode))
    return path, relocate_made(folder, name, rel, data[:2], mode, lists, mapping, sbang, what)


def create(path: Path) -> int:
    """A new file (never an existing one, never through a link), open for writing."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o600)


def relocate_made(folder: Path, name: str, rel: str, head: bytes, mode: int, lists: Lists,
                  mapping: list[tuple[str, str]], sbang: str, what: str) -> bool:
    """Relocate ``folder/name``, the file of ``rel`` (starting with ``head``, its mode set),
    as a whole prefix would have relocated ``rel``; True if that changed it."""
    text, binary = rel in lists.texts, rel in lists.binaries
    script = head[:2] == b"#!" and bool(mode & 0o111)
    changed: list[str] = []
    if text or binary:  # the others no relocation step reads
        one = dataclasses.replace(lists.info, relocate_textfiles=(name,) if text else (),
                                  relocate_binaries=(name,) if binary else (),
                                  relocate_links=(), hardlinks_deduped=True)
        changed += relocate.relocate_prefix(folder, one, mapping, what).changed
    if script:
        changed += add_sbang(folder, sbang, what, [name])
    return bool(changed)


def move_into(source: Path, tree: Path, rel: str, what: str) -> None:
    """Rename ``source`` to ``tree/rel`` (an existing folder of ``tree``), never following
    a link on the way. The same file system: the file appears whole or not at all."""
    with about(what), Prefix(tree) as prefix, prefix.parent(rel) as (dir_fd, name):
        os.rename(source, name, dst_dir_fd=dir_fd)


def link_of(tree: Path, target: str, folder: Path, name: str, what: str) -> Path:
    """A new hard link ``folder/name`` of the file ``tree/target`` (for ``move_into``)."""
    path = folder / name
    with about(what), Prefix(tree) as prefix, prefix.parent(target) as (src_fd, src_name):
        os.link(src_name, path, src_dir_fd=src_fd, follow_symlinks=False)
    return path
