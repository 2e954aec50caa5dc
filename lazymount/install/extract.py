"""Safe, streaming extraction of a Spack install tarball (SPACK-FORMAT.md section 4).

The blob is read once, front to back: it is decompressed in bounded chunks (``decompress``)
and its tar headers are parsed by ``tarstream`` (not by ``tarfile.TarFile``, whose stream mode
reads any extended header whole into memory, however large it claims to be). Every member is
checked here and its files hashed as they pass; only then are its bytes handed to GNU tar
(``gnutar``), which creates it under ``staging/raw/<member name>``. The package prefix is
known only at the end (``.spack/binary_distribution`` is the last member); then every member is
checked to lie inside it, and the tree tar made to be the one that was checked. Nothing is
ever written outside ``staging``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lazymount.errors import (
    FormatError,
    LazymountError,
    StoreError,
    StoreFull,
    UnsafeArchiveError,
    about,
)
from lazymount.install.buildinfo import (
    BUILDINFO,
    MAX_BUILDINFO_BYTES,
    BuildInfo,
    check_build_prefix,
    parse_buildinfo,
)
from lazymount.install.decompress import CHUNK, decompressed, read_ahead
from lazymount.install.gnutar import TarChild
from lazymount.install.limits import Limits
from lazymount.install.tarstream import Member, Source, members, show, unsafe
from lazymount.system.files import climbs_out

MAX_COMPONENT = 255  # NAME_MAX of Linux file systems
# real prefixes nest a few dozen levels; every walk of a tree (the record, removal) would
# otherwise have to survive thousands
MAX_DEPTH = 256
PASS_ON = 256 << 10  # checked bytes gathered before they are written to tar in one call


@dataclass(frozen=True)
class Extracted:
    """What ``extract_tarball`` produced."""

    root: Path  # a directory inside `staging` whose contents are exactly the package prefix
    build_prefix: str  # absolute build-time prefix, e.g. "/tmp/lm/opt/spack/linux-x86_64/x-1.0-h"
    buildinfo: BuildInfo  # its .spack/binary_distribution
    files: int  # regular files written (hard links not counted)
    bytes: int  # bytes written
    # path below the prefix of each file (and hard link) -> its size and sha256 as extracted
    contents: dict[str, tuple[int, str]] = field(default_factory=dict, repr=False)
    # paths below the prefix of the executable files that start with "#!" (sbang's candidates)
    scripts: list[str] = field(default_factory=list, repr=False)


# ---------------------------------------------------------------------------------------------
# Names


def _check_name(name: str, limits: Limits, subject: str = "") -> None:
    """Refuse a member (or hard link target) name that could leave ``staging/raw``."""

    def refuse(reason: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(
            f"{subject or f'tarball member {show(name)}'} {reason}; refused")

    if "\0" in name:
        raise refuse("contains a NUL byte")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > limits.max_name_length:
        raise refuse(f"is longer than {limits.max_name_length} bytes")
    if name.startswith("/"):
        raise refuse("is an absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise refuse("has a '..' component")
    if "" in parts or "." in parts:
        raise refuse("has an empty or '.' component")
    if len(parts) > MAX_DEPTH:
        raise refuse(f"is nested more than {MAX_DEPTH} directories deep")
    if size > MAX_COMPONENT and any(  # a name that short has no long component
            len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT for part in parts):
        raise refuse(f"has a component longer than {MAX_COMPONENT} bytes")


def _inside(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _is_buildinfo(name: str) -> bool:
    return name == BUILDINFO or name.endswith("/" + BUILDINFO)


# ---------------------------------------------------------------------------------------------
# Checking (tar writes what passes)


class _Checker:
    """Checks each member before GNU tar is given it, and remembers what tar should make.

    Safety without looking at the file system: a member is passed on only when its parent is
    a directory of this archive (``dirs``), so no path tar uses can pass through a symlink of
    the archive; names are never reused. Regular files are hashed as they stream past, so
    the store's record does not read them again.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.dirs: dict[str, int] = {}  # every directory tar makes -> its mode from the tarball
        self.dir_members: set[str] = set()
        self.leaves: dict[str, str] = {}  # every other name -> "file" or "symlink"
        self.leaf_parents: dict[str, str] = {}  # dir holding non-dirs -> first such member
        self.updirs: list[tuple[str, str]] = []  # relative symlinks with '..': (name, target)
        self.contents: dict[str, tuple[int, str]] = {}  # file (or hard link) -> size, sha256
        self.odd_modes: list[tuple[str, int]] = []  # files tar cannot give our mode alone
        self.scripts: list[str] = []  # executable files starting with "#!" (for sbang)
        self.buildinfo: str | None = None
        self.buildinfo_data = b""
        self.files = 0
        self.bytes = 0

    def add(self, member: Member, src: Source, pass_on: Callable[[], None]) -> None:
        """Check one member; a file's data is read (and hashed) here, calling ``pass_on``
        as it goes. UnsafeArchiveError if refused."""
        _check_name(member.name, self.limits)
        if member.name in self.leaves or (member.kind != "dir" and member.name in self.dirs):
            raise unsafe(member.name, "is a duplicate of an earlier member")
        parent = self._check_parent(member.name)
        if member.kind == "dir":
            self.dirs[member.name] = member.mode
            self.dir_members.add(member.name)
            return
        self.leaf_parents.setdefault(parent, member.name)
        if member.kind == "file":
            self._add_file(member, src, pass_on)
        elif member.kind == "symlink":
            self._add_symlink(member)
        else:
            self._add_hardlink(member)

    def _check_parent(self, name: str) -> str:
        """The parent of ``name``; missing ones will be made by tar (recorded here)."""
        parent = name.rpartition("/")[0]
        if not parent or parent in self.dirs:
            return parent
        parts = parent.split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path in self.dirs:
                continue
            kind = self.leaves.get(path)
            if kind == "symlink":
                raise unsafe(name, f"would be written through the symlink {path!r}")
            if kind is not None:
                raise unsafe(name, f"has a parent {path!r} that is not a directory")
            self.dirs[path] = 0o755
        return parent

    def _add_file(self, member: Member, src: Source, pass_on: Callable[[], None]) -> None:
        if self.bytes + member.size > self.limits.max_bytes:
            raise unsafe(
                member.name,
                f"would expand the package beyond {self.limits.max_bytes} bytes",
            )
        if self.limits.room is not None and self.bytes + member.size > self.limits.room:
            raise StoreFull(f"does not fit in the store quota: its files pass "
                            f"the {self.limits.room} bytes the quota can hold beside the "
                            "packages in use")
        buildinfo = _is_buildinfo(member.name)
        # one byte past the limit is enough for parse_buildinfo to refuse an oversized one
        keep = MAX_BUILDINFO_BYTES + 1 if buildinfo else 0
        digest, data, head = _stream(src, member.size, pass_on, keep,
                                     f"tarball is truncated (in {show(member.name)})")
        self.leaves[member.name] = "file"
        self.contents[member.name] = (member.size, digest)
        if head == b"#!" and member.mode & 0o111:
            self.scripts.append(member.name)
        if member.mode & 0o7777 != (member.mode & 0o755) | 0o400:
            self.odd_modes.append((member.name, member.mode))
        self.files += 1
        self.bytes += member.size
        if buildinfo and (self.buildinfo is None or len(member.name) < len(self.buildinfo)):
            self.buildinfo = member.name
            self.buildinfo_data = data

    def _add_symlink(self, member: Member) -> None:
        target = member.linkname
        if not target or "\0" in target or len(target) > self.limits.max_name_length:
            raise unsafe(member.name, "is a symlink with an empty, NUL or overlong target")
        self.leaves[member.name] = "symlink"
        # absolute targets are legitimate (other prefixes, the system); relative ones with
        # '..' are checked against the prefix once it is known
        if not target.startswith("/") and ".." in target.split("/"):
            self.updirs.append((member.name, target))

    def _add_hardlink(self, member: Member) -> None:
        target = member.linkname
        subject = f"tarball member {show(member.name)}: hard link target {show(target)}"
        _check_name(target, self.limits, subject)
        if self.leaves.get(target) != "file":
            raise unsafe(
                member.name,
                f"is a hard link to {show(target)}, which is not an earlier regular file",
            )
        self.leaves[member.name] = "file"
        self.contents[member.name] = self.contents[target]

    def prefix(self) -> str:
        """The package prefix (a member name), after checking every member lies inside it.

        FormatError if there is no binary_distribution or no prefix directory;
        UnsafeArchiveError for a member outside it or a symlink climbing out of it.
        """
        if self.buildinfo is None:
            raise FormatError(f"not a Spack package (no {BUILDINFO} in the tarball)")
        prefix = self.buildinfo.rsplit("/", 2)[0] if self.buildinfo != BUILDINFO else ""
        if prefix not in self.dir_members:
            raise FormatError(
                f"tarball lacks the package prefix directory {show(prefix)}"
            )
        for name in sorted(self.dir_members):
            if not (_inside(name, prefix) or prefix.startswith(name + "/")):
                raise unsafe(name, f"lies outside the package prefix {prefix!r}")
        for parent, name in self.leaf_parents.items():
            if not _inside(parent, prefix):
                raise unsafe(name, f"lies outside the package prefix {prefix!r}")
        for name, target in self.updirs:
            if climbs_out(name, target, prefix):
                raise unsafe(name, f"is a symlink to {target!r}, which climbs out of the prefix")
        return prefix

    def compare(self, raw: Path) -> None:
        """UnsafeArchiveError unless tar made exactly the names and kinds that were checked
        (a reader that parsed the stream differently would make others). Directories get
        their owner's rwx on the way: tar gave them their mode from the tarball (0555,
        even 0000), which would keep the daemon's user out of them (``finish`` sets the
        modes kept)."""
        made = dict(_kinds(str(raw), unlock=True))
        expected = {**dict.fromkeys(self.dirs, "dir"), **self.leaves}
        if made != expected:
            odd = sorted(set(made.items()) ^ set(expected.items()))[0][0]
            raise UnsafeArchiveError(f"GNU tar read the tarball differently from "
                                     f"the checks (at {show(odd)}); refused")

    def finish(self, raw: Path) -> None:
        """Give files and directories their modes (owner keeps rwx on directories, others
        never write; no setuid), and directories mtime 0, now the tree is complete."""
        for name, mode in self.odd_modes:
            os.chmod(f"{raw}/{name}", (mode & 0o755) | 0o400)
        for name, mode in self.dirs.items():
            os.chmod(f"{raw}/{name}", (mode & 0o755) | 0o700)
            os.utime(f"{raw}/{name}", (0, 0))


