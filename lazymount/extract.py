"""Safe, streaming extraction of a Spack install tarball (SPACK-FORMAT.md section 4).

The blob is read once, front to back: it is decompressed in bounded chunks and its tar
headers are parsed here (not by ``tarfile.TarFile``, whose stream mode reads any extended
header whole into memory, however large it claims to be). Every member is written under
``staging/raw/<member name>``, never following a symlink. The package prefix is known only at
the end (``.spack/binary_distribution`` is the last member); then every member is checked to
lie inside it. Nothing is ever written outside ``staging``.
"""

from __future__ import annotations

import errno
import os
import posixpath
import queue
import stat
import tarfile
import threading
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import yaml
import zstandard

from .errors import FormatError, LazymountError, StoreError, UnsafeArchiveError

CHUNK = 1 << 20  # compressed reads, decompressed chunks and file copies
BLOCK = tarfile.BLOCKSIZE
ZERO_BLOCK = bytes(BLOCK)
BUILDINFO = ".spack/binary_distribution"
MAX_BUILDINFO_BYTES = 1 << 20
MAX_EXTENDED_HEADER = 1 << 20  # one pax / GNU long-name body; real ones are < 1 KiB
MAX_EXTENDED_RUN = 4  # local pax + global pax + GNU long name + long link before one member
MAX_TRAILING_ZEROS = 16 << 20  # tar pads to its record size (10 KiB for Python and GNU tar)
MAX_COMPONENT = 255  # NAME_MAX of Linux file systems

