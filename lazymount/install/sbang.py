"""Spack's sbang post-install hook: overlong shebang lines run through the sbang script.

Run after relocation, on the relocated prefix (rules in SPACK-FORMAT.md §5). Blocking; any
worker thread.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from lazymount.errors import RelocationError, StoreError, about
from lazymount.install.prefixfiles import Prefix, reader, rewrite

SHEBANG_LIMIT = 127  # Spack's system_shebang_limit on Linux
SHEBANG_READ_LIMIT = 4096  # Spack's spack_shebang_limit: longer first lines are left alone

_SBANG = b"#!/bin/sh "  # Spack's sbang_shebang_line, without the path
_INTERPRETER = re.compile(rb"#![ \t]*?([^ \t\0\n]+)")
_EXEC_BITS = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH


def add_sbang(prefix_dir: Path, sbang_path: str, what: str,
              scripts: list[str] | None = None) -> list[str]:
    """Spack's sbang hook: make overlong shebangs run through ``sbang_path``.

    Input: the (relocated) prefix; the sbang script's path under the mount; ``what`` for errors.
    Every regular executable file outside the top-level ``.spack/`` whose first line starts with
    ``#!`` and, counted like Spack (with its newline), is longer than 127 bytes gets
    ``#!/bin/sh <sbang_path>`` prepended; the old line becomes line 2 (``--!`` for lua/luajit,
    ``//!`` for node, ``<?php #!… ?>`` for php, exactly as Spack writes them). First lines
    without a newline in 4096 bytes are left alone.
    ``scripts``: the relative paths of the executable files that start with ``#!``, when the
    caller knows them (extraction sees every file's first bytes); otherwise the prefix is
    walked to find them.
    Output: the relative paths changed, sorted per directory. Errors: ``RelocationError`` when a
    file needs sbang but ``sbang_path`` itself is longer than 127 bytes; ``StoreError`` on I/O
    failure. Thread: blocking, any worker thread.
    """
    with about(what):
        return _add_sbang(prefix_dir, sbang_path, scripts)


def _add_sbang(prefix_dir: Path, sbang_path: str, scripts: list[str] | None) -> list[str]:
    line = _SBANG + os.fsencode(sbang_path) + b"\n"
    changed: list[str] = []
    try:
        with Prefix(prefix_dir) as prefix:
            found = (_executables(os.fspath(prefix_dir)) if scripts is None else
                     prefix.files([r for r in scripts if not r.startswith(".spack/")]))
            for rel, dir_fd, name, st in found:
                if st.st_mode & _EXEC_BITS and _filter_shebang(dir_fd, name, st, line, rel):
                    changed.append(rel)
    except OSError as exc:
        raise StoreError(f"cannot add sbang lines in {prefix_dir}: {exc}") from None
    return changed


def _executables(top: str) -> Iterator[tuple[str, int, str, os.stat_result]]:
    """(relative path, dir fd, name, lstat) of every regular executable file under ``top``,
    outside the top-level ``.spack/``, in sorted order.

    Never follows a symlink, not even to ask whether it points at a directory: relocated
    links point into the mount this process serves, and stat-ing through one would wait
    on the very package being materialized (``os.walk``/``os.fwalk`` do follow there).
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    stack = [("", os.open(top, flags))]
    try:
        while stack:
            rel_dir, dir_fd = stack[-1]
            with os.scandir(dir_fd) as entries:
                listing = sorted(entries, key=lambda e: e.name)
            subdirs = []
            for entry in listing:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if rel != ".spack":  # Spack's metadata dir
                        subdirs.append((rel, entry.name))
                elif stat.S_ISREG(st.st_mode) and st.st_mode & _EXEC_BITS:
                    yield rel, dir_fd, entry.name, st
            stack.pop()
            for rel, name in reversed(subdirs):
                stack.append((rel, os.open(name, flags, dir_fd=dir_fd)))
            os.close(dir_fd)
    finally:
        for _, dir_fd in stack:
            os.close(dir_fd)


def _filter_shebang(
    dir_fd: int, name: str, st: os.stat_result, line: bytes, rel: str
) -> bool:
    """Prepend the sbang line to one file if its shebang is too long; True if rewritten."""
    with reader(dir_fd, name) as f:
        first = f.read(2)
        if first != b"#!":
            return False
        first += f.readline(SHEBANG_READ_LIMIT - 2)  # keeps its newline, and Spack counts it
        if len(first) <= SHEBANG_LIMIT or len(first) >= SHEBANG_READ_LIMIT or first == line:
            return False
        m = _INTERPRETER.match(first)
        if m is None:  # "#!" and blanks only
            return False
        rest = f.read()
    if len(line) - len(_SBANG) - 1 > SHEBANG_LIMIT:  # Spack: SbangPathError
        raise RelocationError(f"{rel} needs sbang, but the sbang path is longer than "
                              f"{SHEBANG_LIMIT} bytes; use a shorter mount path")
    rewrite(dir_fd, name, st, line + _second_line(first, m[1]) + rest)
    return True


def _second_line(first: bytes, interpreter: bytes) -> bytes:
    """The old shebang as line 2, in a form the interpreter ignores (Spack's variants)."""
    if interpreter.endswith((b"/lua", b"/luajit")):
        return b"--!" + first[2:]
    if interpreter.endswith(b"/node"):
        return b"//!" + first[2:]
    if interpreter.endswith(b"/php"):
        return b"<?php " + first + b" ?>"  # as Spack writes it: " ?>" after the newline
    return first