MemberChecks = _Checker  # publish/describe.py walks a tarball with the same checks


def _kinds(top: str, unlock: bool = False) -> Iterator[tuple[str, str]]:
    """(relative path, kind) of every entry below ``top``, never following a link. Not
    recursive: a hostile archive may nest thousands of directories. ``unlock``: give each
    directory its owner's rwx before entering it (the path to it holds no link: only
    directories are entered, and no one else writes in staging)."""
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(f"{top}/{relative}" if relative else top) as listing:
            for entry in listing:
                path = f"{relative}{entry.name}"
                if entry.is_symlink():
                    yield path, "symlink"
                elif entry.is_dir(follow_symlinks=False):
                    mode = entry.stat(follow_symlinks=False).st_mode
                    if unlock and mode & 0o700 != 0o700:
                        os.chmod(entry.path, stat.S_IMODE(mode) | 0o700)
                    pending.append(f"{path}/")
                    yield path, "dir"
                elif entry.is_file(follow_symlinks=False):
                    yield path, "file"
                else:
                    yield path, "other"


def _stream(src: Source, size: int, pass_on: Callable[[], None], keep: int, truncated: str
            ) -> tuple[str, bytes, bytes]:
    """Read ``size`` bytes of member data, hashing them and keeping the first ``keep``.
    Returns the sha256, the kept bytes and the first two bytes.

    FormatError(``truncated``) if the stream ends first.
    """
    digest = hashlib.sha256()
    kept = []
    head = b""
    left = size
    while left:
        view = src.read(min(left, CHUNK))
        if not view:
            raise FormatError(truncated)
        left -= len(view)
        digest.update(view)
        if len(head) < 2:  # a read may end anywhere, even after one byte
            head += view[:2 - len(head)].tobytes()
        if keep:
            kept.append(view[:keep].tobytes())
            keep -= len(kept[-1])
        if src.kept_bytes >= PASS_ON:
            pass_on()
    return digest.hexdigest(), b"".join(kept), head


