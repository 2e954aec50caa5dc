"""Rewrite build-time paths in an extracted package prefix, the way Spack does on install.

A re-implementation of Spack 1.x ``binary_distribution.relocate_package`` (rules in
SPACK-FORMAT.md §5; the sbang post-install hook is in ``sbang``). In Spack's order:

1. ELF RPATH/RUNPATH and PT_INTERP, in place (never longer: we do not ship patchelf);
2. absolute symlinks listed in ``relocate_links``;
3. text files (``TextFilePrefixReplacer``: any length, at path-component boundaries);
4. C strings in binaries (``BinaryFilePrefixReplacer``: same length, leading-"/" padding).

Everything here is blocking and meant for a worker thread; calls share no state. Files are
rewritten in place, so modes, inodes and hard links are kept, and a file whose bytes do not
change is not written at all (its mtime stays 0). Entries are opened relative to the prefix
with ``O_NOFOLLOW`` one component at a time (``prefixfiles``), so nothing outside the prefix is
ever touched.
"""

from __future__ import annotations

import errno
import mmap
import os
import posixpath
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from lazymount.errors import (
    MountPathTooLong,
    RelocationError,
    StoreError,
    StoreFull,
    about,
)
from lazymount.install import elf
from lazymount.install.buildinfo import BuildInfo
from lazymount.install.prefixfiles import Prefix, patch, reader, rewrite

SUFFIX_SAFETY = 7  # Spack's suffix_safety_size: C-string tail bytes that must survive a rewrite

# bytes of the regex class [\w\-_] (bytes patterns are ASCII-only)
_WORD = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-"


@dataclass
class RelocationReport:
    """What ``relocate_prefix`` changed: files per step, and every changed path once."""

    elf: int = 0  # ELF files whose RPATH/RUNPATH or PT_INTERP was rewritten
    links: int = 0  # symlinks re-pointed
    text: int = 0  # text files rewritten
    binaries: int = 0  # binaries whose C strings were rewritten
    changed: list[str] = field(default_factory=list)  # relative paths, first-change order


def prefix_map(
    buildinfo: BuildInfo,
    new_root: str,
    new_prefix_of: Callable[[str], str | None],
    new_sbang: str,
) -> list[tuple[str, str]]:
    """Spack's ordered prefix-to-prefix mapping for one package.

    Input: the package's buildinfo; the new install root; ``new_prefix_of(hash)`` giving a
    dependency's new prefix (``None``: not mapped, e.g. an external); the new sbang path.
    Output: ``(old, new)`` pairs, first match wins: the sbang path, the package's own prefix,
    the other ``hash_to_prefix`` entries in file order, then the build root; identity pairs
    dropped. Thread: any.
    """
    root = buildinfo.buildpath
    pairs: dict[str, str] = {}  # assignment keeps the first position, as Spack's dict does
    if buildinfo.sbang_install_path:
        pairs[buildinfo.sbang_install_path] = new_sbang
    own = posixpath.join(root, buildinfo.relative_prefix)
    entries = list(buildinfo.hash_to_prefix.items())
    entries.sort(key=lambda item: item[1] != own)  # stable: own prefix first, rest in order
    for dag_hash, old in entries:
        new = new_prefix_of(dag_hash)
        if new is not None:
            pairs[old] = new
    pairs[root] = new_root
    return [(old, new) for old, new in pairs.items() if old != new]


def relocate_prefix(
    prefix_dir: Path, buildinfo: BuildInfo, mapping: list[tuple[str, str]], what: str
) -> RelocationReport:
    """Relocate an extracted prefix in place, in Spack's order (see the module docstring).

    Input: the directory holding the extracted prefix; its buildinfo (``relocate_binaries``,
    ``relocate_links``, ``relocate_textfiles``, ``hardlinks_deduped``); the ordered mapping from
    ``prefix_map`` (a repeated old prefix: the first pair counts); ``what`` names the package.
    Output: a ``RelocationReport``. Hard links must be real links (each inode is rewritten once
    and in place, so every name sees it); listed symlinks and non-regular files are skipped.
    Errors: ``MountPathTooLong`` when a binary string would have to grow; ``RelocationError``
    for a C string that cannot shrink safely, a listed path that is absolute, has "..", goes
    through a symlink or is missing; ``StoreError`` when
    the disk refuses a write. A failed package is half-relocated: discard the prefix.
    Thread: blocking, any worker thread.
    """
    with about(what):
        return _relocate_prefix(prefix_dir, buildinfo, mapping)


