"""Partial packages: packages opened through a table of contents, filled file by file.

An opened package is published like any other (``pkgs/<key>/`` with ``tree/`` and
``receipt.json``), with ``"partial": true`` in its receipt and two more files beside the tree:

    toc.json       the verified plaintext of its TOC (the receipt names its sha256)
    filled.jsonl   one line per file added to the tree: ``[path, size, sha256]``

``tree/`` holds its folders and links from the start and each file once it was fetched,
checked and relocated (renamed in whole: a file is there or not). Its line in
``filled.jsonl`` is written before the rename, so every file of the tree has one; a line
whose file is absent is a crash between the two and means nothing. When every file is
there, the package is *completed*: sealed with a record (``store/record.py``) like a package
materialized whole, its receipt rewritten without ``partial``, the two files removed.
Blocking; worker threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymount.store.content import RECEIPT, RECORD, TREE, Store
from lazymount.store.record import Difference, Sealed, _walk
from lazymount.system.ownership import describe, unsafe_reason

TOC = "toc.json"
FILLED = "filled.jsonl"
MAX_TOC_BYTES = 64 << 20
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def is_partial(receipt: dict[str, Any] | None) -> bool:
    return bool(receipt and receipt.get("partial") is True)


def write_toc(staging: Path, plaintext: bytes) -> str:
    """Put the TOC beside a partial package's tree in staging; returns its sha256."""
    (staging / TOC).write_bytes(plaintext)
    return hashlib.sha256(plaintext).hexdigest()


def read_toc(store: Store, key: str, sha256: object) -> bytes | None:
    """The stored TOC of a partial package, if it is the one its receipt names."""
    data = _read(store, key, TOC, MAX_TOC_BYTES)
    if data is None or hashlib.sha256(data).hexdigest() != sha256:
        return None
    return data


def _read(store: Store, key: str, name: str, limit: int) -> bytes | None:
    try:
        entry = os.open(key, _DIR, dir_fd=store.pkgs_fd)
        try:
            fd = os.open(name, _OPEN, dir_fd=entry)
        finally:
            os.close(entry)
        with os.fdopen(fd, "rb") as handle:
            if unsafe_reason(os.fstat(handle.fileno()), store.owner) is not None:
                return None
            data = handle.read(limit + 1)
    except OSError:
        return None
    return data if len(data) <= limit else None


def note_filled(store: Store, key: str, rel: str, size: int, sha256: str) -> None:
    """Record a file about to be renamed into a partial package's tree."""
    line = (json.dumps([rel, size, sha256], separators=(",", ":")) + "\n").encode()
    entry = os.open(key, _DIR, dir_fd=store.pkgs_fd)
    try:
        fd = os.open(FILLED, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644, dir_fd=entry)
    finally:
        os.close(entry)
    try:
        os.write(fd, line)  # one write of a short line: appended whole
    finally:
        os.close(fd)


def filled(store: Store, key: str) -> dict[str, tuple[int, str]]:
    """Each file recorded in a partial package: its size and sha256."""
    data = _read(store, key, FILLED, 1 << 30) or b""
    found: dict[str, tuple[int, str]] = {}
    for line in data.splitlines():
        try:
            rel, size, sha256 = json.loads(line)
        except (ValueError, TypeError):
            continue  # a line cut by a crash
        if isinstance(rel, str) and isinstance(size, int) and isinstance(sha256, str):
            found[rel] = (size, sha256)
    return found


@dataclass(frozen=True)
class Present:
    """What a partial package's tree holds now."""

    files: int
    file_bytes: int  # apparent sizes
    disk_bytes: int  # st_blocks of every inode once, the tree's folders included


def check(store: Store, key: str, content: bool, limit: int = 20
          ) -> tuple[list[Difference], Present]:
    """How a partial package's tree differs from what was filled into it (every file must
    have its line, with its size, and with ``content`` its sha256; nothing others could
    change), and what it holds."""
    records = filled(store, key)
    tree = store.pkgs / key / TREE
    found: list[Difference] = []
    files = file_bytes = 0
    disk = 0
    inodes: set[tuple[int, int]] = set()
    try:
        for path, name, dir_fd, st in _walk(tree):
            if (st.st_dev, st.st_ino) not in inodes:
                inodes.add((st.st_dev, st.st_ino))
                disk += st.st_blocks * 512
            unsafe = unsafe_reason(st, store.owner)
            if unsafe is not None:
                found.append(Difference(path, f"{describe(path, st)}; {unsafe}"))
            elif stat.S_ISREG(st.st_mode):
                files += 1
                file_bytes += st.st_size
                known = records.get(path)
                if known is None:
                    found.append(Difference(path, "added"))
                elif known[0] != st.st_size:
                    found.append(Difference(path, "size"))
                elif content and _sha256(name, dir_fd) != known[1]:
                    found.append(Difference(path, "content"))
            elif not (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                found.append(Difference(path, "kind"))
            if len(found) >= limit:
                break
    except OSError as exc:
        found.append(Difference("", f"unreadable ({exc.strerror})"))
    return found, Present(files, file_bytes, disk)


def _sha256(name: str, dir_fd: int) -> str:
    fd = os.open(name, _OPEN | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def complete(store: Store, key: str, receipt: dict[str, Any], sealed: Sealed) -> None:
    """Make a filled partial package a package like any other: its record written, its
    receipt replaced (one rename) by one without ``partial`` that names the record, the
    TOC and the fill log removed."""
    entry = os.open(key, _DIR, dir_fd=store.pkgs_fd)
    try:
        _replace(entry, RECORD, sealed.data)
        done = {k: v for k, v in receipt.items() if k not in ("partial", "toc")}
        done.update(record=sealed.sha256, disk_bytes=sealed.disk_bytes + 3 * 4096)
        _replace(entry, RECEIPT, (json.dumps(done, indent=1) + "\n").encode())
        os.fsync(entry)
        for name in (TOC, FILLED):
            try:
                os.unlink(name, dir_fd=entry)
            except FileNotFoundError:
                pass
    finally:
        os.close(entry)


def _replace(dir_fd: int, name: str, data: bytes) -> None:
    temporary = f".{name}.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