def _store_error(exc: OSError, name: str) -> LazymountError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"no space left on the store's file system while writing "
                         f"{show(name)}")
    if exc.errno == errno.ENAMETOOLONG:
        return unsafe(name, "makes a path too long for the store's file system")
    return StoreError(f"cannot write {show(name)} to the store ({exc.strerror})")


def extract_tarball(
    stream: BinaryIO,
    compression: str,
    staging: Path,
    limits: Limits = Limits(),  # noqa: B008 (frozen, so a shared default is safe)
    what: str = "package",
) -> Extracted:
    """Extract a Spack install tarball in one streaming pass.

    ``stream``: readable binary file object at the start of the stored (compressed) blob; it is
    read to its end and not closed. ``compression``: "gzip", "zstd" or "none". ``staging``: an
    existing empty directory on the store's file system; the tree goes to ``staging/raw/...``
    and ``Extracted.root`` is the package prefix inside it. ``what`` names the package in
    every message. Blocking: run it in a worker thread.

    Raises UnsafeArchiveError (a member escaping or breaking a limit, trailing data),
    FormatError (corrupt or truncated stream, not a Spack package, bad buildinfo) or
    StoreError (disk full, cannot write). On error ``staging`` may hold a partial tree: the
    caller removes it.
    """
    with about(what):
        chunks = read_ahead(decompressed(stream, compression))
        try:
            return _extract(Source(chunks), staging, limits, what)
        finally:
            chunks.close()