def _relocate_prefix(
    prefix_dir: Path, buildinfo: BuildInfo, mapping: list[tuple[str, str]]
) -> RelocationReport:
    report = RelocationReport()
    rules = _Rules(mapping)
    if not rules.new_of:
        return report
    changed: dict[str, None] = {}
    try:
        with Prefix(prefix_dir) as pfx:
            texts, binaries = _dedupe_hardlinks(pfx, buildinfo)
            links = list(buildinfo.relocate_links)
            steps: tuple[tuple[str, Callable[[], list[str]]], ...] = (
                ("elf", lambda: _elf_step(pfx, rules, binaries)),
                ("links", lambda: _links_step(pfx, rules, links)),
                ("text", lambda: _text_step(pfx, rules, texts)),
                ("binaries", lambda: _cstring_step(pfx, rules, binaries, buildinfo.buildpath)),
            )
            for name, step in steps:
                done = step()
                setattr(report, name, len(done))
                changed.update(dict.fromkeys(done))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull("no space left on the store's file system while "
                            "relocating") from None
        raise StoreError(f"cannot relocate {prefix_dir}: {exc}") from None
    report.changed = list(changed)
    return report


# ---------------------------------------------------------------------------- the mapping


class _Rules:
    """One package's mapping, compiled once: the lookup table and the three regexes."""

    def __init__(self, mapping: list[tuple[str, str]]) -> None:
        new_of: dict[bytes, bytes] = {}
        for old, new in mapping:
            old_b, new_b = os.fsencode(old), os.fsencode(new)
            if old_b and old_b != new_b and old_b not in new_of:
                new_of[old_b] = new_b
        self.new_of = new_of
        alts = b"|".join(re.escape(old) for old in new_of)
        # ELF paths and link targets: first listed prefix that ends at a path boundary
        self.path = re.compile(b"(?:" + alts + rb")(?:(?<=/)|(?=/|\Z))")
        # Spack's TextFilePrefixReplacer regex
        self.text = re.compile(rb"(?<![\w\-_/])([\w\-_]*?)(" + alts + rb")([\w\-_/]*)")
        # Spack's BinaryFilePrefixReplacer regex
        self.cstring = re.compile(b"(" + alts + rb")([^\0]{0,%d}\0)?" % SUFFIX_SAFETY)
        # every match starts with this: a quick "no old prefix in here" test
        self.needle = cast(bytes, os.path.commonprefix(list(new_of))) if new_of else b""
        # where any old prefix occurs; the literal head lets re scan with a fast substring search
        rests = b"|".join(re.escape(old[len(self.needle) :]) for old in new_of)
        self.any_old = re.compile(re.escape(self.needle) + b"(?:" + rests + b")")
        # the fast text scan needs prefixes to start outside [\w-] (true for absolute paths)
        self.text_fast = bool(self.needle) and self.needle[0] not in _WORD

    def swap_path(self, path: bytes) -> bytes | None:
        """``path`` with its leading old prefix replaced, or None when none matches."""
        m = self.path.match(path)
        return None if m is None else self.new_of[m.group()] + path[m.end() :]


def _dedupe_hardlinks(pfx: Prefix, buildinfo: BuildInfo) -> tuple[list[str], list[str]]:
    """(text files, binaries), each multiply-linked inode kept once, as Spack does for old
    tarballs: relocating an inode twice would apply the mapping to already-new paths."""
    texts, binaries = list(buildinfo.relocate_textfiles), list(buildinfo.relocate_binaries)
    if buildinfo.hardlinks_deduped:
        return texts, binaries
    seen: set[tuple[int, int]] = set()

    def keep(rels: list[str]) -> list[str]:
        kept = []
        for rel in rels:
            with pfx.parent(rel) as (dir_fd, name):
                st = pfx.lstat(dir_fd, name, rel)
            inode = (st.st_dev, st.st_ino)
            if st.st_nlink > 1:
                if inode in seen:
                    continue
                seen.add(inode)
            kept.append(rel)
        return kept

    return keep(texts), keep(binaries)



