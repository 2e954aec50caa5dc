"""A tarball's table of contents (TOC): what a client needs to serve one file of a package
without the rest of its tarball. Pure data and checks, no I/O.

A Spack tarball is one gzip stream. The TOC lists *seek points* in it (a place where a deflate
block starts, every few MiB of uncompressed data), each with the sha256 of the compressed
*span* from it to the next point and the sha256 of the 32 KiB *window* of uncompressed data
before it (a blob of its own, ``published.blob_path``); and every tar member with its offset in
the uncompressed tar and the sha256 of its content. A member is read by fetching the spans it
lies in and the window of the first one, and inflating from there (``install/tocread.py``).

Relocation changes the length of text files (prefixes of any length are swapped) and of
scripts that get an sbang line; a client must know the sizes before it has the bytes. So the
TOC records, per file, where each build-time prefix occurs (``Occurrence``, found exactly as
``install/relocate.py``'s text matcher finds them) and the first line of a script, and
``relocated_size`` replays relocation on them for the client's prefix mapping. ELF files and C
strings in binaries keep their length.

JSON shapes (``toc_body``/``parse_toc``): the build info is a list of pieces of its text;
points are ``[compressed, bits, uncompressed, window, span]``; members are ``[path, kind,
mode, size, link, offset, sha256, relocation]`` with ``relocation`` null or
``{"text": [[start, [[prefix index, end], ...]], ...], "shebang": base64, "link": true}``
(each key optional).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from lazymount.buildcache.published import open_envelope
from lazymount.errors import FormatError
from lazymount.system.files import climbs_out

Kind = Literal["file", "dir", "symlink", "hardlink"]
KINDS: tuple[Kind, ...] = ("file", "dir", "symlink", "hardlink")

WINDOW = 32 << 10  # deflate's window: the uncompressed bytes a point's inflate needs first
SHEBANG_HEAD = 8 << 10  # bytes of a script's start kept for sbang (Spack reads 4096)
TEXT_PIECE = 2048  # the build info is stored in pieces (an envelope's lines are bounded)
MAX_MEMBERS = 2_000_000
MAX_PATH = 4096
MAX_BUILDINFO = 1 << 20

SHEBANG_LIMIT = 127  # install/sbang.py's: Spack's system shebang limit
SHEBANG_READ_LIMIT = 4096
_SBANG = b"#!/bin/sh "
_INTERPRETER = re.compile(rb"#![ \t]*?([^ \t\0\n]+)")
# bytes of relocate.py's text regex class [\w\-_] and what its third group takes [\w\-_/]
_WORD = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-")
_PATH_WORD = _WORD | {ord("/")}
_PATH_RUN = re.compile(rb"[\w\-_/]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class SeekPoint:
    """A place inflating can start: the deflate block beginning at bit ``bits`` of byte
    ``compressed`` (the low ``bits`` bits belong to the block before), which yields the tar's
    byte ``uncompressed``. ``window``: sha256 of the 32 KiB before it ("" at the very start);
    ``span``: sha256 of the compressed bytes from ``compressed`` to the next point's
    ``compressed`` + 1 (its first byte is shared when it starts inside it), or to the end."""

    compressed: int
    bits: int
    uncompressed: int
    window: str
    span: str


@dataclass(frozen=True)
class Occurrence:
    """Where text relocation may replace a build-time prefix in a file: at byte ``start``
    (a "/"), each prefix of ``ends`` occurs; the match would end at its ``end`` (the path
    word after the prefix is swallowed, as Spack's ``TextFilePrefixReplacer`` does)."""

    start: int
    ends: tuple[tuple[str, int], ...]  # (old prefix, end of the match), in the TOC's order


@dataclass(frozen=True)
class Relocation:
    """What relocation does to one member, as far as its size is concerned."""

    text: tuple[Occurrence, ...] | None = None  # None: not a text file relocation rewrites
    shebang: bytes | None = None  # an executable "#!" file's first bytes (sbang's candidate)
    link: bool = False  # a symlink relocation re-points (``relocate_links``)


NO_RELOCATION = Relocation()


@dataclass(frozen=True)
class TocMember:
    """One tar member. ``path`` as in the tar; ``link``: a symlink's target or a hard link's
    target path, else ""; ``offset``: where its content starts in the uncompressed tar;
    ``sha256``: its content's (files only, else "")."""

    path: str
    kind: Kind
    mode: int
    size: int
    link: str
    offset: int
    sha256: str
    relocation: Relocation = NO_RELOCATION


@dataclass(frozen=True)
class Toc:
    """A tarball's table of contents. ``prefix``: the tar path of the package prefix
    directory; ``buildinfo``: the text of its ``.spack/binary_distribution`` (a client builds
    its prefix mapping from it, as for a whole tarball); ``prefixes``: the build-time prefixes
    whose occurrences were counted (every old prefix a mapping of this package can name)."""

    tarball_sha256: str
    tarball_size: int
    uncompressed_size: int
    prefix: str
    buildinfo: str
    prefixes: tuple[str, ...]
    points: tuple[SeekPoint, ...]
    members: tuple[TocMember, ...]


# ------------------------------------------------------------------------- seek points


def span_end(toc: Toc, index: int) -> int:
    """The end (exclusive) of point ``index``'s span in the tarball."""
    if index + 1 < len(toc.points):
        return toc.points[index + 1].compressed + 1
    return toc.tarball_size


def point_index(toc: Toc, uncompressed: int) -> int:
    """The last point at or before the tar's byte ``uncompressed``."""
    starts = [p.uncompressed for p in toc.points]
    return max(0, bisect.bisect_right(starts, uncompressed) - 1)


def spans_of(toc: Toc, member: TocMember) -> range:
    """The indexes of the points whose spans hold ``member``'s content."""
    first = point_index(toc, member.offset)
    last = point_index(toc, member.offset + max(member.size, 1) - 1)
    return range(first, last + 1)


def points_for(toc: Toc, member: TocMember) -> tuple[SeekPoint, int]:
    """The point to inflate ``member`` from, and the last tarball byte needed (inclusive,
    as an HTTP range says it): fetch ``[point.compressed, last]`` and that point's window."""
    spans = spans_of(toc, member)
    return toc.points[spans.start], span_end(toc, spans[-1]) - 1


# ------------------------------------------------------------------ relocated sizes


def count_text(data: bytes, prefixes: Sequence[str]) -> tuple[Occurrence, ...]:
    """Every place in ``data`` where relocation's text matcher could replace one of
    ``prefixes`` (absolute paths), whatever mapping a client has (publisher side).

    Spack's regex ``(?<![\\w\\-_/])([\\w\\-_]*?)(OLD)([\\w\\-_/]*)`` can only match where an old
    prefix (it starts with "/") follows a run of ``[\\w-]`` bytes that is itself not preceded
    by ``[\\w-/]``; which prefix is taken there, and so where the match ends, depends on the
    client's mapping: ``relocated_size`` decides.
    """
    found: dict[int, list[tuple[str, int]]] = {}
    for old in prefixes:
        needle = os.fsencode(old)
        at = data.find(needle)
        while at >= 0:
            if _may_start(data, at):
                after = at + len(needle)
                end = _PATH_RUN.match(data, after)
                found.setdefault(at, []).append((old, end.end() if end else after))
            at = data.find(needle, at + 1)
    return tuple(Occurrence(start, tuple(found[start])) for start in sorted(found))


def _may_start(data: bytes, at: int) -> bool:
    """Whether a text match may put an old prefix at ``at``: the bytes before it are a run of
    ``[\\w-]`` (maybe empty) that starts the data or follows a byte outside ``[\\w-/]``."""
    pos = at
    while pos > 0 and data[pos - 1] in _WORD:
        pos -= 1
    return pos == 0 or data[pos - 1] not in _PATH_WORD


def prefix_table(toc: Toc, mapping: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``mapping`` (``relocate.prefix_map``'s ordered pairs) as relocation compiles it: the
    first pair of each old prefix, identity pairs dropped, order kept. FormatError when it
    names an old prefix the TOC did not count (its sizes would be guesses)."""
    table: dict[str, str] = {}
    for old, new in mapping:
        if old and old != new and old not in table:
            if old not in toc.prefixes:
                raise FormatError(f"the table of contents does not count prefix {old[:200]!r}")
            table[old] = new
    return table


def _chosen(occurrences: Iterable[Occurrence], table: dict[str, str]) -> list[tuple[int, str]]:
    """The (start, old prefix) pairs relocation replaces: left to right, the first prefix
    of the mapping that occurs at a place wins, and its match swallows later places."""
    rank = {old: n for n, old in enumerate(table)}
    chosen, pos = [], 0
    for occ in occurrences:
        if occ.start < pos:
            continue
        ranked = [(rank[old], old, end) for old, end in occ.ends if old in rank]
        if ranked:
            _, old, end = min(ranked)
            chosen.append((occ.start, old))
            pos = end
    return chosen


def relocated_size(toc: Toc, member: TocMember, mapping: Iterable[tuple[str, str]],
                   sbang_path: str) -> int:
    """The size ``member`` (a file) has after relocation with ``mapping`` (the ordered
    ``(old, new)`` pairs ``relocate.prefix_map`` gives the client) and the sbang hook with
    ``sbang_path``. A hard link has its target's size: pass the target. FormatError when the
    mapping names a prefix the TOC did not count."""
    if member.kind != "file":
        raise ValueError(f"{member.path}: relocated_size is for files, not a {member.kind}")
    table = prefix_table(toc, mapping)
    reloc = member.relocation
    chosen = _chosen(reloc.text or (), table)
    size = member.size + sum(len(os.fsencode(table[old])) - len(os.fsencode(old))
                             for _, old in chosen)
    if reloc.shebang is not None:
        head = _replaced(reloc.shebang, chosen, table)
        size += _sbang_growth(head, sbang_path)
    return size


def relocated_link(toc: Toc, member: TocMember, mapping: Iterable[tuple[str, str]]) -> str:
    """A symlink's target after relocation: an absolute target listed for relocation gets
    the first old prefix that ends at a path boundary swapped (``relocate._Rules.swap_path``)."""
    if member.kind != "symlink" or not member.relocation.link or not member.link.startswith("/"):
        return member.link
    for old, new in prefix_table(toc, mapping).items():
        rest = member.link[len(old):]
        if member.link.startswith(old) and (old.endswith("/") or not rest or rest[0] == "/"):
            return new + rest
    return member.link


def _replaced(head: bytes, chosen: list[tuple[int, str]], table: dict[str, str]) -> bytes:
    """``head`` with the chosen replacements that lie wholly inside it applied."""
    pieces: list[bytes] = []
    copied = 0
    for start, old in chosen:
        old_b = os.fsencode(old)
        if start + len(old_b) > len(head):
            break
        pieces += (head[copied:start], os.fsencode(table[old]))
        copied = start + len(old_b)
    pieces.append(head[copied:])
    return b"".join(pieces)


def _sbang_growth(head: bytes, sbang_path: str) -> int:
    """How many bytes ``install/sbang.py`` adds to a relocated file starting with ``head``."""
    line = _SBANG + os.fsencode(sbang_path) + b"\n"
    newline = head.find(b"\n", 0, SHEBANG_READ_LIMIT)
    first = head[: newline + 1] if newline >= 0 else head[:SHEBANG_READ_LIMIT]
    if first[:2] != b"#!" or len(first) <= SHEBANG_LIMIT or len(first) >= SHEBANG_READ_LIMIT:
        return 0
    if first == line:
        return 0
    m = _INTERPRETER.match(first)
    if m is None:
        return 0
    interpreter = m[1]
    if interpreter.endswith((b"/lua", b"/luajit", b"/node")):
        return len(line) + 1  # "--!" or "//!" instead of "#!"
    if interpreter.endswith(b"/php"):
        return len(line) + len(b"<?php  ?>")
    return len(line)


# ------------------------------------------------------------------------- JSON


def toc_body(toc: Toc) -> dict[str, Any]:
    """The body of a TOC envelope (``published.make_envelope("toc", ...)``)."""
    index = {old: n for n, old in enumerate(toc.prefixes)}
    return {
        "tarball": {"sha256": toc.tarball_sha256, "size": toc.tarball_size,
                    "uncompressed": toc.uncompressed_size},
        "prefix": toc.prefix,
        "buildinfo": [toc.buildinfo[n:n + TEXT_PIECE]
                      for n in range(0, len(toc.buildinfo), TEXT_PIECE)],
        "prefixes": list(toc.prefixes),
        "points": [[p.compressed, p.bits, p.uncompressed, p.window, p.span] for p in toc.points],
        "members": [[m.path, m.kind, m.mode, m.size, m.link, m.offset, m.sha256,
                     _relocation_body(m.relocation, index)] for m in toc.members],
    }


def _relocation_body(reloc: Relocation, index: dict[str, int]) -> dict[str, Any] | None:
    body: dict[str, Any] = {}
    if reloc.text is not None:
        body["text"] = [[occ.start, [[index[old], end] for old, end in occ.ends]]
                        for occ in reloc.text]
    if reloc.shebang is not None:
        body["shebang"] = base64.b64encode(reloc.shebang).decode()
    if reloc.link:
        body["link"] = True
    return body or None


def parse_toc(plaintext: bytes, where: str) -> Toc:
    """The TOC in a verified envelope's plaintext; every field is checked (types, ranges,
    order, paths inside the prefix). FormatError naming ``where``."""
    return parse_toc_body(open_envelope(plaintext, "toc", where), where)


def parse_toc_body(body: dict[str, Any], where: str) -> Toc:
    """``parse_toc`` of an envelope already opened (``published.open_envelope``)."""
    return _Parser(where).toc(body)


class _Parser:
    def __init__(self, where: str):
        self.where = where

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.where}: table of contents: {what}")

    def int_(self, value: object, what: str, low: int = 0, high: int = 1 << 62) -> int:
        if type(value) is not int or not low <= value <= high:
            raise self.fail(f"{what} is not a number from {low} to {high}")
        return value

    def str_(self, value: object, what: str, limit: int = MAX_PATH) -> str:
        if not isinstance(value, str) or len(value) > limit or "\0" in value:
            raise self.fail(f"{what} is not a string of at most {limit} characters")
        return value

    def sha(self, value: object, what: str, empty: bool = False) -> str:
        if not (isinstance(value, str) and (_SHA256.fullmatch(value) or (empty and not value))):
            raise self.fail(f"{what} is not a sha256")
        return value

    def list_(self, value: object, what: str, length: int | None = None) -> list[Any]:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            raise self.fail(f"{what} is not a list" + (f" of {length}" if length else ""))
        return value

    def path(self, value: object, what: str) -> str:
        path = self.str_(value, what)
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise self.fail(f"{what} {path[:200]!r} is not a clean relative path")
        return path

    def toc(self, body: dict[str, Any]) -> Toc:
        if not isinstance(body, dict):
            raise self.fail("not a mapping")
        tarball = body.get("tarball")
        if not isinstance(tarball, dict):
            raise self.fail("no tarball")
        sha = self.sha(tarball.get("sha256"), "tarball sha256")
        size = self.int_(tarball.get("size"), "tarball size", 1)
        total = self.int_(tarball.get("uncompressed"), "uncompressed size")
        prefix = body.get("prefix")
        prefix = "" if prefix == "" else self.path(prefix, "prefix")
        pieces = self.list_(body.get("buildinfo"), "buildinfo")
        buildinfo = "".join(self.str_(piece, "buildinfo", TEXT_PIECE) for piece in pieces)
        if len(buildinfo) > MAX_BUILDINFO:
            raise self.fail(f"the build info is longer than {MAX_BUILDINFO} characters")
        prefixes = tuple(self.absolute(p) for p in self.list_(body.get("prefixes"), "prefixes"))
        if len(set(prefixes)) != len(prefixes):
            raise self.fail("a prefix is listed twice")
        points = self.points(self.list_(body.get("points"), "points"), size, total)
        members = self.members(self.list_(body.get("members"), "members"), prefix, prefixes,
                               total)
        return Toc(sha, size, total, prefix, buildinfo, prefixes, points, members)

    def absolute(self, value: object) -> str:
        path = self.str_(value, "prefix")
        if not path.startswith("/") or ".." in path.split("/") or "\n" in path:
            raise self.fail(f"prefix {path[:200]!r} is not an absolute path")
        return path

    def points(self, rows: list[Any], size: int, total: int) -> tuple[SeekPoint, ...]:
        points: list[SeekPoint] = []
        for n, row in enumerate(rows):
            what = f"point {n}"
            compressed, bits, uncompressed, window, span = self.list_(row, what, 5)
            point = SeekPoint(self.int_(compressed, what, 0, size - 1),
                              self.int_(bits, what, 0, 7),
                              self.int_(uncompressed, what, 0, total),
                              self.sha(window, f"{what} window", empty=True),
                              self.sha(span, f"{what} span"))
            if points and (point.compressed <= points[-1].compressed
                           or point.uncompressed <= points[-1].uncompressed):
                raise self.fail(f"{what} is not after the one before")
            if (point.uncompressed < WINDOW) != (point.window == ""):
                raise self.fail(f"{what} has a window where it needs none, or none where it "
                                "needs one")
            points.append(point)
        if not points or points[0].uncompressed != 0:
            raise self.fail("the first point is not at the start of the tar")
        return tuple(points)

    def members(self, rows: list[Any], prefix: str, prefixes: tuple[str, ...],
                total: int) -> tuple[TocMember, ...]:
        if len(rows) > MAX_MEMBERS:
            raise self.fail(f"more than {MAX_MEMBERS} members")
        members: list[TocMember] = []
        kinds: dict[str, str] = {}
        for n, row in enumerate(rows):
            member = self.member(self.list_(row, f"member {n}", 8), n, prefixes, total)
            self.place(member, prefix, kinds)
            members.append(member)
        return tuple(members)

    def member(self, row: list[Any], n: int, prefixes: tuple[str, ...], total: int
               ) -> TocMember:
        path, kind, mode, size, link, offset, sha256, relocation = row
        what = f"member {n}"
        path = self.path(path, f"{what} path")
        if kind not in KINDS:
            raise self.fail(f"{what} has kind {str(kind)[:20]!r}")
        member = TocMember(
            path, cast(Kind, kind), self.int_(mode, f"{what} mode", 0, 0o7777),
            self.int_(size, f"{what} size", 0, total), self.str_(link, f"{what} link"),
            self.int_(offset, f"{what} offset", 0, total),
            self.sha(sha256, f"{what} sha256", empty=kind != "file"),
            self.relocation(relocation, what, prefixes))
        if member.offset + member.size > total:
            raise self.fail(f"{what} ends after the tar")
        if kind != "file" and (member.size or member.sha256):
            raise self.fail(f"{what} is a {kind} with content")
        if (kind in ("symlink", "hardlink")) != bool(member.link):
            raise self.fail(f"{what}: a link target where none belongs, or none where one does")
        return member

    def place(self, member: TocMember, prefix: str, kinds: dict[str, str]) -> None:
        """A member lies inside the prefix (or is a directory above it), once; a hard link
        names an earlier file."""
        path = member.path
        inside = not prefix or path == prefix or path.startswith(prefix + "/")
        above = member.kind == "dir" and prefix.startswith(path + "/")
        if not (inside or above):
            raise self.fail(f"{path[:200]!r} lies outside the prefix {prefix[:200]!r}")
        if path in kinds:
            raise self.fail(f"{path[:200]!r} is listed twice")
        if member.kind == "hardlink" and kinds.get(self.path(member.link, "link")) != "file":
            raise self.fail(f"{path[:200]!r} is a hard link to something not an earlier file")
        if member.kind == "symlink" and climbs_out(path, member.link, prefix):
            raise self.fail(f"{path[:200]!r} is a symlink that climbs out of the prefix")
        kinds[path] = "file" if member.kind == "hardlink" else member.kind

    def relocation(self, value: object, what: str, prefixes: tuple[str, ...]) -> Relocation:
        if value is None:
            return NO_RELOCATION
        if not isinstance(value, dict) or set(value) - {"text", "shebang", "link"}:
            raise self.fail(f"{what} relocation is not a mapping of text, shebang, link")
        text = None
        if "text" in value:
            text = tuple(self.occurrence(row, what, prefixes)
                         for row in self.list_(value["text"], f"{what} text"))
            if any(b.start <= a.start for a, b in zip(text, text[1:], strict=False)):
                raise self.fail(f"{what} text places are not in order")
        shebang = None
        if "shebang" in value:
            try:
                encoded = self.str_(value["shebang"], what, SHEBANG_HEAD * 4 // 3 + 4)
                shebang = base64.b64decode(encoded, validate=True)
            except binascii.Error:
                raise self.fail(f"{what} shebang is not base64") from None
            if not shebang.startswith(b"#!") or len(shebang) > SHEBANG_HEAD:
                raise self.fail(f"{what} shebang is not the start of a script")
        link = value.get("link", False)
        if link is not True and link is not False:
            raise self.fail(f"{what} link is not a boolean")
        return Relocation(text, shebang, link)

    def occurrence(self, row: object, what: str, prefixes: tuple[str, ...]) -> Occurrence:
        start, ends = self.list_(row, f"{what} text place", 2)
        start = self.int_(start, f"{what} text place")
        pairs = []
        for pair in self.list_(ends, f"{what} text place"):
            index, end = self.list_(pair, f"{what} text place", 2)
            old = prefixes[self.int_(index, f"{what} prefix index", 0, len(prefixes) - 1)]
            pairs.append((old, self.int_(end, f"{what} text end",
                                         start + len(os.fsencode(old)))))
        if not pairs:
            raise self.fail(f"{what} text place names no prefix")
        return Occurrence(start, tuple(pairs))