def _extract(src: Source, staging: Path, limits: Limits, what: str) -> Extracted:
    """The body of extract_tarball, on an already decompressing source."""
    raw = staging / "raw"
    checker = _Checker(limits)
    name = str(raw)
    try:
        os.mkdir(raw, 0o755)
        with TarChild(raw) as tar:

            def pass_on() -> None:
                tar.write(src.passed())

            for member in members(src, limits):
                name = member.name
                checker.add(member, src, pass_on)
                if src.kept_bytes >= PASS_ON:
                    pass_on()
            name = "(end of archive)"
            src.drain()
            pass_on()
            tar.finish()
        checker.compare(raw)
        prefix = checker.prefix()
        buildinfo = parse_buildinfo(checker.buildinfo_data, what)
        check_build_prefix(buildinfo, "/" + prefix, what)
        checker.finish(raw)
    except OSError as exc:
        raise _store_error(exc, name) from None
    inside = len(prefix) + 1 if prefix else 0
    contents = {n[inside:]: c for n, c in checker.contents.items() if _inside(n, prefix)}
    scripts = [n[inside:] for n in checker.scripts if _inside(n, prefix)]
    return Extracted(raw / prefix, "/" + prefix, buildinfo, checker.files, checker.bytes,
                     contents, scripts)