# ---------------------------------------------------------------------- step 1: ELF


def _elf_step(pfx: Prefix, rules: _Rules, binaries: list[str]) -> list[str]:
    changed = []
    for rel, dir_fd, name, st in pfx.files(binaries):
        with reader(dir_fd, name) as f:
            if f.read(4) != elf.MAGIC:  # Mach-O and friends: only the C-string step applies
                continue
            paths = elf.read_elf_paths(f)
        if paths is None:
            continue
        edits = _elf_edits(paths, rules, rel)
        if edits:
            patch(dir_fd, name, st, edits)
            changed.append(rel)
    return changed


def _elf_edits(paths: elf.ElfPaths, rules: _Rules, rel: str) -> list[tuple[int, bytes]]:
    """In-place writes for RPATH and PT_INTERP; all-or-nothing, as in Spack."""
    planned: list[tuple[str, elf.CString, bytes]] = []
    if paths.rpath is not None:
        new = _new_rpath(paths.rpath.value, rules)
        if new is not None:
            planned.append(("RPATH", paths.rpath, new))
    if paths.interp is not None:
        new = rules.swap_path(paths.interp.value)
        if new is not None:
            planned.append(("PT_INTERP", paths.interp, new))
    for kind, old, new in planned:
        if len(new) > len(old.value):
            raise MountPathTooLong(
                f"cannot rewrite the {kind} of {rel}: the new value is longer than the "
                f"old one ({len(new)} > {len(old.value)} bytes; {_show(new)}) and lazymount "
                "does not run patchelf; use a mount path no longer than the build root"
            )
    # zero-fill the shortened tail: still a C string, and no stale path bytes left behind
    return [(old.offset, new + b"\0" * (len(old.value) - len(new))) for _, old, new in planned]


def _new_rpath(value: bytes, rules: _Rules) -> bytes | None:
    """The relocated RPATH (empty entries dropped, as Spack does), or None if unchanged."""
    entries = [e for e in value.split(b":") if e]
    swapped = [rules.swap_path(e) for e in entries]
    if all(s is None for s in swapped):
        return None
    return b":".join(e if s is None else s for e, s in zip(entries, swapped, strict=True))


# -------------------------------------------------------------------- step 2: symlinks


def _links_step(pfx: Prefix, rules: _Rules, links: list[str]) -> list[str]:
    changed = []
    for rel in links:
        with pfx.parent(rel) as (dir_fd, name):
            if not stat.S_ISLNK(pfx.lstat(dir_fd, name, rel).st_mode):
                continue
            target = os.fsencode(os.readlink(name, dir_fd=dir_fd))
            new = rules.swap_path(target) if target.startswith(b"/") else None
            if new is None:
                continue
            _replace_symlink(dir_fd, name, new)
            changed.append(rel)
    return changed


def _replace_symlink(dir_fd: int, name: str, target: bytes) -> None:
    """Atomically re-point symlink ``name``: a new link under a temporary name, renamed over."""
    tmp = f".lazymount-link-{secrets.token_hex(8)}"
    os.symlink(target, tmp, dir_fd=dir_fd)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(tmp, dir_fd=dir_fd)
        raise


# ------------------------------------------------------------------ step 3: text files


def _text_step(pfx: Prefix, rules: _Rules, texts: list[str]) -> list[str]:
    changed = []
    for rel, dir_fd, name, st in pfx.files(texts):
        with reader(dir_fd, name) as f:
            data = f.read()
        new = _replace_text(data, rules)
        if new is not None and new != data:
            rewrite(dir_fd, name, st, new)
            changed.append(rel)
    return changed


