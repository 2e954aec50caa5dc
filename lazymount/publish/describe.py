"""One tarball described: its table of contents and the windows of its seek points.

The tarball is a local file whose sha256 was checked against its signed manifest. One pass
inflates it (``rapidgzip`` keeps its seek points as it goes) and walks the tar with the
checks extraction makes (``install/extract.py``: names, parents, duplicates, the prefix, the
build info), hashing every file; then the files relocation rewrites as text, and the scripts
sbang may rewrite, are read again through the index to record what their relocated size
depends on (``buildcache/toc.py``). Blocking: run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from pathlib import Path

from lazymount.buildcache.toc import (
    NO_RELOCATION,
    SHEBANG_HEAD,
    Occurrence,
    Relocation,
    SeekPoint,
    Toc,
    TocMember,
    count_text,
)
from lazymount.errors import FormatError, IntegrityError, about
from lazymount.install.buildinfo import BuildInfo, check_build_prefix, parse_buildinfo
from lazymount.install.extract import MemberChecks
from lazymount.install.limits import Limits
from lazymount.install.tarstream import Member, Source, members
from lazymount.install.tocread import inflate_from
from lazymount.publish.gzindex import GzipIndex, Point

READ = 1 << 20
CHECKED = 64 << 10  # uncompressed bytes inflated from each point to check it
CHECKED_INPUT = 256 << 10  # compressed bytes given for that (64 KiB of data fit in far less)


@dataclass(frozen=True)
class Described:
    toc: Toc
    windows: dict[str, bytes]  # sha256 -> the 32 KiB window it names


@dataclass
class _Walked:
    """What the pass over the tar found."""

    rows: list[tuple[Member, int]]  # each member once, with the offset of its content
    checks: MemberChecks
    prefix: str
    buildinfo: BuildInfo
    buildinfo_text: str
    uncompressed: int


def describe(path: Path, sha256: str, what: str, limits: Limits | None = None) -> Described:
    """The table of contents of the gzip'd Spack tarball at ``path`` (whose sha256 is
    ``sha256``). FormatError or UnsafeArchiveError (with ``what``) for anything extraction
    would refuse, or a tarball of more than one gzip stream."""
    size = path.stat().st_size
    with GzipIndex(path, what) as index:
        with about(what):  # the checks it shares with extraction raise the bare reason
            walked = _walk(index, limits or Limits(), what)
        index.check_one_stream()
        # an index may end with a point at the very end of the stream: nothing follows it
        found = [p for p in index.points() if p.uncompressed < walked.uncompressed]
        _check_points(path, index, found, size, walked.uncompressed, what)
        relocations = _relocations(index, walked, what)
    points = _points(path, found, size)
    windows = {p.window: w.window for p, w in zip(points, found, strict=True) if w.window}
    toc = Toc(sha256, size, walked.uncompressed, walked.prefix, walked.buildinfo_text,
              old_prefixes(walked.buildinfo), points, _members(walked, relocations))
    return Described(toc, windows)


def old_prefixes(buildinfo: BuildInfo) -> tuple[str, ...]:
    """Every build-time prefix ``relocate.prefix_map`` can map for this package: the sbang
    path, each ``hash_to_prefix`` prefix, the build root (once each, in that order)."""
    olds = [buildinfo.sbang_install_path or "", *buildinfo.hash_to_prefix.values(),
            buildinfo.buildpath]
    return tuple(dict.fromkeys(old for old in olds if old))


def _walk(index: GzipIndex, limits: Limits, what: str) -> _Walked:
    src = Source(index.chunks())
    checks = MemberChecks(limits)
    rows: list[tuple[Member, int]] = []
    seen_dirs: set[str] = set()

    def forget() -> None:  # nothing is written: the bytes read are dropped once checked
        src.passed()

    for member in members(src, limits):
        offset = src.position
        checks.add(member, src, forget)
        forget()
        if member.kind == "dir":
            if member.name in seen_dirs:  # tar may list a directory twice; the TOC once
                continue
            seen_dirs.add(member.name)
        rows.append((member, offset))
    src.drain()
    prefix = checks.prefix()
    buildinfo = parse_buildinfo(checks.buildinfo_data, what)
    check_build_prefix(buildinfo, "/" + prefix, what)
    try:
        text = checks.buildinfo_data.decode()
    except UnicodeDecodeError:
        raise FormatError(f"{what}: its build info is not UTF-8") from None
    return _Walked(rows, checks, prefix, buildinfo, text, src.position)


def _relocations(index: GzipIndex, walked: _Walked, what: str) -> dict[str, Relocation]:
    """Tar path -> what relocation needs of it, for files relocated as text, scripts and
    symlinks relocation re-points."""
    by_path = {member.name: (member, offset) for member, offset in walked.rows}
    info, prefix = walked.buildinfo, walked.prefix
    olds = old_prefixes(info)
    listed = (_listed(by_path, prefix, rel, what) for rel in info.relocate_textfiles)
    texts = {name for name in listed if name is not None}
    scripts = {n for n in walked.checks.scripts if not _inside(n, _join(prefix, ".spack"))}
    text: dict[str, tuple[Occurrence, ...]] = {}
    heads: dict[str, bytes] = {}
    # in the tar's order: each read goes on inflating where the one before stopped
    for name in sorted(texts | scripts, key=lambda n: by_path[n][1]):
        member, offset = by_path[name]
        data = index.pread(offset, member.size if name in texts else
                           min(member.size, SHEBANG_HEAD))
        if name in texts:
            text[name] = count_text(data, olds)
        if name in scripts:
            heads[name] = data[:SHEBANG_HEAD]
    links = set()
    for rel in info.relocate_links:
        found = by_path.get(_join(prefix, _clean(rel)))
        if found is not None and found[0].kind == "symlink":
            links.add(found[0].name)
    return {name: Relocation(text.get(name), heads.get(name), name in links)
            for name in {*text, *heads, *links}}


def _listed(by_path: dict[str, tuple[Member, int]], prefix: str, rel: str, what: str
            ) -> str | None:
    """The file a ``relocate_textfiles`` entry rewrites (a hard link: its target), None for
    what relocation skips (symlinks, directories); FormatError for one that is missing, as
    relocation would fail on it."""
    name = _join(prefix, _clean(rel))
    for _ in range(64):  # a hard link names an earlier file, so chains end
        found = by_path.get(name)
        if found is None:
            raise FormatError(f"{what}: {rel} is listed for relocation but not in the package")
        member = found[0]
        if member.kind != "hardlink":
            return name if member.kind == "file" else None
        name = member.linkname
    raise FormatError(f"{what}: hard links of {rel} do not end")


def _members(walked: _Walked, relocations: dict[str, Relocation]) -> tuple[TocMember, ...]:
    result = []
    contents = walked.checks.contents
    for member, offset in walked.rows:
        is_file = member.kind == "file"
        result.append(TocMember(
            member.name, member.kind, member.mode & 0o7777,  # type: ignore[arg-type]
            member.size if is_file else 0,
            member.linkname if member.kind in ("symlink", "hardlink") else "",
            offset, contents[member.name][1] if is_file else "",
            relocations.get(member.name, NO_RELOCATION)))
    return tuple(result)


def _points(path: Path, found: list[Point], size: int) -> tuple[SeekPoint, ...]:
    """Seek points with the sha256 of each span (read from the file) and of each window."""
    points = []
    with open(path, "rb") as file:
        for n, point in enumerate(found):
            end = found[n + 1].compressed + 1 if n + 1 < len(found) else size
            file.seek(point.compressed)
            digest, left = hashlib.sha256(), end - point.compressed
            while left:
                chunk = file.read(min(left, READ))
                if not chunk:
                    raise FormatError(f"{path}: shorter than its seek points say")
                digest.update(chunk)
                left -= len(chunk)
            window = hashlib.sha256(point.window).hexdigest() if point.window else ""
            points.append(SeekPoint(point.compressed, point.bits, point.uncompressed, window,
                                    digest.hexdigest()))
    return tuple(points)


def _check_points(path: Path, index: GzipIndex, found: list[Point], size: int, total: int,
                  what: str) -> None:
    """Inflate the start of every point as a client will (``install/tocread.py``) and
    compare it with the stream: a point the index got wrong is caught here, not by every
    client that reads from it."""
    with open(path, "rb") as file:
        for n, point in enumerate(found):
            end = found[n + 1].uncompressed if n + 1 < len(found) else total
            want = min(CHECKED, end - point.uncompressed)
            file.seek(point.compressed)
            data = file.read(min(size - point.compressed, CHECKED_INPUT))
            try:
                got = inflate_from(data, point.bits, point.window, want, what)
            except IntegrityError:
                got = b""
            if len(got) < want or got != index.pread(point.uncompressed, want):
                raise FormatError(f"{what}: the gzip index's point {n} does not inflate to "
                                  "the stream; no table of contents")


def _clean(rel: str) -> str:
    """A listed path as relocation walks it (empty and "." components dropped)."""
    return "/".join(part for part in rel.split("/") if part not in ("", "."))


def _join(prefix: str, rel: str) -> str:
    return posixpath.join(prefix, rel) if prefix else rel


def _inside(name: str, folder: str) -> bool:
    return name == folder or name.startswith(folder + "/")
