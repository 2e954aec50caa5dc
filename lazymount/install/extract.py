"""Safe, streaming extraction of a Spack install tarball (SPACK-FORMAT.md section 4).

The blob is read once, front to back: it is decompressed in bounded chunks (``decompress``)
and its tar headers are parsed by ``tarstream`` (not by ``tarfile.TarFile``, whose stream mode
reads any extended header whole into memory, however large it claims to be). Every member is
written under ``staging/raw/<member name>``, never following a symlink. The package prefix is
known only at the end (``.spack/binary_distribution`` is the last member); then every member is
checked to lie inside it. Nothing is ever written outside ``staging``.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lazymount.errors import (
    FormatError,
    LazymountError,
    StoreError,
    StoreFull,
    UnsafeArchiveError,
)
from lazymount.install.buildinfo import BUILDINFO, MAX_BUILDINFO_BYTES
from lazymount.install.buildinfo import check_build_prefix as check_build_prefix  # re-exported
from lazymount.install.buildinfo import parse_buildinfo as parse_buildinfo  # re-exported
from lazymount.install.decompress import CHUNK, decompressed, read_ahead
from lazymount.install.tarstream import Limits as Limits  # re-exported
from lazymount.install.tarstream import Member, Source, members, show, unsafe

MAX_COMPONENT = 255  # NAME_MAX of Linux file systems

_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Extracted:
    """What ``extract_tarball`` produced."""

    root: Path  # a directory inside `staging` whose contents are exactly the package prefix
    build_prefix: str  # absolute build-time prefix, e.g. "/tmp/lm/opt/spack/linux-x86_64/x-1.0-h"
    buildinfo: dict[str, Any]  # parsed and validated .spack/binary_distribution
    files: int  # regular files written (hard links not counted)
    bytes: int  # bytes written


# ---------------------------------------------------------------------------------------------
# Names


def _check_name(name: str, limits: Limits, what: str, subject: str = "") -> None:
    """Refuse a member (or hard link target) name that could leave ``staging/raw``."""

    def refuse(reason: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(
            f"{what}: {subject or f'tarball member {show(name)}'} {reason}; refused")

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
    if size > MAX_COMPONENT and any(  # a name that short has no long component
            len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT for part in parts):
        raise refuse(f"has a component longer than {MAX_COMPONENT} bytes")


def _inside(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _is_buildinfo(name: str) -> bool:
    return name == BUILDINFO or name.endswith("/" + BUILDINFO)


def _climbs_out(link: str, target: str, prefix: str) -> bool:
    """True if the relative ``target`` of symlink ``link`` ever steps above ``prefix``."""
    depth = link.count("/") - prefix.count("/") - 1  # the link's directory, below prefix
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


# ---------------------------------------------------------------------------------------------
# Writing


class _Writer:
    """Creates members under ``raw``; remembers just enough to check them at the end.

    Safety without following symlinks: a member is created only when its parent is a
    directory this writer made (``dirs``), so no path it uses can pass through a symlink; the
    last component is never followed either (O_NOFOLLOW|O_EXCL, mkdir, symlink, link).
    """

    def __init__(self, raw: Path, limits: Limits, what: str) -> None:
        self.raw = str(raw)
        self.limits = limits
        self.what = what
        self.dirs: dict[str, int] = {}  # every directory made -> its mode from the tarball
        self.dir_members: set[str] = set()
        self.leaf_parents: dict[str, str] = {}  # dir holding non-dirs -> first such member
        self.updirs: list[tuple[str, str]] = []  # relative symlinks with '..': (name, target)
        self.buildinfo: str | None = None
        self.files = 0
        self.bytes = 0

    def _path(self, name: str) -> str:
        return f"{self.raw}/{name}"

    def add(self, member: Member, src: Source) -> None:
        """Create one member. UnsafeArchiveError if refused; OSError from the file system."""
        _check_name(member.name, self.limits, self.what)
        parent = self._ensure_parent(member.name)
        if member.kind == "dir":
            self._add_dir(member)
            return
        self.leaf_parents.setdefault(parent, member.name)
        if member.kind == "file":
            self._add_file(member, src)
        elif member.kind == "symlink":
            self._add_symlink(member)
        else:
            self._add_hardlink(member)

    def _ensure_parent(self, name: str) -> str:
        """The parent of ``name``, checked to be a real directory; missing ones are made (as
        tar does)."""
        parent = name.rpartition("/")[0]
        if not parent or parent in self.dirs:
            return parent
        parts = parent.split("/")
        for i in range(1, len(parts) + 1):  # top down: each lstat sees only real directories
            path = "/".join(parts[:i])
            if path in self.dirs:
                continue
            try:
                mode = os.lstat(self._path(path)).st_mode
            except FileNotFoundError:
                os.mkdir(self._path(path), 0o700)
                self.dirs[path] = 0o755
                continue
            if stat.S_ISLNK(mode):
                raise unsafe(self.what, name, f"would be written through the symlink {path!r}")
            raise unsafe(self.what, name, f"has a parent {path!r} that is not a directory")
        return parent

    def _duplicate(self, member: Member) -> UnsafeArchiveError:
        return unsafe(self.what, member.name, "is a duplicate of an earlier member")

    def _add_dir(self, member: Member) -> None:
        if member.name not in self.dirs:  # a directory listed twice is harmless
            try:
                os.mkdir(self._path(member.name), 0o700)  # owner rwx until finish()
            except FileExistsError:
                raise self._duplicate(member) from None
        self.dirs[member.name] = member.mode
        self.dir_members.add(member.name)

    def _add_file(self, member: Member, src: Source) -> None:
        if self.bytes + member.size > self.limits.max_bytes:
            raise unsafe(
                self.what,
                member.name,
                f"would expand the package beyond {self.limits.max_bytes} bytes",
            )
        if self.limits.room is not None and self.bytes + member.size > self.limits.room:
            raise StoreFull(f"{self.what}: does not fit in the store quota: its files pass "
                            f"the {self.limits.room} bytes the quota can hold beside the "
                            "packages in use")
        try:
            fd = os.open(self._path(member.name), _OPEN_NEW, 0o600)
        except FileExistsError:
            raise self._duplicate(member) from None
        try:
            _copy(
                src, fd, member.size, f"{self.what}: tarball is truncated (in {show(member.name)})"
            )
            # no setuid/setgid/sticky, and no one but the store's owner may change it
            os.fchmod(fd, (member.mode & 0o755) | 0o400)
            os.utime(fd, (0, 0))  # like Spack: mtimes stay 0
        finally:
            os.close(fd)
        self.files += 1
        self.bytes += member.size
        if _is_buildinfo(member.name) and (
            self.buildinfo is None or len(member.name) < len(self.buildinfo)
        ):
            self.buildinfo = member.name

    def _add_symlink(self, member: Member) -> None:
        target = member.linkname
        if not target or "\0" in target or len(target) > self.limits.max_name_length:
            raise unsafe(
                self.what, member.name, "is a symlink with an empty, NUL or overlong target"
            )
        try:
            os.symlink(target, self._path(member.name))
        except FileExistsError:
            raise self._duplicate(member) from None
        os.utime(self._path(member.name), (0, 0), follow_symlinks=False)
        # absolute targets are legitimate (other prefixes, the system); relative ones with
        # '..' are checked against the prefix once it is known
        if not target.startswith("/") and ".." in target.split("/"):
            self.updirs.append((member.name, target))

    def _add_hardlink(self, member: Member) -> None:
        target = member.linkname
        subject = f"tarball member {show(member.name)}: hard link target {show(target)}"
        _check_name(target, self.limits, self.what, subject)
        parent = target.rpartition("/")[0]
        mode = None
        if not parent or parent in self.dirs:  # else the lstat could pass through a symlink
            try:
                mode = os.lstat(self._path(target)).st_mode
            except FileNotFoundError:
                pass
        if mode is None or not stat.S_ISREG(mode):
            raise unsafe(
                self.what,
                member.name,
                f"is a hard link to {show(target)}, which is not an earlier regular file",
            )
        try:
            os.link(self._path(target), self._path(member.name), follow_symlinks=False)
        except FileExistsError:
            raise self._duplicate(member) from None

    def prefix(self) -> str:
        """The package prefix (a member name), after checking every member lies inside it.

        FormatError if there is no binary_distribution or no prefix directory;
        UnsafeArchiveError for a member outside it or a symlink climbing out of it.
        """
        if self.buildinfo is None:
            raise FormatError(f"{self.what}: not a Spack package (no {BUILDINFO} in the tarball)")
        prefix = self.buildinfo.rsplit("/", 2)[0] if self.buildinfo != BUILDINFO else ""
        if prefix not in self.dir_members:
            raise FormatError(
                f"{self.what}: tarball lacks the package prefix directory {show(prefix)}"
            )
        for name in sorted(self.dir_members):
            if not (_inside(name, prefix) or prefix.startswith(name + "/")):
                raise unsafe(self.what, name, f"lies outside the package prefix {prefix!r}")
        for parent, name in self.leaf_parents.items():
            if not _inside(parent, prefix):
                raise unsafe(self.what, name, f"lies outside the package prefix {prefix!r}")
        for name, target in self.updirs:
            if _climbs_out(name, target, prefix):
                raise unsafe(
                    self.what, name, f"is a symlink to {target!r}, which climbs out of the prefix"
                )
        return prefix

    def read_buildinfo(self) -> bytes:
        assert self.buildinfo is not None
        fd = os.open(self._path(self.buildinfo), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            return file.read(MAX_BUILDINFO_BYTES + 1)

    def finish(self) -> None:
        """Give directories their modes (owner keeps rwx) and mtime 0, now they are complete."""
        for name, mode in self.dirs.items():
            os.chmod(self._path(name), (mode & 0o755) | 0o700)  # others never write
            os.utime(self._path(name), (0, 0))


def _copy(src: Source, fd: int, size: int, truncated: str) -> None:
    """Copy ``size`` bytes of member data from the stream to ``fd``, in chunks.

    FormatError(``truncated``) if the stream ends first; OSError from writing.
    """
    left = size
    while left:
        view = src.read(min(left, CHUNK))
        if not view:
            raise FormatError(truncated)
        left -= len(view)
        while view:
            view = view[os.write(fd, view) :]


def _store_error(exc: OSError, what: str, name: str) -> LazymountError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"{what}: no space left on the store's file system while writing "
                         f"{show(name)}")
    if exc.errno == errno.ENAMETOOLONG:
        return unsafe(what, name, "makes a path too long for the store's file system")
    return StoreError(f"{what}: cannot write {show(name)} to the store ({exc.strerror})")


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
    chunks = read_ahead(decompressed(stream, compression, what))
    try:
        return _extract(Source(chunks, what), staging, limits, what)
    finally:
        chunks.close()


def _extract(src: Source, staging: Path, limits: Limits, what: str) -> Extracted:
    """The body of extract_tarball, on an already decompressing source."""
    raw = staging / "raw"
    writer = _Writer(raw, limits, what)
    name = str(raw)
    try:
        os.mkdir(raw, 0o755)
        for member in members(src, limits, what):
            name = member.name
            writer.add(member, src)
        name = "(end of archive)"
        src.drain()
        prefix = writer.prefix()
        buildinfo = parse_buildinfo(writer.read_buildinfo(), what)
        check_build_prefix(buildinfo, "/" + prefix, what)
        writer.finish()
    except OSError as exc:
        raise _store_error(exc, what, name) from None
    return Extracted(raw / prefix, "/" + prefix, buildinfo, writer.files, writer.bytes)