_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)
_GNU_LONG_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_EXTENDED_TYPES = (*_PAX_TYPES, tarfile.XGLTYPE, *_GNU_LONG_TYPES)
_REFUSED_TYPES = {
    tarfile.CHRTYPE: "a character device node",
    tarfile.BLKTYPE: "a block device node",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Limits:
    """Bounds that make a decompression bomb or a hostile archive fail early."""

    max_bytes: int = 64 * 2**30  # total expanded bytes of regular files
    max_members: int = 2_000_000
    max_name_length: int = 4096


@dataclass(frozen=True)
class Extracted:
    """What ``extract_tarball`` produced."""

    root: Path  # a directory inside `staging` whose contents are exactly the package prefix
    build_prefix: str  # absolute build-time prefix, e.g. "/tmp/lm/opt/spack/linux-x86_64/x-1.0-h"
    buildinfo: dict[str, Any]  # parsed and validated .spack/binary_distribution
    files: int  # regular files written (hard links not counted)
    bytes: int  # bytes written


# ---------------------------------------------------------------------------------------------
# Decompression: generators of decompressed chunks (each at most CHUNK bytes, never empty)


class _Fault(Exception):
    """The compressed stream is broken; ``kind`` is "truncated", "corrupt" or "trailing"."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


def _decompressed(stream: BinaryIO, compression: str, what: str) -> Iterator[bytes]:
    """Chunks of the decompressed blob. Raises FormatError at once for an unknown codec."""
    if compression == "gzip":
        return _gunzip(stream)
    if compression == "zstd":
        return _unzstd(stream)
    if compression == "none":
        return iter(lambda: stream.read(CHUNK), b"")
    raise FormatError(f"{what}: unknown tarball compression {compression!r}")


_END = object()


def _read_ahead(chunks: Iterator[bytes], depth: int = 8) -> Generator[bytes, None, None]:
    """Run ``chunks`` in a thread of its own, up to ``depth`` chunks ahead of the consumer.

    zlib and zstd release the GIL while they work, so decompression overlaps the tar parsing
    and file writes of the extracting thread. Errors of the producer are raised here, in order.
    The caller must close() this generator, which stops and joins the producer.
    """
    ahead: queue.Queue[object] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not put(chunk):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    producer = threading.Thread(target=produce, name="decompress", daemon=True)
    producer.start()
    try:
        while True:
            item = ahead.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        producer.join()


def _gunzip(stream: BinaryIO) -> Iterator[bytes]:
    """Inflate gzip members (RFC 1952 allows several in a row); anything else after is refused.

    ``max_length`` bounds every output chunk, so a bomb never sits in memory.
    """
    data = b""
    while True:
        inflater = zlib.decompressobj(wbits=31)
        while not inflater.eof:
            if not data:
                data = stream.read(CHUNK)
            if not data:  # input ended: flush what zlib holds, then it must be complete
                tail = inflater.flush()
                if not inflater.eof:
                    raise _Fault("gzip stream is truncated", "truncated")
                if tail:
                    yield tail
                break
            try:
                out = inflater.decompress(data, CHUNK)
            except zlib.error as exc:
                raise _Fault(f"corrupt gzip stream ({exc})", "corrupt") from None
            data = inflater.unconsumed_tail
            if out:
                yield out
        data = inflater.unused_data or stream.read(CHUNK)
        if len(data) == 1:  # the next member's magic may straddle two reads
            data += stream.read(CHUNK)
        if not data:
            return
        if not data.startswith(b"\x1f\x8b"):
            raise _Fault("trailing data after the end of the gzip stream", "trailing")


def _unzstd(stream: BinaryIO) -> Iterator[bytes]:
    """Decompress zstd frames (several in a row are fine), bounded by ``read(CHUNK)``."""
    frames = _ZstdFrames(stream)
    reader = zstandard.ZstdDecompressor().stream_reader(
        frames,  # type: ignore[arg-type]  # only read() is used
        read_across_frames=True,
        closefd=False,
    )
    try:
        while chunk := reader.read(CHUNK):
            yield chunk
    except zstandard.ZstdError as exc:  # garbage after a frame also lands here
        raise frames.explain(exc) from None
    if frames.fault:
        raise frames.fault


_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50  # the low 4 bits are free
_FCS_SIZES = (0, 2, 4, 8)  # by Frame_Content_Size_flag (0 means 1 byte if single segment)
_DICT_ID_SIZES = (0, 1, 2, 4)


class _ZstdFrames:
    """The compressed stream, passed to python-zstandard unchanged while its frame and block
    headers are walked (RFC 8878: a few bytes per block of at most 128 KiB).

    python-zstandard reports neither a frame cut short nor garbage after the last frame
    reliably; this walk finds both and records them in ``fault``.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._state = "magic"
        self._want = 4  # header bytes the current state needs
        self._head = b""  # header bytes collected so far
        self._skip = 0  # payload bytes to pass over
        self._checksum = False
        self._frames = 0
        self.fault: _Fault | None = None

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if self.fault is None:
            if data:
                self._walk(data)
            elif self._state != "magic" or self._skip or not self._frames:
                self.fault = _Fault("zstd stream is truncated", "truncated")
            elif self._head:  # a few stray bytes after the last frame
                self.fault = self._trailing()
        return data

    def explain(self, exc: zstandard.ZstdError) -> _Fault:
        """The fault behind a decoding error (libzstd may fail before this walk sees why)."""
        if self.fault:
            return self.fault
        if self._state == "magic" and self._frames and self._head:
            return self._trailing()
        return _Fault(f"bad zstd stream ({exc})", "corrupt")

    def _trailing(self) -> _Fault:
        return _Fault("trailing data after the end of the zstd stream", "trailing")

    def _walk(self, data: bytes) -> None:
        pos = 0
        while pos < len(data) and self.fault is None:
            if self._skip:
                step = min(self._skip, len(data) - pos)
                self._skip -= step
                pos += step
                continue
            take = self._want - len(self._head)
            self._head += data[pos : pos + take]
            pos += take
            if len(self._head) == self._want:
                head, self._head = self._head, b""
                self._advance(head)

    def _advance(self, head: bytes) -> None:
        value = int.from_bytes(head, "little")
        if self._state == "magic":
            if value == _ZSTD_MAGIC:
                self._state, self._want = "descriptor", 1
            elif value & ~0xF == _ZSTD_SKIPPABLE:
                self._state, self._want = "skippable", 4
            elif self._frames:
                self.fault = self._trailing()
            else:
                self.fault = _Fault("bad zstd stream (no zstd frame)", "corrupt")
        elif self._state == "descriptor":
            if value & 0x08:
                self.fault = _Fault("bad zstd stream (reserved bit set)", "corrupt")
            single_segment = value >> 5 & 1
            self._checksum = bool(value & 0x04)
            self._skip = (
                (1 - single_segment)  # Window_Descriptor
                + _DICT_ID_SIZES[value & 3]
                + (_FCS_SIZES[value >> 6] or single_segment)
            )
            self._state, self._want = "block", 3
        elif self._state == "block":
            block_type = value >> 1 & 3
            if block_type == 3:
                self.fault = _Fault("bad zstd stream (reserved block type)", "corrupt")
            self._skip = 1 if block_type == 1 else value >> 3  # RLE blocks store one byte
            if value & 1:  # last block of the frame
                self._frames += 1
                self._skip += 4 if self._checksum else 0
                self._state, self._want = "magic", 4
        else:  # skippable frame: its length, then that many bytes
            self._skip = value
            self._state, self._want = "magic", 4


class _Source:
    """The decompressed tar stream, read forward once. Raises only LazymountError."""

    def __init__(self, chunks: Iterator[bytes], what: str) -> None:
        self._chunks = chunks
        self._what = what
        self._buf = memoryview(b"")

    def _refill(self) -> bool:
        try:
            chunk = next(self._chunks, b"")
        except _Fault as fault:
            if fault.kind == "trailing":  # bytes outside what was checked: refuse, not ignore
                raise UnsafeArchiveError(f"{self._what}: {fault.reason}") from None
            raise FormatError(f"{self._what}: {fault.reason}") from None
        except OSError as exc:
            raise StoreError(f"{self._what}: cannot read the tarball ({exc})") from None
        self._buf = memoryview(chunk)
        return bool(chunk)

    def read(self, n: int) -> memoryview:
        """Up to ``n`` bytes (a view, valid until the next call); empty only at the end."""
        if not self._buf and not self._refill():
            return self._buf
        view, self._buf = self._buf[:n], self._buf[n:]
        return view

    def read_exact(self, n: int, inside: str) -> bytes:
        """Exactly ``n`` bytes, or FormatError saying the archive ends inside ``inside``."""
        parts = []
        while n:
            view = self.read(n)
            if not view:
                raise FormatError(f"{self._what}: tarball is truncated (ends inside {inside})")
            parts.append(view)
            n -= len(view)
        return b"".join(parts)

    def drain(self) -> None:
        """Read past the end-of-archive block: only zero padding may follow, then the end."""
        seen = 0
        while view := self.read(CHUNK):
            seen += len(view)
            if seen > MAX_TRAILING_ZEROS or view.tobytes().count(0) != len(view):
                raise UnsafeArchiveError(
                    f"{self._what}: trailing data after the end of the tar archive"
                )


# ---------------------------------------------------------------------------------------------
# Tar headers


@dataclass
class _Member:
    name: str
    kind: str  # "file", "dir", "symlink" or "hardlink"
    mode: int
    size: int
    linkname: str


def _show(name: str) -> str:
    """A member name fit for a one-line message."""
    return repr(name if len(name) <= 160 else name[:160] + "...")


def _unsafe(what: str, name: str, reason: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{what}: tarball member {_show(name)} {reason}; refused")


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _parse_pax(body: bytes, what: str) -> dict[str, str]:
    """The ``"<length> <key>=<value>\\n"`` records of a pax extended header."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:  # tolerate NUL padding at the end
        space = body.find(b" ", pos)
        digits = body[pos:space] if space > 0 else b""
        end = pos + int(digits) if digits.isdigit() else -1
        if end <= space + 1 or end > len(body) or body[end - 1] != 0x0A:
            raise FormatError(f"{what}: malformed pax extended header")
        key, equals, value = body[space + 1 : end - 1].partition(b"=")
        if not equals:
            raise FormatError(f"{what}: malformed pax extended header")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _member_kind(info: tarfile.TarInfo, name: str, what: str) -> str:
    if info.type in _FILE_TYPES:
        return "file"
    kind = {
        tarfile.DIRTYPE: "dir",
        tarfile.SYMTYPE: "symlink",
        tarfile.LNKTYPE: "hardlink",
    }.get(info.type)
    if kind is None:
        reason = _REFUSED_TYPES.get(info.type, f"of unsupported type {info.type!r}")
        raise _unsafe(what, name, f"is {reason}")
    return kind


class _Overrides:
    """Extended headers (pax, GNU long name/link) waiting for the member they describe."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.pax: dict[str, str] = {}
        self.longname: str | None = None
        self.longlink: str | None = None
        self.run = 0
        self.total = 0

    def take(self, info: tarfile.TarInfo, src: _Source, limits: Limits) -> None:
        """Read the body of the extended header ``info`` and remember what it sets."""
        self.run += 1
        self.total += info.size
        if self.run > MAX_EXTENDED_RUN or info.size > MAX_EXTENDED_HEADER:
            raise UnsafeArchiveError(f"{self.what}: oversized or repeated tar extended headers")
        if self.total > limits.max_bytes:
            raise UnsafeArchiveError(f"{self.what}: tar extended headers exceed the size limit")
        body = src.read_exact(_padded(info.size), "a tar extended header")[: info.size]
        if info.type in _PAX_TYPES:
            self.pax.update(_parse_pax(body, self.what))
        elif info.type == tarfile.XGLTYPE:
            self._check_global(_parse_pax(body, self.what))
        else:  # GNU: the body is a NUL-terminated name
            text = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if info.type == tarfile.GNUTYPE_LONGNAME:
                self.longname = text
            else:
                self.longlink = text

    def _check_global(self, records: dict[str, str]) -> None:
        # a global path/size would apply to every later member: nobody writes that legitimately
        for key in ("path", "linkpath", "size"):
            if key in records:
                raise FormatError(f"{self.what}: a global pax header sets {key!r}; refused")

    def member(self, info: tarfile.TarInfo) -> _Member:
        """The member ``info`` describes, with the pending overrides applied (then cleared)."""
        pax = self.pax
        name = pax.get("path", self.longname if self.longname is not None else info.name)
        linkname = pax.get(
            "linkpath", self.longlink if self.longlink is not None else info.linkname
        )
        if any(key.startswith("GNU.sparse.") for key in pax):
            raise _unsafe(self.what, name, "is a sparse file")
        size = info.size
        if "size" in pax:
            if not (pax["size"].isascii() and pax["size"].isdigit()):
                raise FormatError(f"{self.what}: bad pax size for member {_show(name)}")
            size = int(pax["size"])
        self.pax, self.longname, self.longlink, self.run = {}, None, None, 0
        kind = _member_kind(info, name, self.what)
        if kind == "dir" and name != "/":
            name = name.rstrip("/")
        if kind != "file" and size:
            raise FormatError(f"{self.what}: {kind} member {_show(name)} carries data")
        return _Member(name, kind, info.mode, size, linkname)


def _members(src: _Source, limits: Limits, what: str) -> Iterator[_Member]:
    """Yield each member of the tar stream up to the end-of-archive block.

    The consumer must read a file member's ``size`` data bytes before asking for the next one.
    Raises FormatError for a malformed stream, UnsafeArchiveError past ``max_members``.
    """
    overrides = _Overrides(what)
    count = 0
    while True:
        header = src.read_exact(BLOCK, "a tar header")
        if header == ZERO_BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise FormatError(f"{what}: bad tar header ({exc})") from None
        if info.type in _EXTENDED_TYPES:
            overrides.take(info, src, limits)
            continue
        count += 1
        if count > limits.max_members:
            raise UnsafeArchiveError(f"{what}: tarball has more than {limits.max_members} members")
        member = overrides.member(info)
        yield member
        src.read_exact(_padded(member.size) - member.size, "a member's padding")


# ---------------------------------------------------------------------------------------------
# Names


def _check_name(name: str, limits: Limits, what: str, subject: str = "") -> None:
    """Refuse a member (or hard link target) name that could leave ``staging/raw``."""
    subject = subject or f"tarball member {_show(name)}"

    def refuse(reason: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"{what}: {subject} {reason}; refused")

    if "\0" in name:
        raise refuse("contains a NUL byte")
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_name_length:
        raise refuse(f"is longer than {limits.max_name_length} bytes")
    if name.startswith("/"):
        raise refuse("is an absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise refuse("has a '..' component")
    if "" in parts or "." in parts:
        raise refuse("has an empty or '.' component")
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT for part in parts):
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

    def add(self, member: _Member, src: _Source) -> None:
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
                raise _unsafe(self.what, name, f"would be written through the symlink {path!r}")
            raise _unsafe(self.what, name, f"has a parent {path!r} that is not a directory")
        return parent

    def _duplicate(self, member: _Member) -> UnsafeArchiveError:
        return _unsafe(self.what, member.name, "is a duplicate of an earlier member")

    def _add_dir(self, member: _Member) -> None:
        if member.name not in self.dirs:  # a directory listed twice is harmless
            try:
                os.mkdir(self._path(member.name), 0o700)  # owner rwx until finish()
            except FileExistsError:
                raise self._duplicate(member) from None
        self.dirs[member.name] = member.mode
        self.dir_members.add(member.name)

    def _add_file(self, member: _Member, src: _Source) -> None:
        if self.bytes + member.size > self.limits.max_bytes:
            raise _unsafe(
                self.what,
                member.name,
                f"would expand the package beyond {self.limits.max_bytes} bytes",
            )
        try:
            fd = os.open(self._path(member.name), _OPEN_NEW, 0o600)
        except FileExistsError:
            raise self._duplicate(member) from None
        try:
            _copy(
                src, fd, member.size, f"{self.what}: tarball is truncated (in {_show(member.name)})"
            )
            os.fchmod(fd, (member.mode & 0o777) | 0o400)  # no setuid/setgid/sticky
            os.utime(fd, (0, 0))  # like Spack: mtimes stay 0
        finally:
            os.close(fd)
        self.files += 1
        self.bytes += member.size
        if _is_buildinfo(member.name) and (
            self.buildinfo is None or len(member.name) < len(self.buildinfo)
        ):
            self.buildinfo = member.name

    def _add_symlink(self, member: _Member) -> None:
        target = member.linkname
        if not target or "\0" in target or len(target) > self.limits.max_name_length:
            raise _unsafe(
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

    def _add_hardlink(self, member: _Member) -> None:
        target = member.linkname
        subject = f"tarball member {_show(member.name)}: hard link target {_show(target)}"
        _check_name(target, self.limits, self.what, subject)
        parent = target.rpartition("/")[0]
        mode = None
        if not parent or parent in self.dirs:  # else the lstat could pass through a symlink
            try:
                mode = os.lstat(self._path(target)).st_mode
            except FileNotFoundError:
                pass
        if mode is None or not stat.S_ISREG(mode):
            raise _unsafe(
                self.what,
                member.name,
                f"is a hard link to {_show(target)}, which is not an earlier regular file",
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
                f"{self.what}: tarball lacks the package prefix directory {_show(prefix)}"
            )
        for name in sorted(self.dir_members):
            if not (_inside(name, prefix) or prefix.startswith(name + "/")):
                raise _unsafe(self.what, name, f"lies outside the package prefix {prefix!r}")
        for parent, name in self.leaf_parents.items():
            if not _inside(parent, prefix):
                raise _unsafe(self.what, name, f"lies outside the package prefix {prefix!r}")
        for name, target in self.updirs:
            if _climbs_out(name, target, prefix):
                raise _unsafe(
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
            os.chmod(self._path(name), (mode & 0o777) | 0o700)
            os.utime(self._path(name), (0, 0))


def _copy(src: _Source, fd: int, size: int, truncated: str) -> None:
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
        return StoreError(f"{what}: no space left on the store while writing {_show(name)}")
    if exc.errno == errno.ENAMETOOLONG:
        return _unsafe(what, name, "makes a path too long for the store's file system")
    return StoreError(f"{what}: cannot write {_show(name)} to the store ({exc.strerror})")


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
    chunks = _read_ahead(_decompressed(stream, compression, what))
    try:
        return _extract(_Source(chunks, what), staging, limits, what)
    finally:
        chunks.close()


def _extract(src: _Source, staging: Path, limits: Limits, what: str) -> Extracted:
    """The body of extract_tarball, on an already decompressing source."""
    raw = staging / "raw"
    writer = _Writer(raw, limits, what)
    name = str(raw)
    try:
        os.mkdir(raw, 0o755)
        for member in _members(src, limits, what):
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


# ---------------------------------------------------------------------------------------------
# .spack/binary_distribution

_LISTS = ("relocate_binaries", "relocate_links", "relocate_textfiles")


def parse_buildinfo(text: bytes, what: str) -> dict[str, Any]:
    """Parse and validate ``.spack/binary_distribution`` (a one-line YAML flow mapping).

    Returns ``sbang_install_path`` (str or None), ``buildpath`` (absolute str),
    ``relative_prefix`` (str, "" if absent), ``hash_to_prefix`` ({hash: absolute prefix}, from
    ``prefix_to_hash`` in old caches), the ``relocate_binaries``, ``relocate_links`` and
    ``relocate_textfiles`` lists of prefix-relative paths, and ``hardlinks_deduped`` (bool).
    Missing optional keys are empty. Raises FormatError naming ``what``. Pure; any thread.
    """
    if len(text) > MAX_BUILDINFO_BYTES:
        raise FormatError(f"{what}: {BUILDINFO} is larger than {MAX_BUILDINFO_BYTES} bytes")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())[:200]
        raise FormatError(f"{what}: {BUILDINFO} is not valid YAML ({reason})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: {BUILDINFO} is not a mapping")
    sbang = doc.get("sbang_install_path")
    relative_prefix = doc.get("relative_prefix") or ""
    deduped = doc.get("hardlinks_deduped")
    deduped = False if deduped is None else deduped
    if not isinstance(deduped, bool):
        raise FormatError(f"{what}: {BUILDINFO}: hardlinks_deduped is not a boolean")
    info: dict[str, Any] = {
        "sbang_install_path": None if sbang is None else _abs(sbang, "sbang_install_path", what),
        "buildpath": _abs(doc.get("buildpath"), "buildpath", what),
        "relative_prefix": relative_prefix and _rel(relative_prefix, "relative_prefix", what),
        "hash_to_prefix": _hash_to_prefix(doc, what),
        "hardlinks_deduped": deduped,
    }
    for key in _LISTS:
        entries = doc.get(key) or []
        if not isinstance(entries, list):
            raise FormatError(f"{what}: {BUILDINFO}: {key} is not a list")
        info[key] = [_rel(entry, key, what) for entry in entries]
    return info


def check_build_prefix(info: dict[str, Any], build_prefix: str, what: str) -> None:
    """Refuse a buildinfo whose install root cannot be the tarball's: relocation maps paths
    under ``buildpath`` and ``relative_prefix``, so they must describe where the members are.

    ``build_prefix``: the absolute prefix the tarball's members hold. Raises FormatError.
    """
    root = info["buildpath"].rstrip("/")
    if not root:  # "/" would make every absolute path of the package a build path
        raise FormatError(f"{what}: {BUILDINFO}: buildpath '/' is not a usable install root")
    claimed = posixpath.normpath(posixpath.join(root, info["relative_prefix"] or ""))
    if info["relative_prefix"] and claimed != posixpath.normpath(build_prefix):
        raise FormatError(f"{what}: {BUILDINFO} says the prefix is {claimed[:200]!r}, but the "
                          f"tarball holds {build_prefix[:200]!r}")


def _abs(value: object, key: str, what: str) -> str:
    """``value`` as an absolute, '..'-free path string, else FormatError."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise FormatError(f"{what}: {BUILDINFO}: {key} {value!r:.200} is not an absolute path")
    if ".." in value.split("/"):
        raise FormatError(f"{what}: {BUILDINFO}: {key} {value!r:.200} contains '..'")
    return value


def _rel(value: object, key: str, what: str) -> str:
    """``value`` as a relative path that stays inside the prefix, else FormatError."""
    if not isinstance(value, str) or not value or value.startswith("/") or "\0" in value:
        raise FormatError(f"{what}: {BUILDINFO}: {key} entry {value!r:.200} is not a relative path")
    if ".." in value.split("/"):
        raise FormatError(f"{what}: {BUILDINFO}: {key} entry {value!r:.200} leaves the prefix")
    return value


def _hash_to_prefix(doc: dict[Any, Any], what: str) -> dict[str, str]:
    """hash -> build-time prefix; inverts ``prefix_to_hash`` (Spack <= 0.19)."""
    if doc.get("hash_to_prefix") is not None:
        mapping, inverted = doc["hash_to_prefix"], False
    else:
        mapping, inverted = doc.get("prefix_to_hash") or {}, True
    if not isinstance(mapping, dict):
        raise FormatError(f"{what}: {BUILDINFO}: hash_to_prefix is not a mapping")
    result = {}
    for key, value in mapping.items():
        dag_hash, prefix = (value, key) if inverted else (key, value)
        if not isinstance(dag_hash, str) or not dag_hash:
            raise FormatError(f"{what}: {BUILDINFO}: hash {dag_hash!r:.80} is not a string")
        result[dag_hash] = _abs(prefix, f"prefix of {dag_hash}", what)
    return result