def _replace_text(data: bytes, rules: _Rules) -> bytes | None:
    """Spack's text substitution over ``data``: ``g1 + new + g3`` for every match of
    ``rules.text``; None when nothing matched.

    Same result as ``rules.text.sub`` but fast: the regex begins with a lazy ``[\\w-]*?`` so
    ``re`` would try it at every byte (~40 MB/s). When old prefixes start outside ``[\\w-]``, a
    match can only start where the run of ``[\\w-]`` bytes before an old prefix starts; so we
    search for old prefixes and ``match`` only there (the lookbehind still sees the bytes before).
    """
    if not rules.text_fast:
        new, count = rules.text.subn(lambda m: m[1] + rules.new_of[m[2]] + m[3], data)
        return new if count else None
    pieces: list[bytes] = []
    copied = pos = 0
    while (hit := rules.any_old.search(data, pos)) is not None:
        m = rules.text.match(data, _word_run_start(data, hit.start(), pos))
        if m is None:  # preceded by "/" or inside a word: no match can start at or before hit
            pos = hit.start() + 1
            continue
        pieces += (data[copied : m.start()], m[1], rules.new_of[m[2]], m[3])
        copied = pos = m.end()
    if not pieces:
        return None
    pieces.append(data[copied:])
    return b"".join(pieces)


def _word_run_start(data: bytes, end: int, low: int) -> int:
    """Start of the run of ``[\\w-]`` bytes ending at ``end``, not below ``low``."""
    start, step = end, 64
    while start > low:
        lo = max(low, start - step)
        kept = len(data[lo:start].rstrip(_WORD))
        start = lo + kept
        if kept:
            break
        step *= 2  # long runs are rare; grow the window instead of looping per byte
    return start


# --------------------------------------------------------------- step 4: C strings


def _cstring_step(
    pfx: Prefix, rules: _Rules, binaries: list[str], old_root: str
) -> list[str]:
    changed = []
    for rel, dir_fd, name, st in pfx.files(binaries):
        if st.st_size == 0:
            continue
        with reader(dir_fd, name) as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf.find(rules.needle) < 0:
                continue
            # plain tuples: no Match may outlive the map (closing it would fail)
            found = [(m.start(), m[1], m[2]) for m in rules.cstring.finditer(buf)]
        edits = _cstring_edits(found, rules, rel, old_root)
        if edits:
            patch(dir_fd, name, st, edits)
            changed.append(rel)
    return changed


def _cstring_edits(
    found: list[tuple[int, bytes, bytes | None]],
    rules: _Rules,
    rel: str,
    old_root: str | None,
) -> list[tuple[int, bytes]]:
    """Spack's BinaryFilePrefixReplacer decisions for one file: (offset, bytes) to write.

    Input: per match of ``rules.cstring``, its offset, the old prefix, and the rest of the C
    string with its NUL (None when no NUL is within the look-ahead). A prefix keeps its string's
    length when the string's tail survives: no NUL seen (a long string), at least
    ``SUFFIX_SAFETY`` bytes after the prefix, or old and new ending alike; then it is written as
    ``"/" * (len(old) - len(new)) + new``. Otherwise the string is shortened (``new + rest``,
    NUL-terminated early) when that leaves more than ``SUFFIX_SAFETY`` old bytes in place for
    strings the linker merged by suffix. Errors: ``MountPathTooLong`` (grows),
    ``RelocationError`` (cannot shrink safely).
    """
    edits = []
    for start, old, rest in found:
        new = rules.new_of[old]
        shorter = len(old) - len(new)
        if shorter < 0:
            root = f" ({len(old_root)} characters)" if old_root else ""
            raise MountPathTooLong(
                f"cannot replace {_show(old)} with {_show(new)} in {rel}: the new prefix "
                f"is longer; mount at a path no longer than the build root{root}, or use a "
                "cache built with padded_length"
            )
        tail = -1 if rest is None else len(rest) - 1  # C-string bytes after the prefix
        keep = SUFFIX_SAFETY - tail
        if rest is None or keep <= 0 or old[-keep:] == new[-keep:]:
            edits.append((start, b"/" * shorter + new))
        elif shorter > SUFFIX_SAFETY:
            edits.append((start, new + rest))
        else:
            raise RelocationError(
                f"cannot replace {_show(old)} with {_show(new)} in the C string "
                f"{_show(old + rest[:-1])} of {rel}: too little of it would stay in place; "
                "mount at a path of the same length as the build root"
            )
    return edits


def _show(path: bytes) -> str:
    return repr(path.decode("utf-8", "backslashreplace"))
