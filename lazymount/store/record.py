"""The published record of a package: what its tree held when it was verified and published.

Written once, next to the tree (``pkgs/<key>/record.json``), after relocation and before the
rename that publishes it. For every entry under ``tree/`` it keeps the relative path, the kind
(``f`` file, ``d`` directory, ``l`` symlink), the permission bits, and for a file its size,
sha256 and ctime, for a link its target; with them, the spec hash and the digests of the
signed document and tarball it came from. The receipt names the record's own sha256, so a
record cannot be swapped without the receipt noticing.

Two checks use it:
  * ``check(..., content=False)``: the shape of the tree (every path, kind, mode, size,
    link target and file ctime) with one ``lstat`` per entry. A file written after publishing
    has a new ctime even when its size is unchanged, and ctime cannot be set back by a
    user. The daemon runs this the first time it serves a package after starting.
  * ``check(..., content=True)``: the same, and every file re-hashed (``lazymount fsck``).

Every file is opened relative to its directory's descriptor with ``O_NOFOLLOW``: a link
planted in the tree is reported, never followed.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymount.store.content import RECORD, TREE, Store
from lazymount.system.ownership import describe, unsafe_reason

VERSION = 1
MAX_RECORD_BYTES = 256 << 20  # 2 million entries of ~120 bytes
_CHUNK = 1 << 20
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Entry:
    """One path of a published tree, as recorded."""

    kind: str  # "f", "d" or "l"
    mode: int  # permission bits
    size: int = 0
    digest: str = ""  # sha256 of a file, target of a link
    ctime_ns: int = 0  # files only

    def as_row(self, path: str) -> list[Any]:
        return [path, self.kind, self.mode, self.size, self.digest, self.ctime_ns]


@dataclass(frozen=True)
class Sealed:
    """What ``seal`` found: the record's bytes and the tree's real disk usage."""

    data: bytes
    sha256: str
    disk_bytes: int  # st_blocks of every inode once (hard links counted once)
    files: int


@dataclass(frozen=True)
class Difference:
    path: str  # relative to the tree; "" for the record itself
    what: str  # "missing", "added", "content", "size", "mode", "kind", "target", "changed"

    def __str__(self) -> str:
        return f"{self.path or '(record)'}: {self.what}"


class RecordError(ValueError):
    """A record that is missing, unreadable or not the one the receipt names."""


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    return "?"


def _hash_file(name: str, dir_fd: int) -> str:
    fd = os.open(name, _OPEN, dir_fd=dir_fd)
    try:
        digest = hashlib.sha256()
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def _walk(tree: Path) -> Iterator[tuple[str, str, int, os.stat_result]]:
    """(relative path, name, dir fd, lstat) of every entry below ``tree``, sorted per
    directory. Never follows a link, not even to ask whether it points at a directory: a
    relocated link points into the mount, and a look through it from the daemon would
    wait on the daemon itself. Blocking."""
    top = os.open(tree, _OPEN_DIR)
    try:
        yield from _walk_fd(top, "")
    finally:
        os.close(top)


def _walk_fd(dir_fd: int, relative: str) -> Iterator[tuple[str, str, int, os.stat_result]]:
    with os.scandir(dir_fd) as listing:
        names = sorted(entry.name for entry in listing)
    for name in names:
        path = f"{relative}{name}"
        st = os.lstat(name, dir_fd=dir_fd)
        yield path, name, dir_fd, st
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
            try:
                yield from _walk_fd(sub, f"{path}/")
            finally:
                os.close(sub)


def _entry(name: str, dir_fd: int, st: os.stat_result, content: bool,
           known: tuple[int, str] | None = None) -> Entry:
    """The entry of one path; a file's sha256 is ``known[1]`` when it still has the size
    ``known[0]`` and no other name (a rewrite through another hard link would not show)."""
    kind = _kind(st.st_mode)
    mode = stat.S_IMODE(st.st_mode)
    if kind == "f":
        if known is not None and known[0] == st.st_size and st.st_nlink == 1:
            digest = known[1]
        else:
            digest = _hash_file(name, dir_fd) if content else ""
        return Entry(kind, mode, st.st_size, digest, st.st_ctime_ns)
    if kind == "l":
        return Entry(kind, mode, 0, os.readlink(name, dir_fd=dir_fd))
    return Entry(kind, mode)


def seal(tree: Path, provenance: dict[str, Any],
         known: dict[str, tuple[int, str]] | None = None) -> Sealed:
    """Hash and describe every entry of ``tree``: the record to publish with it. Blocking
    (a worker thread). ``provenance``: the spec hash and the digests of the signed document
    and tarball it came from. ``known``: size and sha256 of files hashed as they were
    extracted and not changed since (by relative path); every other file is read."""
    known = known or {}
    rows: list[list[Any]] = []
    inodes: set[tuple[int, int]] = set()
    root = os.lstat(tree)
    disk = root.st_blocks * 512
    for path, name, dir_fd, st in _walk(tree):
        rows.append(_entry(name, dir_fd, st, True, known.get(path)).as_row(path))
        if (st.st_dev, st.st_ino) not in inodes:
            inodes.add((st.st_dev, st.st_ino))
            disk += st.st_blocks * 512
    document = {"version": VERSION, **provenance, "root_mode": stat.S_IMODE(root.st_mode),
                "entries": rows}
    data = (json.dumps(document, separators=(",", ":")) + "\n").encode()
    files = sum(1 for row in rows if row[1] == "f")
    return Sealed(data, hashlib.sha256(data).hexdigest(), disk, files)


@dataclass(frozen=True)
class Record:
    provenance: dict[str, Any]
    root_mode: int
    entries: dict[str, Entry]


def load(path: Path, sha256: str | None) -> Record:
    """The record at ``path``; its sha256 must be ``sha256`` (the receipt's). Raises
    RecordError. Blocking."""
    try:
        fd = os.open(path, _OPEN)
        try:
            data = os.read(fd, MAX_RECORD_BYTES + 1)
            while len(data) <= MAX_RECORD_BYTES and (more := os.read(fd, _CHUNK)):
                data += more
        finally:
            os.close(fd)
    except OSError as exc:
        raise RecordError(f"no readable record ({exc.strerror})") from None
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError("the record is too large")
    if sha256 is None:
        raise RecordError("published without a record")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RecordError("the record is not the one its receipt names")
    return parse(data)


def parse(data: bytes) -> Record:
    """Parse record bytes; RecordError if they are not a record of this version."""
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("version") != VERSION:
            raise RecordError("the record has an unknown version")
        entries = {}
        for path, kind, mode, size, digest, ctime_ns in document["entries"]:
            if not (isinstance(path, str) and kind in ("f", "d", "l") and isinstance(mode, int)
                    and isinstance(size, int) and isinstance(digest, str)
                    and isinstance(ctime_ns, int)):
                raise RecordError("the record has a malformed entry")
            entries[path] = Entry(kind, mode, size, digest, ctime_ns)
        provenance = {k: v for k, v in document.items() if k not in ("entries", "root_mode")}
        return Record(provenance, int(document["root_mode"]), entries)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        if isinstance(exc, RecordError):
            raise
        raise RecordError("the record is malformed") from None


def check(tree: Path, record: Record, content: bool, limit: int = 20,
          owner: int | None = None) -> list[Difference]:
    """How ``tree`` differs from ``record`` (at most ``limit`` differences; empty if it
    matches). ``content``: re-hash every file too. ``owner``: also refuse, in the same walk,
    an entry that a user other than root and ``owner`` could change. Blocking."""
    found: list[Difference] = []
    seen: set[str] = set()
    try:
        root = os.lstat(tree)
    except OSError:
        return [Difference("", "missing tree")]
    if not stat.S_ISDIR(root.st_mode) or stat.S_IMODE(root.st_mode) != record.root_mode:
        found.append(Difference(".", "mode"))
    elif owner is not None and (unsafe := unsafe_reason(root, owner)) is not None:
        found.append(Difference(".", describe(".", root) + "; " + unsafe))
    try:
        for path, name, dir_fd, st in _walk(tree):
            seen.add(path)
            expected = record.entries.get(path)
            unsafe = unsafe_reason(st, owner) if owner is not None else None
            if unsafe is not None:
                found.append(Difference(path, f"{describe(path, st)}; {unsafe}"))
            elif expected is None:
                found.append(Difference(path, "added"))
            else:
                what = _compare(expected, name, dir_fd, st, content)
                if what:
                    found.append(Difference(path, what))
            if len(found) >= limit:
                return found
    except OSError as exc:
        found.append(Difference("", f"unreadable ({exc.strerror})"))
        return found
    for path in record.entries:
        if path not in seen:
            found.append(Difference(path, "missing"))
            if len(found) >= limit:
                break
    return found


def _compare(expected: Entry, name: str, dir_fd: int, st: os.stat_result,
             content: bool) -> str:
    """What differs between one recorded entry and the one on disk, or ""."""
    kind = _kind(st.st_mode)
    if kind != expected.kind:
        return "kind"
    if stat.S_IMODE(st.st_mode) != expected.mode:
        return "mode"
    if kind == "l":
        return "" if os.readlink(name, dir_fd=dir_fd) == expected.digest else "target"
    if kind != "f":
        return ""
    if st.st_size != expected.size:
        return "size"
    if content and _hash_file(name, dir_fd) != expected.digest:
        return "content"
    if st.st_ctime_ns != expected.ctime_ns:
        return "changed"  # written (or its inode touched) after it was published
    return ""


def summary(differences: list[Difference], shown: int = 3) -> str:
    """``bin/hello: content, lib/x.so: missing and 4 more``."""
    text = ", ".join(str(d) for d in differences[:shown])
    if len(differences) > shown:
        text += f" and {len(differences) - shown} more"
    return text


def checked_tree(store: Store, key: str, content: bool = False) -> tuple[Path | None, str]:
    """The published tree of ``key`` if it matches its record, else None and why ("" if
    nothing is published under ``key``). Blocking: one lstat per entry (and a read of every
    byte with ``content``)."""
    receipt = store.receipt(key)
    if receipt is None:
        return None, ""
    try:
        entry = os.stat(key, dir_fd=store.pkgs_fd, follow_symlinks=False)
    except OSError as exc:
        return None, f"pkgs/{key}: {exc.strerror}"
    if not stat.S_ISDIR(entry.st_mode) or unsafe_reason(entry, store.owner) is not None:
        return None, describe(f"pkgs/{key}", entry)
    tree = store.pkgs / key / TREE
    try:
        record = load(store.pkgs / key / RECORD, receipt.get("record"))
    except RecordError as exc:
        return None, str(exc)
    # one walk for the record and for the owners and modes the store requires
    differences = check(tree, record, content, owner=store.owner)
    if differences:
        return None, summary(differences)
    store.walked(key)
    return tree, ""
